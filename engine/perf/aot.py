"""Ahead-of-time GPU compile check and SASS inspector.

Collect the kernel variants a network launches (`engine.kernels.launch.recording`),
compile each for sm_80 (A100) and/or sm_90 (H100) with Triton's real compiler
(no GPU needed: Triton lowers to PTX and runs the `ptxas` shipped in its wheel),
and report per variant: registers per thread, spill bytes, shared memory, the
tensor-core (MMA) instructions in the SASS and the total instruction count.

    from engine.perf.aot import inspect_network, format_report
    print(format_report(inspect_network(lambda: net(x), targets=("sm_80", "sm_90"))))

Public API: `KernelReport`, `compile_specialization`, `compile_all`,
`format_report`, `gpu_tiles`, `inspect_network`, `clear_cache`.

How it compiles. On a machine without a GPU `import engine` turns on Triton's
interpreter, so every `@triton.jit` function (Triton's own `tl.sum`, `tl.cdiv`...
included) is an `InterpretedFunction`, which the compiler cannot take; the
interpreter also leaves `triton.language` monkeypatched after kernels that call
device functions. So compilation runs in fresh worker processes that import
Triton with the interpreter off, re-import the kernel's module by name (the
kernel must be a module-level `@triton.jit` function of an importable module;
the parent's `sys.path` is passed on) and call
`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 80|90, 32))`.

What is read, per compiled kernel (Triton 3.6 and 3.9 alike):
* `CompiledKernel.metadata.shared` -> shared memory bytes (static + Triton's allocation);
* `ptxas -v` log (Triton runs `ptxas -v` itself; `knobs.nvidia.dump_ptxas_log`
  makes it print the log, which the worker captures) -> registers, spill
  store/load bytes; `cuobjdump -res-usage` is the fallback for registers;
  `CompiledKernel.n_regs`/`n_spills` exist only after loading on a GPU, so they
  are not used;
* `asm["cubin"]` written to a temp file and disassembled with the wheel's
  `cuobjdump -sass` (`nvdisasm` as fallback) -> opcode histogram, MMA counts.

Reports are cached in-process by (spec, target) and on disk as JSON under
`$FUSENET_INSPECT_CACHE` (default `~/.cache/fusenet/inspect`; set it to an empty
string to disable), keyed by a hash of the kernel's source and the sources of
the jitted functions it calls, the signature, constexprs, divisibility,
warps/stages, target and the Triton version.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect as _pyinspect
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import engine.device
from engine.kernels.launch import Specialization, _kernel_params, recording
from engine.text import format_table

TARGETS = {"sm_80": 80, "sm_90": 90}
_MMA_ORDER = ("HGMMA", "HMMA", "IGMMA", "IMMA", "QGMMA", "QMMA", "BGMMA", "BMMA", "DMMA", "OMMA")


@dataclass
class KernelReport:
    """What one kernel variant compiles to on one target."""

    name: str
    tag: str  # short `k=v` summary of the constexprs
    target: str  # "sm_80" | "sm_90"
    num_warps: int = 4
    num_stages: int = 3
    regs: int = 0  # registers per thread
    spill_stores: int = 0  # bytes
    spill_loads: int = 0  # bytes
    stack: int = 0  # bytes of stack frame per thread
    smem: int = 0  # shared memory bytes per block
    mma: dict = field(default_factory=dict)  # opcode -> count, e.g. {"HGMMA": 8}
    instructions: int = 0  # SASS instructions, trailing NOP padding excluded
    opcodes: dict = field(default_factory=dict)  # opcode (before the first '.') -> count
    compile_s: float = 0.0
    cached: bool = False  # came from the disk cache
    error: str | None = None
    spec: Any = field(default=None, repr=False, compare=False)

    @property
    def spills(self) -> int:
        """Spill bytes (stores + loads) reported by ptxas."""
        return self.spill_stores + self.spill_loads

    @property
    def mma_count(self) -> int:
        return sum(self.mma.values())

    @property
    def ok(self) -> bool:
        return self.error is None


# ----------------------------------------------------------------------------- helpers


def _norm_target(target: str | int) -> str:
    if isinstance(target, int):
        target = f"sm_{target}"
    t = str(target).lower().replace("sm", "sm_").replace("__", "_")
    if t not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {sorted(TARGETS)}")
    return t


def _raw_fn(kernel):
    return getattr(kernel, "fn", kernel)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    s = str(v)
    if s.startswith("triton.language.") or s.startswith("tl."):
        s = s.rsplit(".", 1)[-1]
    return s


def constexpr_tag(constexprs: Iterable[tuple[str, Any]], max_len: int = 60) -> str:
    """`ACT=1 HAS_BIAS !HAS_RES BLOCK_M=64 ...` (True -> name, False -> !name, None -> name=-)."""
    parts = []
    for k, v in constexprs:
        if v is True:
            parts.append(k)
        elif v is False:
            parts.append("!" + k)
        elif v is None:
            parts.append(f"{k}=-")
        else:
            parts.append(f"{k}={_fmt_value(v)}")
    s = " ".join(parts)
    return s if len(s) <= max_len else s[: max_len - 1] + "…"


def _triton_version() -> str:
    import triton

    return triton.__version__


# ----------------------------------------------------------------------------- cache keys


def _dep_sources(kernel) -> list[str]:
    """Source of the kernel and of every jitted function it (transitively) calls by name."""
    seen: set[int] = set()
    out: list[str] = []

    def jitlike(v) -> bool:
        return hasattr(v, "fn") and callable(getattr(v, "fn")) and type(v).__name__ in (
            "JITFunction", "InterpretedFunction", "JITCallable")

    def names_of(code) -> set[str]:
        names = set(code.co_names)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                names |= names_of(c)
        return names

    def visit(k) -> None:
        fn = _raw_fn(k)
        if id(fn) in seen:
            return
        seen.add(id(fn))
        try:
            out.append(f"{fn.__module__}.{fn.__qualname__}\n" + _pyinspect.getsource(fn))
        except (OSError, TypeError):
            out.append(f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}")
        code = getattr(fn, "__code__", None)
        if code is None:
            return
        g = getattr(fn, "__globals__", {})
        names = names_of(code)
        for n in sorted(names):
            v = g.get(n)
            if v is None:
                continue
            if jitlike(v):
                visit(v)
            elif isinstance(v, types.ModuleType) and not v.__name__.startswith("triton"):
                for attr in sorted(names):
                    a = getattr(v, attr, None)
                    if a is not None and jitlike(a):
                        visit(a)

    visit(kernel)
    return out


def _spec_payload(spec: Specialization) -> dict:
    """Plain data the worker needs to rebuild and compile the variant."""
    fn = _raw_fn(spec.kernel)
    params = list(_pyinspect.signature(fn).parameters)
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
    }


def _disk_key(spec: Specialization, target: str) -> str:
    h = hashlib.sha256()
    for src in _dep_sources(spec.kernel):
        h.update(src.encode())
        h.update(b"\0")
    key = {
        "signature": spec.signature,
        "constexprs": [(k, repr(v)) for k, v in spec.constexprs],
        "divisible": spec.divisible,
        "warps": spec.num_warps,
        "stages": spec.num_stages,
        "target": target,
        "triton": _triton_version(),
        "format": 1,
    }
    h.update(json.dumps(key, sort_keys=True, default=str).encode())
    return h.hexdigest()[:40]


def _cache_dir() -> str | None:
    d = os.environ.get("FUSENET_INSPECT_CACHE")
    if d is None:
        d = os.path.join(os.path.expanduser("~"), ".cache", "fusenet", "inspect")
    return d or None


_REPORT_FIELDS = ("regs", "spill_stores", "spill_loads", "stack", "smem", "mma", "instructions",
                  "opcodes", "compile_s")


def _disk_load(key: str) -> dict | None:
    d = _cache_dir()
    if not d:
        return None
    try:
        with open(os.path.join(d, key + ".json")) as f:
            data = json.load(f)
        return {k: data[k] for k in _REPORT_FIELDS}
    except (OSError, ValueError, KeyError):
        return None


def _disk_store(key: str, result: dict, meta: dict) -> None:
    d = _cache_dir()
    if not d:
        return
    try:
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w") as f:
            json.dump({**{k: result[k] for k in _REPORT_FIELDS}, **meta}, f, indent=1, default=str)
        os.replace(tmp, os.path.join(d, key + ".json"))
    except OSError:
        pass


_mem_cache: dict[Any, KernelReport] = {}
_mem_lock = threading.Lock()


def clear_cache(disk: bool = False) -> None:
    """Forget in-process reports (and the disk cache's files too with disk=True)."""
    with _mem_lock:
        _mem_cache.clear()
    d = _cache_dir()
    if disk and d and os.path.isdir(d):
        for f in os.listdir(d):
            if f.endswith(".json"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(d, f))


def _mem_key(spec: Specialization, target: str):
    try:
        hash(spec)
        return (spec, target)
    except TypeError:  # unhashable constexpr value
        return (id(spec.kernel), spec.signature, repr(spec.constexprs), spec.divisible, spec.num_warps,
                spec.num_stages, target)


# ----------------------------------------------------------------------------- the worker

# Runs in a fresh interpreter: Triton with its interpreter off, then fusenet.
# Jobs come as one pickle on stdin; each result goes out as a length-prefixed
# pickle on the original stdout (fd 1 is pointed at stderr so stray prints from
# Triton or user modules cannot corrupt the stream).
_WORKER = r'''
import os, sys, pickle, struct, io, re, contextlib, subprocess, tempfile, time, importlib, traceback
_out = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
jobs_in = pickle.load(sys.stdin.buffer)
sys.path[:] = jobs_in["sys_path"]
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton import knobs
knobs.runtime.interpret = False
os.environ["TRITON_INTERPRET"] = "1"   # what `import engine` expects on a machine without CUDA
import engine  # noqa: F401
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
try:
    from triton.runtime.jit import JITFunction
except ImportError:
    JITFunction = None
with contextlib.suppress(Exception):
    knobs.compilation.always_compile = True   # so ptxas runs (and logs) every time
with contextlib.suppress(Exception):
    knobs.nvidia.dump_ptxas_log = True

def tool(name):
    with contextlib.suppress(Exception):
        p = getattr(knobs.nvidia, name).path
        if p and os.path.exists(p):
            return p
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)

def resolve(job):
    mod = sys.modules.get(job["module"])
    if mod is None or job["module"] == "__main__":
        if job["module"] == "__main__":
            raise RuntimeError("kernel is defined in __main__; move it to an importable module")
        mod = importlib.import_module(job["module"])
    obj = mod
    for part in job["qualname"].split("."):
        if part == "<locals>":
            raise RuntimeError("kernel is defined inside a function; it must be a module-level @triton.jit")
        obj = getattr(obj, part)
    if not hasattr(obj, "arg_names") or not hasattr(obj, "cache_key"):
        raise RuntimeError(f"{job['module']}.{job['qualname']} is a {type(obj).__name__}, not a JITFunction "
                           "(was the module imported with the interpreter on?)")
    return obj

PTXAS_RE = re.compile(r"Used (\d+) registers")
SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
STACK_RE = re.compile(r"(\d+) bytes stack frame")
INSN_RE = re.compile(r"/\*[0-9a-fA-F]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")

def sass_of(cubin):
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        try:
            sass = subprocess.run([tool("cuobjdump"), "-sass", path], check=True, capture_output=True, text=True).stdout
        except Exception:
            sass = subprocess.run([tool("nvdisasm"), "-c", path], check=True, capture_output=True, text=True).stdout
        res = ""
        with contextlib.suppress(Exception):
            res = subprocess.run([tool("cuobjdump"), "-res-usage", path], check=True, capture_output=True,
                                 text=True).stdout
        return sass, res
    finally:
        os.remove(path)

def count(sass):
    ops = [m.group(1) for m in INSN_RE.finditer(sass)]
    while ops and ops[-1] == "NOP":
        ops.pop()
    while ops and ops[-1].startswith("BRA"):   # the trailing self-loop after EXIT
        ops.pop()
        break
    hist = {}
    for op in ops:
        base = op.split(".")[0]
        hist[base] = hist.get(base, 0) + 1
    mma = {k: v for k, v in hist.items() if k.endswith("MMA")}
    return len(ops), hist, mma

def compile_one(job):
    fn = resolve(job)
    sig = dict(job["signature"])
    constexprs = dict(job["constexprs"])
    params = list(fn.arg_names)
    if params != list(job["params"]):
        raise RuntimeError(f"kernel parameters changed: {params} != {job['params']}")
    attrs = {(params.index(n),): [["tt.divisibility", 16]] for n in job["divisible"]}
    target = GPUTarget("cuda", job["arch"], 32)
    opts = {"num_warps": job["num_warps"], "num_stages": job["num_stages"]}
    buf = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(buf):
        ck = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=opts)
    dt = time.time() - t0
    log = buf.getvalue()
    md = ck.metadata
    sass, res = sass_of(ck.asm["cubin"])
    n, hist, mma = count(sass)
    regs = [int(x) for x in PTXAS_RE.findall(log)]
    spills = [(int(a), int(b)) for a, b in SPILL_RE.findall(log)]
    stack = [int(x) for x in STACK_RE.findall(log)]
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
        "spill_loads": sum(l for _, l in spills),
        "stack": max(stack) if stack else 0,
        "smem": int(getattr(md, "shared", 0) or 0),
        "mma": mma,
        "instructions": n,
        "opcodes": hist,
        "compile_s": round(dt, 3),
        "ptxas_log": log[-4000:],
    }

for i, job in enumerate(jobs_in["jobs"]):
    try:
        out = ("ok", compile_one(job))
    except BaseException as e:
        msg = f"{type(e).__name__}: {e}"
        out = ("error", msg[-3000:])
    data = pickle.dumps((i, out))
    _out.write(struct.pack("<Q", len(data)) + data)
    _out.flush()
'''


def _run_worker(jobs: list[dict], timeout: float | None = None) -> list[tuple[str, Any]]:
    """Compile `jobs` in one fresh worker process; one ("ok", dict) | ("error", msg) per job."""
    payload = pickle.dumps({"sys_path": list(sys.path), "jobs": jobs})
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, env=env, cwd=os.getcwd())
        try:
            out, _ = proc.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            err.write(f"\ntimed out after {timeout:.0f} s".encode())
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    results: list[tuple[str, Any] | None] = [None] * len(jobs)
    pos = 0
    while pos + 8 <= len(out):
        (n,) = struct.unpack("<Q", out[pos:pos + 8])
        try:
            i, res = pickle.loads(out[pos + 8:pos + 8 + n])
        except Exception:
            break
        results[i] = res
        pos += 8 + n
    tail = stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    for i, r in enumerate(results):
        if r is None:
            results[i] = ("error", f"compile worker died (exit code {proc.returncode}): {tail[0][-500:]}")
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- public API


