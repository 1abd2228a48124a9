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

The configs and their candidates are in engine.kernels.tune_config, the cache
file (one per machine, locked and replaced atomically on write) in
engine.kernels.tune_cache.

Public API: pick, select, tuning, forced, is_tuning, TuneStats, benchmark,
cuda_event_timer, device_key.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import triton

from engine import device as _device
from engine.kernels import launch as _launch
from engine.kernels.tune_cache import cache_key, current_cache, dtype_key
from engine.kernels.tune_config import Config

_device_names: dict[int, str] = {}


def device_key(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3 (sm_90)': the device part of a cache key."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_names:
        major, minor = torch.cuda.get_device_capability(index)
        _device_names[index] = f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    return _device_names[index]


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
    cache = current_cache()
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
        "kernel": kernel, "shape": dict(shape), "dtype": dtype_key(dtype), "device": device_name,
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
    recording = _launch.is_recording()
    return select(kernel, shape, dtype=dtype, device_name=device_key(device), default=default,
                  candidates=candidates, run=run, tune=tunable and is_tuning() and not recording)


__all__ = ["pick", "select", "tuning", "forced", "is_tuning", "TuneStats", "benchmark", "cuda_event_timer",
           "device_key"]
