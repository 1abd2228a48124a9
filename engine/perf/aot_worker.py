"""The compile worker of the AOT check: a fresh process that compiles kernel
variants for a GPU target with Triton's real compiler, and the parent's side of
talking to it.

Why a separate process: on a machine without a GPU, `import engine` turns on
Triton's interpreter, so every `@triton.jit` function in the parent is an
`InterpretedFunction` the compiler cannot take, and the interpreter leaves
`triton.language` monkeypatched. The worker imports Triton with the
interpreter off, then re-imports each kernel's module by name, so its kernels
are real `JITFunction`s (the kernel must be a module-level `@triton.jit`
function of an importable module; the parent's `sys.path` is passed on).

Protocol: `run_worker(jobs)` starts `python -m engine.perf.aot_worker`, writes
one pickle `{"sys_path": [...], "jobs": [job, ...]}` (`job_for` makes a job:
plain data naming the kernel, its signature, constexprs, divisibility,
warps/stages and target arch) to its stdin, and reads one length-prefixed
pickle `(index, ("ok", result) | ("error", message))` per job from its stdout.
The worker points fd 1 at stderr first, so stray prints from Triton or user
modules cannot corrupt the stream.

What is read, per compiled kernel (Triton 3.6 and 3.9 alike):
* `CompiledKernel.metadata.shared` -> shared memory bytes;
* the `ptxas -v` log (`knobs.nvidia.dump_ptxas_log` makes Triton print it) ->
  registers, spill store/load bytes, stack; `cuobjdump -res-usage` is the
  fallback (`CompiledKernel.n_regs`/`n_spills` exist only after loading on a GPU);
* `asm["cubin"]` disassembled with the wheel's `cuobjdump -sass` (`nvdisasm` as
  fallback) -> opcode histogram, MMA counts, instruction count, and the main
  loop's per-trip figures (engine.perf.sass.main_loop); `job["sass"] = True`
  also returns the listing itself (for reading it by hand).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engine.perf.sass import main_loop, parse_sass, ticket_tail

# ----------------------------------------------------------------------------- the parent's side


def job_for(spec, arch: int) -> dict:
    """Plain data the worker needs to rebuild and compile a recorded variant for sm_`arch`."""
    fn = getattr(spec.kernel, "fn", spec.kernel)
    params = list(inspect.signature(fn).parameters)
    sig_types = dict(spec.signature)
    consts = dict(spec.constexprs)
    signature = {}
    for p in params:
        if p in sig_types:
            signature[p] = sig_types[p]
        elif p in consts:
            signature[p] = "constexpr"
        else:
            raise ValueError(f"specialization of {spec.name} lacks argument {p!r}")
    return {
        "module": fn.__module__,
        "qualname": fn.__qualname__,
        "file": getattr(fn.__code__, "co_filename", None),
        "params": params,
        "signature": signature,
        "constexprs": consts,
        "divisible": list(spec.divisible),
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "arch": arch,
    }


def _write_frame(stream, item) -> None:
    data = pickle.dumps(item)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _read_frames(data: bytes) -> list:
    items, pos = [], 0
    while pos + 8 <= len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        try:
            items.append(pickle.loads(data[pos + 8:pos + 8 + n]))
        except Exception:  # noqa: BLE001 - a truncated last frame: the worker died while writing
            break
        pos += 8 + n
    return items


def run_worker(jobs: list[dict], timeout: float | None = None) -> list[tuple[str, Any]]:
    """Compile `jobs` in one fresh worker process; one ("ok", dict) | ("error", msg) per job."""
    payload = pickle.dumps({"sys_path": list(sys.path), "jobs": jobs})
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # the worker must import this very engine, wherever the parent found it
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "engine.perf.aot_worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, env=env, cwd=os.getcwd())
        try:
            out, _ = proc.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            err.write(f"\ntimed out after {timeout:.0f} s".encode())
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    results: list[tuple[str, Any] | None] = [None] * len(jobs)
    for i, res in _read_frames(out):
        results[i] = res
    tail = stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    for i, r in enumerate(results):
        if r is None:
            results[i] = ("error", f"compile worker died (exit code {proc.returncode}): {tail[0][-500:]}")
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the worker's side

PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")
SASS_INSTRUCTION = re.compile(r"/\*[0-9a-fA-F]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def _tool(name: str) -> str:
    """Path of a CUDA binary (cuobjdump, nvdisasm) shipped in Triton's wheel."""
    import triton
    from triton import knobs

    with contextlib.suppress(Exception):
        p = getattr(knobs.nvidia, name).path
        if p and os.path.exists(p):
            return p
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resolve(job: dict):
    """The kernel's JITFunction, re-imported by module and qualified name."""
    if job["module"] == "__main__":
        raise RuntimeError("kernel is defined in __main__; move it to an importable module")
    mod = sys.modules.get(job["module"]) or importlib.import_module(job["module"])
    obj = mod
    for part in job["qualname"].split("."):
        if part == "<locals>":
            raise RuntimeError("kernel is defined inside a function; it must be a module-level @triton.jit")
        obj = getattr(obj, part)
    if not hasattr(obj, "arg_names") or not hasattr(obj, "cache_key"):
        raise RuntimeError(f"{job['module']}.{job['qualname']} is a {type(obj).__name__}, not a JITFunction "
                           "(was the module imported with the interpreter on?)")
    return obj


