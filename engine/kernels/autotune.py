"""Autotuning of the GEMM kernels' tile configs, remembered in a file on disk.

Why: the conv and linear launchers pick their tiles (BLOCK_M/N/K, warps,
stages, split-K count) with fixed heuristics. One fixed config cannot be best
for a 3->24 RGB stem and a 512->512 3x3 conv alike, nor on an A100 and an H100.
Timing a few candidates in place, once per shape and machine, finds a better
one; a file keeps the answer, so later runs (and other processes, DDP ranks)
start fast without timing anything.

How a launcher uses it (the hooks stay a few lines each):

    cfg = autotune.pick("conv2d_fwd", shape, dtype=x.dtype, device=x.device,
                        default=Config(...heuristic...),
                        candidates=lambda: gemm_candidates(M, N, K, x.dtype, smem_limit(x.device), default),
                        run=run)       # run(cfg) launches with cfg, writing (never accumulating) its outputs
    result = run(cfg)

Modes:
* default: a cached config if there is one for this (kernel, shape, dtype,
  device, triton version), else the launcher's heuristic. Nothing is timed.
* tuning (`with tuning():`, or FUSENET_TUNE=1 in the environment): a cache miss
  times every candidate in place (`run(cfg)` once to compile, skipping
  candidates that fail to compile or launch, then the median of repeats on CUDA
  events), stores the fastest and returns it; the launcher then computes its
  real result with it.
* under Triton's CPU interpreter: the heuristic, always. The cache is neither
  read nor written: the interpreter has its own single interpreter-sized tile
  config (large tiles cut the per-program Python cost), and its timings say
  nothing about a GPU.
* `forced(config)`: every hooked launcher uses `config` (interpreter included),
  so tests can prove non-default configs compute correctly.

The cache file: `$FUSENET_TUNE_CACHE`, else `~/.cache/fusenet/tune.json`;
JSON `{"schema": 1, "entries": {key: entry}}` with key
`kernel|shape|dtype|device|triton-version`, e.g.
`conv2d_fwd|M=4096,N=64,K=576,...|bfloat16|NVIDIA H100 80GB HBM3 (sm_90)|triton-3.6.0`
and entry the chosen config plus its time (and the heuristic's, for comparison).
It is read lazily once per process. Writes take a lock file, merge with what is
on disk at that moment and replace the file atomically (temp file + os.replace),
so concurrent tuners keep each other's entries. An unreadable or malformed file
gives one warning line and counts as empty; nothing here ever raises because of
the cache file.

Public API: Config, TuneStats, TuneCache, pick, select, tuning, forced,
is_tuning, gemm_candidates, gemm_smem_bytes, split_variants, epilogue_key,
smem_limit, cache_path, cache_entries, cache_key, benchmark, cuda_event_timer,
SCHEMA.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import triton

from engine import device as _device
from engine.kernels import launch as _launch

SCHEMA = 1
DEFAULT_SMEM_LIMIT = 227 * 1024  # an H100's opt-in shared memory per block, when the device does not say
MAX_CANDIDATES = 24

# --------------------------------------------------------------------------- #
# Configs
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Config:
    """A tile config in the GEMM view [M, K] x [K, N] of a kernel.

    block_m / block_n tile the output, block_k is the reduction chunk; each
    launcher maps them onto its kernel's constexpr names. num_warps / num_stages
    None: the launcher passes none (Triton's defaults). split: the split-K count
    of a wgrad (None: the launcher's heuristic for these tiles).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int | None = None
    num_stages: int | None = None
    split: int | None = None

    def meta(self) -> dict:
        """The launch options (num_warps, num_stages) this config sets."""
        out = {}
        if self.num_warps is not None:
            out["num_warps"] = self.num_warps
        if self.num_stages is not None:
            out["num_stages"] = self.num_stages
        return out

    def with_split(self, split: int | None) -> Config:
        return replace(self, split=split)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Any) -> Config:
        """Parse a cached config; ValueError if it is not one."""
        if not isinstance(data, dict):
            raise ValueError(f"config is {type(data).__name__}, not an object")
        names = {"block_m", "block_n", "block_k", "num_warps", "num_stages", "split"}
        extra = set(data) - names
        if extra:
            raise ValueError(f"config has unknown fields {sorted(extra)}")
        for name, value in data.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config field {name} is {value!r}, not a positive integer")
        try:
            return cls(**data)
        except TypeError as e:  # a required block size is missing
            raise ValueError(f"config {data}: {e}") from None

    def __str__(self) -> str:
        text = f"{self.block_m}x{self.block_n}x{self.block_k}"
        if self.num_warps is not None:
            text += f" w{self.num_warps}"
        if self.num_stages is not None:
            text += f" s{self.num_stages}"
        if self.split is not None:
            text += f" split{self.split}"
        return text


def epilogue_key(flags: dict) -> str:
    """Launch flags that change a kernel's register use, as a short key part.

    {"HAS_BIAS": True, "ACT": 3, "STATS": False} -> "has_bias+act3"; none -> "none".
    """
    parts = []
    for name, value in flags.items():
        if value is True:
            parts.append(name.lower())
        elif isinstance(value, int) and not isinstance(value, bool) and value:
            parts.append(f"{name.lower()}{value}")
    return "+".join(parts) or "none"


# --------------------------------------------------------------------------- #
# Candidates
# --------------------------------------------------------------------------- #
def _np2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def gemm_smem_bytes(block_m: int, block_n: int, block_k: int, stages: int, a_bytes: int, b_bytes: int) -> int:
    """Shared memory a pipelined GEMM tile needs: `stages` buffers of the A and B tiles."""
    return stages * (block_m * block_k * a_bytes + block_k * block_n * b_bytes)


def gemm_candidates(M: int, N: int, K: int, dtype: torch.dtype, smem_limit: int,
                    default: Config | None = None, *, b_dtype: torch.dtype | None = None) -> list[Config]:
    """The tile configs worth timing for an [M, K] x [K, N] GEMM; a pure function.

    BLOCK_M 64/128 (128 only when M reaches it), BLOCK_N 32..256 up to
    next_pow2(N) (16 for N <= 16), BLOCK_K 32/64 up to next_pow2(K) (16 for
    K <= 16); warps by tile area (4 up to 64x64, 8 from 128x128, both between);
    the deepest of 4 (BLOCK_K 32) or 3 (BLOCK_K 64) stages that fits
    `smem_limit`, down to 2, else the tile is dropped. `default` comes first,
    always (it is what runs today). At most MAX_CANDIDATES configs.
    b_dtype: the B operand's dtype in memory when it differs (linear loads fp32
    weights and casts them in registers).
    """
    a_bytes = torch.empty((), dtype=dtype).element_size()
    b_bytes = torch.empty((), dtype=b_dtype).element_size() if b_dtype is not None else a_bytes
    bm_opts = [b for b in (64, 128) if b <= max(64, _np2(M))]
    bn_opts = [b for b in (32, 64, 128, 256) if b <= _np2(N)] or [max(16, _np2(N))]
    bk_opts = [b for b in (32, 64) if b <= _np2(K)] or [max(16, _np2(K))]
    out: list[Config] = [default] if default is not None else []
    for bm in bm_opts:
        for bn in bn_opts:
            for bk in bk_opts:
                area = bm * bn
                warps = (4,) if area <= 64 * 64 else (8,) if area >= 128 * 128 else (4, 8)
                stages = 4 if bk <= 32 else 3
                while stages > 2 and gemm_smem_bytes(bm, bn, bk, stages, a_bytes, b_bytes) > smem_limit:
                    stages -= 1
                if gemm_smem_bytes(bm, bn, bk, stages, a_bytes, b_bytes) > smem_limit:
                    continue  # does not fit even double-buffered
                for w in warps:
                    cfg = Config(bm, bn, bk, num_warps=w, num_stages=stages)
                    if cfg not in out:
                        out.append(cfg)
    return out[:MAX_CANDIDATES]


def split_variants(split: int, max_split: int) -> list[int]:
    """Split-K counts worth timing around a heuristic's `split`: half, same, double (within 1..max_split)."""
    values = {max(1, split // 2), split, min(max_split, split * 2)}
    return sorted(v for v in values if 1 <= v <= max(1, max_split))


_smem_limits: dict[int, int] = {}


def smem_limit(device: torch.device) -> int:
    """Shared memory one program may use on `device` (opt-in maximum), DEFAULT_SMEM_LIMIT if unknown."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return DEFAULT_SMEM_LIMIT
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _smem_limits:
        props = torch.cuda.get_device_properties(index)
        _smem_limits[index] = int(getattr(props, "shared_memory_per_block_optin", 0) or DEFAULT_SMEM_LIMIT)
    return _smem_limits[index]


_device_names: dict[int, str] = {}


def device_key(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3 (sm_90)': the device part of a cache key."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_names:
        major, minor = torch.cuda.get_device_capability(index)
        _device_names[index] = f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    return _device_names[index]


def _dtype_key(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cache_key(kernel: str, shape: dict, dtype: torch.dtype, device_name: str) -> str:
    """kernel|k1=v1,k2=v2|dtype|device|triton-X.Y.Z (shape items in the launcher's order)."""
    shape_text = ",".join(f"{k}={v}" for k, v in shape.items())
    return f"{kernel}|{shape_text}|{_dtype_key(dtype)}|{device_name}|triton-{triton.__version__}"


# --------------------------------------------------------------------------- #
# The cache file
# --------------------------------------------------------------------------- #
def cache_path() -> Path:
    """$FUSENET_TUNE_CACHE if set, else ~/.cache/fusenet/tune.json."""
    env = os.environ.get("FUSENET_TUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fusenet" / "tune.json"


_warned: set[tuple[str, str]] = set()


def _warn(path: Path, kind: str, message: str) -> None:
    """One warning line per cache path and kind ("read", "write") per process."""
    if (str(path), kind) in _warned:
        return
    _warned.add((str(path), kind))
    print(f"fusenet: autotune cache {path}: {message}", file=sys.stderr)


def _check_entry(entry: Any) -> None:
    if not isinstance(entry, dict):
        raise ValueError("an entry is not an object")
    Config.from_json(entry.get("config"))
    ms = entry.get("ms")
    if ms is not None and not isinstance(ms, (int, float)):
        raise ValueError(f"an entry's time is {ms!r}")


def _read_file(path: Path) -> tuple[dict, str | None]:
    """(entries, problem): the entries of a cache file, and a warning about it (or None).

    A missing file is an empty cache, not a problem. A file that is not a
    schema-1 cache counts as empty; individual malformed entries are dropped.
    """
    hint = "treating it as empty (the next tuning rewrites it; delete the file to start afresh)"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, None
    except (OSError, UnicodeDecodeError) as e:
        return {}, f"unreadable ({type(e).__name__}: {e}); {hint}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return {}, f"not valid JSON ({e}); {hint}"
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), dict):
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        return {}, f"not a fusenet tune cache of schema {SCHEMA} (its schema is {found!r}); {hint}"
    entries, bad = {}, 0
    for key, entry in data["entries"].items():
        try:
            _check_entry(entry)
        except ValueError:
            bad += 1
            continue
        entries[key] = entry
    return entries, (f"{bad} malformed entries ignored (the next tuning drops them; "
                     "delete the file to start afresh)" if bad else None)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path`.lock (POSIX); a no-op where locking is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield  # cannot create the lock file: the write will say what is wrong
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temp file in path's folder, then os.replace it over path."""
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)  # not sort_keys: a shape's items keep the launcher's order
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class TuneCache:
    """The tuned configs of one cache file, read on first use."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict | None = None
        self._ours: dict = {}  # entries this process tuned: they win over the file's when merging

    @property
    def entries(self) -> dict:
        if self._entries is None:
            self._entries, problem = _read_file(self.path)
            if problem:
                _warn(self.path, "read", problem)
        return self._entries

    def get(self, key: str) -> Config | None:
        entry = self.entries.get(key)
        return Config.from_json(entry["config"]) if entry is not None else None

    def put(self, key: str, entry: dict) -> None:
        """Store an entry here and in the file (merged with the file's current contents)."""
        self.entries[key] = entry
        self._ours[key] = entry
        self.save()

    def save(self) -> None:
        """Merge this process's entries into the file on disk; warn (once) instead of raising on failure."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path):
                on_disk, problem = _read_file(self.path)
                if problem:
                    _warn(self.path, "read", problem)
                merged = {**on_disk, **self._ours}
                _write_atomic(self.path, {"schema": SCHEMA, "entries": dict(sorted(merged.items()))})
            # the file now also holds what other processes tuned meanwhile
            self._entries = {**(self._entries or {}), **merged}
        except (OSError, TypeError, ValueError) as e:  # TypeError/ValueError: an entry JSON cannot hold
            _warn(self.path, "write", f"cannot write it ({type(e).__name__}: {e}); "
                                      "configs tuned now are kept for this process only")


_caches: dict[Path, TuneCache] = {}


def _cache() -> TuneCache:
    """The cache of the current cache_path(), loaded once per process (per path)."""
    path = cache_path()
    if path not in _caches:
        _caches[path] = TuneCache(path)
    return _caches[path]


def cache_entries() -> dict:
    """The entries of the current cache file (key -> entry), as this process sees them."""
    return dict(_cache().entries)


# --------------------------------------------------------------------------- #
# Modes
# --------------------------------------------------------------------------- #
@dataclass
class TuneStats:
    """What happened inside a tuning() block: keys tuned now and keys found cached."""

    tuned: list = field(default_factory=list)
    cached: set = field(default_factory=set)
    skipped: int = 0  # candidates that failed to compile or launch


_tuning_stack: list[TuneStats] = []
_forced_stack: list[tuple[Config, frozenset | None]] = []


@contextlib.contextmanager
def tuning() -> Iterator[TuneStats]:
    """Inside the block, a cache miss times the candidates and stores the winner (GPU only)."""
    stats = TuneStats()
    _tuning_stack.append(stats)
    try:
        yield stats
    finally:
        _tuning_stack.remove(stats)


def is_tuning() -> bool:
    """True inside tuning() or with FUSENET_TUNE=1 in the environment."""
    return bool(_tuning_stack) or os.environ.get("FUSENET_TUNE") == "1"


@contextlib.contextmanager
def forced(config: Config, kernels: Sequence[str] | None = None) -> Iterator[Config]:
    """Every hooked launcher (or those named in `kernels`) uses `config` inside the block.

    For tests: it applies under the interpreter too, and bypasses the cache.
    """
    item = (config, frozenset(kernels) if kernels is not None else None)
    _forced_stack.append(item)
    try:
        yield config
    finally:
        _forced_stack.remove(item)


def _forced_config(kernel: str) -> Config | None:
    for config, kernels in reversed(_forced_stack):
        if kernels is None or kernel in kernels:
            return config
    return None


# --------------------------------------------------------------------------- #
# Timing and selection
# --------------------------------------------------------------------------- #
def cuda_event_timer(fn: Callable[[], Any], repeats: int = 10) -> float:
    """Median milliseconds of `fn()` over `repeats` runs, each timed with CUDA events."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def benchmark(candidates: Sequence[Config], run: Callable[[Config], Any],
              timer: Callable[[Callable[[], Any]], float]) -> tuple[Config | None, dict, int]:
    """(fastest config or None if all failed, {config: ms}, number that failed).

    Each candidate runs once first (compiling it); one that raises (Triton's
    OutOfResources, a compile error) is skipped.
    """
    times: dict[Config, float] = {}
    failed = 0
    for cfg in candidates:
        try:
            run(cfg)
            times[cfg] = float(timer(lambda cfg=cfg: run(cfg)))
        except Exception:
            failed += 1
    best = min(times, key=times.get) if times else None
    return best, times, failed


def select(kernel: str, shape: dict, *, dtype: torch.dtype, device_name: str, default: Config,
           candidates: Callable[[], Sequence[Config]], run: Callable[[Config], Any], tune: bool,
           timer: Callable[[Callable[[], Any]], float] | None = None) -> Config:
    """The cached config for this key, else (tune=True) the fastest candidate, stored; else `default`.

    Device-agnostic (the device is only a name here): pick() decides whether a
    device may be tuned at all; tests call this with a fake timer.
    """
    cache = _cache()
    key = cache_key(kernel, shape, dtype, device_name)
    try:
        cached = cache.get(key)
    except ValueError:  # cannot happen for a validated file; a hand-edited in-memory entry
        cached = None
    if cached is not None:
        for stats in _tuning_stack:
            stats.cached.add(key)
        return cached
    if not tune:
        return default
    pool = [default] + [c for c in candidates() if c != default]
    started = time.perf_counter()
    best, times, failed = benchmark(pool, run, timer or cuda_event_timer)
    for stats in _tuning_stack:
        stats.skipped += failed
    if best is None:
        return default  # every candidate failed: the launch with the default reports why
    cache.put(key, {
        "kernel": kernel, "shape": dict(shape), "dtype": _dtype_key(dtype), "device": device_name,
        "triton": triton.__version__, "config": best.to_json(), "ms": times[best],
        "default_ms": times.get(default), "candidates": len(pool), "failed": failed,
        "tune_s": round(time.perf_counter() - started, 3),
    })
    for stats in _tuning_stack:
        stats.tuned.append(key)
    return best


def pick(kernel: str, shape: dict, *, dtype: torch.dtype, device: torch.device, default: Config,
         candidates: Callable[[], Sequence[Config]], run: Callable[[Config], Any],
         tunable: bool = True) -> Config:
    """The config a launcher should use for this launch (see the module docstring's modes).

    shape: what changes the best tile (sizes, kernel, stride, groups, epilogue
    flags), as {name: int | str | bool}. run(cfg) must launch with cfg and
    write, never accumulate, its outputs (it runs once per candidate, then once
    more for the real result). tunable=False: never time (e.g. an output aliases an input).
    """
    config = _forced_config(kernel)
    if config is not None:
        return config
    # The interpreter keeps its one interpreter-sized heuristic: its timings say
    # nothing about a GPU, and GPU tiles would only make it slower. Tensors off
    # CUDA (the AOT check sets INTERPRETED=False on a CPU machine) likewise.
    if _device.INTERPRETED or device.type != "cuda":
        return default
    # While launches are recorded (fusenet inspect, the AOT check) nothing is
    # timed: a dry run executes nothing, and every candidate would be recorded.
    recording = _launch._recorded is not None
    return select(kernel, shape, dtype=dtype, device_name=device_key(device), default=default,
                  candidates=candidates, run=run, tune=tunable and is_tuning() and not recording)


__all__ = ["Config", "TuneStats", "TuneCache", "pick", "select", "tuning", "forced", "is_tuning",
           "gemm_candidates", "gemm_smem_bytes", "split_variants", "epilogue_key", "smem_limit",
           "cache_path", "cache_entries", "cache_key", "benchmark", "cuda_event_timer", "SCHEMA"]