def spec_tag(spec: Specialization) -> str:
    """Tag of the kernel's declared `tl.constexpr` parameters (runtime args the JIT
    specialised, i.e. None pointers and integers equal to 1, are left out)."""
    try:
        declared = {p.name for p, is_constexpr, _ in _kernel_params(spec.kernel) if is_constexpr}
    except Exception:
        declared = None
    items = [(k, v) for k, v in spec.constexprs if declared is None or k in declared]
    return constexpr_tag(items)


def _report(spec: Specialization, target: str, data: dict | None, error: str | None, cached: bool) -> KernelReport:
    r = KernelReport(name=spec.name, tag=spec_tag(spec), target=target, num_warps=spec.num_warps,
                     num_stages=spec.num_stages, spec=spec, cached=cached, error=error)
    if data:
        for k in _REPORT_FIELDS:
            setattr(r, k, data[k])
    return r


def compile_all(specs: Sequence[Specialization], targets: Sequence[str] = ("sm_80", "sm_90"),
                jobs: int = 2) -> list[KernelReport]:
    """Compile every (spec, target) pair; one report per pair, in order (specs outer, targets inner).

    Uncached pairs are split across `jobs` worker processes. A variant that fails
    to compile gets a report whose `error` says why (kernel name in `name`).
    """
    targets = [_norm_target(t) for t in targets]
    pairs = [(s, t) for s in specs for t in targets]
    reports: list[KernelReport | None] = [None] * len(pairs)
    todo: list[tuple[int, dict, str | None]] = []  # (pair index, job, disk key)
    pending: dict[Any, list[int]] = {}
    for i, (spec, t) in enumerate(pairs):
        mk = _mem_key(spec, t)
        with _mem_lock:
            hit = _mem_cache.get(mk)
        if hit is not None:
            reports[i] = hit
            continue
        if mk in pending:  # same variant twice in the input
            pending[mk].append(i)
            continue
        try:
            dk = _disk_key(spec, t)
        except Exception:
            dk = None
        data = _disk_load(dk) if dk else None
        if data is not None:
            rep = _report(spec, t, data, None, cached=True)
            with _mem_lock:
                _mem_cache[mk] = rep
            reports[i] = rep
            continue
        try:
            job = {**_spec_payload(spec), "arch": TARGETS[t]}
        except Exception as e:
            reports[i] = _report(spec, t, None, f"{type(e).__name__}: {e}", cached=False)
            continue
        pending[mk] = [i]
        todo.append((i, job, dk))

    if todo:
        n = max(1, min(int(jobs), len(todo)))
        shards = [todo[k::n] for k in range(n)]
        results: list[list] = [None] * n  # type: ignore[list-item]

        def work(k: int) -> None:
            # generous: a big fused kernel takes ~10 s; the worker's start-up a few more
            results[k] = _run_worker([job for _, job, _ in shards[k]], timeout=60 + 120 * len(shards[k]))

        threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for shard, res in zip(shards, results):
            for (i, job, dk), (status, val) in zip(shard, res):
                spec, t = pairs[i]
                if status == "ok":
                    rep = _report(spec, t, val, None, cached=False)
                    with _mem_lock:
                        _mem_cache[_mem_key(spec, t)] = rep
                    if dk:
                        _disk_store(dk, val, {"kernel": spec.name, "tag": rep.tag, "target": t,
                                              "triton": _triton_version(), "ptxas_log": val.get("ptxas_log", "")})
                else:
                    rep = _report(spec, t, None, str(val), cached=False)
                    if not str(val).startswith("compile worker died"):  # a deterministic compile error
                        with _mem_lock:
                            _mem_cache[_mem_key(spec, t)] = rep
                for j in pending[_mem_key(spec, t)]:
                    reports[j] = rep
    return reports  # type: ignore[return-value]


