"""The AOT check's two caches of compile results, so a variant compiles once.

- In process: `KernelReport`s by (variant, target) (`remember`, `recall`).
- On disk: one JSON file per (variant, target) under `$FUSENET_INSPECT_CACHE`
  (default `~/.cache/fusenet/inspect`; an empty string disables it), named by
  `disk_key`: a hash of the kernel's source and the sources of the jitted
  functions it calls, the signature, constexprs, divisibility, warps/stages,
  target and the Triton version. Writes are atomic (temporary file, rename).

`clear_cache()` forgets the in-process reports (and the files with disk=True).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import threading
import types
from typing import Any

from engine.perf.aot_report import REPORT_FIELDS, KernelReport

_memory: dict[Any, KernelReport] = {}
_memory_lock = threading.Lock()


# ----------------------------------------------------------------------------- in process


def memory_key(spec, target: str):
    """The in-process key of (variant, target): the variant itself where it hashes."""
    try:
        hash(spec)
        return (spec, target)
    except TypeError:  # unhashable constexpr value
        return (id(spec.kernel), spec.signature, repr(spec.constexprs), spec.divisible, spec.num_warps,
                spec.num_stages, target)


def recall(key) -> KernelReport | None:
    with _memory_lock:
        return _memory.get(key)


def remember(key, report: KernelReport) -> None:
    with _memory_lock:
        _memory[key] = report


# ----------------------------------------------------------------------------- on disk


def triton_version() -> str:
    import triton

    return triton.__version__


def _jitlike(v) -> bool:
    return hasattr(v, "fn") and callable(getattr(v, "fn")) and type(v).__name__ in (
        "JITFunction", "InterpretedFunction", "JITCallable")


def _names_of(code) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _names_of(c)
    return names


def dependency_sources(kernel) -> list[str]:
    """Source of the kernel and of every jitted function it (transitively) calls by name."""
    seen: set[int] = set()
    out: list[str] = []

    def visit(k) -> None:
        fn = getattr(k, "fn", k)
        if id(fn) in seen:
            return
        seen.add(id(fn))
        try:
            out.append(f"{fn.__module__}.{fn.__qualname__}\n" + inspect.getsource(fn))
        except (OSError, TypeError):
            out.append(f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}")
        code = getattr(fn, "__code__", None)
        if code is None:
            return
        g = getattr(fn, "__globals__", {})
        names = _names_of(code)
        for n in sorted(names):
            v = g.get(n)
            if v is None:
                continue
            if _jitlike(v):
                visit(v)
            elif isinstance(v, types.ModuleType) and not v.__name__.startswith("triton"):
                for attr in sorted(names):
                    a = getattr(v, attr, None)
                    if a is not None and _jitlike(a):
                        visit(a)

    visit(kernel)
    return out


def disk_key(spec, target: str) -> str:
    """The file name (without .json) of (variant, target) in the disk cache."""
    h = hashlib.sha256()
    for src in dependency_sources(spec.kernel):
        h.update(src.encode())
        h.update(b"\0")
    key = {
        "signature": spec.signature,
        "constexprs": [(k, repr(v)) for k, v in spec.constexprs],
        "divisible": spec.divisible,
        "warps": spec.num_warps,
        "stages": spec.num_stages,
        "target": target,
        "triton": triton_version(),
        # 2: the result carries the main loop ("loop"); 3: natural loops; 4: smem_per_warp; 5: loop-less MMA
        # kernels; 6: tail_instructions
        "format": 6,
    }
    h.update(json.dumps(key, sort_keys=True, default=str).encode())
    return h.hexdigest()[:40]


def cache_dir() -> str | None:
    d = os.environ.get("FUSENET_INSPECT_CACHE")
    if d is None:
        d = os.path.join(os.path.expanduser("~"), ".cache", "fusenet", "inspect")
    return d or None


def disk_load(key: str) -> dict | None:
    """The stored compile result, or None (no cache, no file, or an unreadable one)."""
    d = cache_dir()
    if not d:
        return None
    try:
        with open(os.path.join(d, key + ".json")) as f:
            data = json.load(f)
        return {k: data[k] for k in REPORT_FIELDS}
    except (OSError, ValueError, KeyError):
        return None


def disk_store(key: str, result: dict, meta: dict) -> None:
    """Store a compile result with `meta` (kernel, tag, target, Triton, ptxas log); failures are ignored."""
    d = cache_dir()
    if not d:
        return
    try:
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w") as f:
            json.dump({**{k: result[k] for k in REPORT_FIELDS}, **meta}, f, indent=1, default=str)
        os.replace(tmp, os.path.join(d, key + ".json"))
    except OSError:
        pass


def clear_cache(disk: bool = False) -> None:
    """Forget in-process reports (and the disk cache's files too with disk=True)."""
    with _memory_lock:
        _memory.clear()
    d = cache_dir()
    if disk and d and os.path.isdir(d):
        for f in os.listdir(d):
            if f.endswith(".json"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(d, f))