def _sass_of(cubin: bytes) -> tuple[str, str]:
    """(SASS listing, resource usage) of a cubin, from the wheel's cuobjdump (nvdisasm as fallback)."""
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        try:
            sass = subprocess.run([_tool("cuobjdump"), "-sass", path], check=True, capture_output=True,
                                  text=True).stdout
        except Exception:  # noqa: BLE001
            sass = subprocess.run([_tool("nvdisasm"), "-c", path], check=True, capture_output=True, text=True).stdout
        res = ""
        with contextlib.suppress(Exception):
            res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], check=True, capture_output=True,
                                 text=True).stdout
        return sass, res
    finally:
        os.remove(path)


def count_instructions(sass: str) -> tuple[int, dict, dict]:
    """(instructions, opcode histogram, MMA opcodes) of a SASS listing; trailing NOP padding
    and the self-loop after EXIT are not counted."""
    ops = [m.group(1) for m in SASS_INSTRUCTION.finditer(sass)]
    while ops and ops[-1] == "NOP":
        ops.pop()
    if ops and ops[-1].startswith("BRA"):
        ops.pop()
    hist: dict[str, int] = {}
    for op in ops:
        base = op.split(".")[0]
        hist[base] = hist.get(base, 0) + 1
    mma = {k: v for k, v in hist.items() if k.endswith("MMA")}
    return len(ops), hist, mma


def compile_job(job: dict) -> dict:
    """Compile one job for its target and read registers, spills, shared memory and the SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _resolve(job)
    params = list(fn.arg_names)
    if params != list(job["params"]):
        raise RuntimeError(f"kernel parameters changed: {params} != {job['params']}")
    attrs = {(params.index(n),): [["tt.divisibility", 16]] for n in job["divisible"]}
    opts = {"num_warps": job["num_warps"], "num_stages": job["num_stages"]}
    log = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(log):
        ck = triton.compile(ASTSource(fn, dict(job["signature"]), dict(job["constexprs"]), attrs),
                            target=GPUTarget("cuda", job["arch"], 32), options=opts)
    dt = time.time() - t0
    log = log.getvalue()
    sass, res = _sass_of(ck.asm["cubin"])
    n, hist, mma = count_instructions(sass)
    loop = main_loop(sass)
    regs = [int(x) for x in PTXAS_REGS.findall(log)]
    spills = [(int(a), int(b)) for a, b in PTXAS_SPILLS.findall(log)]
    stack = [int(x) for x in PTXAS_STACK.findall(log)]
    if not regs:
        m = re.search(r"REG:(\d+)", res)
        regs = [int(m.group(1))] if m else [0]
        m = re.search(r"STACK:(\d+)", res)
        stack = [int(m.group(1))] if m else [0]
        m = re.search(r"LOCAL:(\d+)", res)
        spills = [(int(m.group(1)), 0)] if m else [(0, 0)]
    return {
        "regs": max(regs),
        "spill_stores": sum(s for s, _ in spills),
        "spill_loads": sum(ld for _, ld in spills),
        "stack": max(stack) if stack else 0,
        "smem": int(getattr(ck.metadata, "shared", 0) or 0),
        "mma": mma,
        "instructions": n,
        "tail_instructions": ticket_tail(parse_sass(sass)),
        "opcodes": hist,
        "loop": loop.as_dict() if loop is not None else None,
        "compile_s": round(dt, 3),
        "ptxas_log": log[-4000:],
        **({"sass": sass} if job.get("sass") else {}),
    }


def _import_triton_for_compiling() -> None:
    """Import Triton with its interpreter off (so `@triton.jit` makes JITFunctions), and have it
    run ptxas (and print its log) for every kernel."""
    os.environ["TRITON_INTERPRET"] = "0"
    from triton import knobs

    knobs.runtime.interpret = False  # set explicitly: from here on the environment variable is not read
    # what engine.device expects of a process that imported triton on a machine without CUDA
    # (the kernel modules import it before they define their kernels)
    os.environ["TRITON_INTERPRET"] = "1"
    with contextlib.suppress(Exception):
        knobs.compilation.always_compile = True  # so ptxas runs (and logs) every time
    with contextlib.suppress(Exception):
        knobs.nvidia.dump_ptxas_log = True


def main() -> None:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    request = pickle.load(sys.stdin.buffer)
    sys.path[:] = request["sys_path"]
    _import_triton_for_compiling()
    for i, job in enumerate(request["jobs"]):
        try:
            result = ("ok", compile_job(job))
        except BaseException as e:  # noqa: BLE001 - every failure is reported against its job
            result = ("error", f"{type(e).__name__}: {e}"[-3000:])
        _write_frame(out, (i, result))


if __name__ == "__main__":
    main()