def compile_specialization(spec: Specialization, target: str = "sm_90") -> KernelReport:
    """Compile one recorded variant for `target` ("sm_80" or "sm_90") and report on it.

    Raises RuntimeError (with the kernel name) if it does not compile.
    """
    rep = compile_all([spec], (target,), jobs=1)[0]
    if rep.error:
        raise RuntimeError(f"{rep.name} [{rep.tag}] on {rep.target}: {rep.error}")
    return rep


def _mma_text(r: KernelReport) -> str:
    if not r.mma:
        return "0"
    kinds = sorted(r.mma, key=lambda k: (_MMA_ORDER.index(k) if k in _MMA_ORDER else 99, k))
    return " ".join(f"{k}:{r.mma[k]}" for k in kinds)


def format_report(reports: Sequence[KernelReport]) -> str:
    """A plain-text table, one row per kernel variant and target.

    Columns: kernel, variant (its constexprs), target, warps/stages, registers per
    thread, spill bytes (stores + loads), shared memory bytes, MMA instructions by
    opcode (HMMA = mma.sync, HGMMA = Hopper wgmma, IMMA = integer, ...), SASS
    instruction count, and a note (compile errors, spills).
    """
    head = ("kernel", "variant", "target", "w/s", "regs", "spills", "smem", "mma", "instrs", "note")
    rows = []
    for r in reports:
        if r.error:
            msg = r.error.strip().splitlines()[-1][:160] if r.error.strip() else "unknown error"
            rows.append((r.name, r.tag, r.target, f"{r.num_warps}/{r.num_stages}", "-", "-", "-", "-", "-",
                         "ERROR: " + msg))
            continue
        note = f"spills {r.spill_stores}B st / {r.spill_loads}B ld" if r.spills else ""
        rows.append((r.name, r.tag, r.target, f"{r.num_warps}/{r.num_stages}", str(r.regs), str(r.spills),
                     str(r.smem), _mma_text(r), str(r.instructions), note))
    out = format_table(head, rows, align="lllrrrrlrl", rule="columns").splitlines()
    n_err = sum(1 for r in reports if r.error)
    n_spill = sum(1 for r in reports if not r.error and r.spills)
    n_mma = sum(1 for r in reports if not r.error and r.mma)
    out.append(f"{len(reports)} variants: {n_err} failed to compile, {n_spill} spill, {n_mma} use tensor cores")
    return "\n".join(out)


@contextlib.contextmanager
def gpu_tiles() -> Iterator[None]:
    """Make launchers pick their GPU tile configs (`engine.device.INTERPRETED = False`) inside the block."""
    old = engine.device.INTERPRETED
    engine.device.INTERPRETED = False
    try:
        yield
    finally:
        engine.device.INTERPRETED = old


def record_network(run: Callable[[], Any]) -> list[Specialization]:
    """The kernel variants `run()` launches with GPU tiles, recorded without executing any kernel."""
    with gpu_tiles(), recording(dry_run=True) as specs:
        run()
    return list(specs)


def inspect_network(run: Callable[[], Any], targets: Sequence[str] = ("sm_80", "sm_90"),
                    jobs: int = 2) -> list[KernelReport]:
    """Record what `run()` launches (GPU tiles, dry run: no kernel executes) and compile it all.

    Outputs of launches are uninitialised during the dry run, so `run` must not
    branch on computed values (reading `.item()` of a kernel output, ...).
    """
    return compile_all(record_network(run), targets, jobs=jobs)


__all__ = ["KernelReport", "compile_specialization", "compile_all", "format_report", "gpu_tiles",
           "inspect_network", "record_network", "clear_cache", "constexpr_tag", "spec_tag", "TARGETS"]
