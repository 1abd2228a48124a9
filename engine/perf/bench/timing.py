"""Timing a closure the way the GPU sees it.

Rules, and why:
- Device events around each repeat, not host clocks: a launch returns before
  the kernel ends. The time between two events includes any gap the host
  leaves between launches, which is what makes small networks launch-bound and
  what CUDA graphs remove, so it is kept.
- Warm-up first (Triton JIT, cuDNN benchmark search, torch.compile, autotune,
  allocator growth), then the median of many repeats (robust to a stray slow
  repeat); the 20th and 80th percentiles show the spread.
- Inputs rotate through a pool bigger than the L2 cache, so a repeat never
  finds its input already on chip, as in a real training loop.
- With CUDA graphs, one graph is captured per input slot (sharing one memory
  pool), so rotation costs no extra copy inside the timed region.

On a machine without CUDA the same code times with the host clock; that exists
only so the harness itself can be tested without a GPU (interpreted kernels
time the interpreter, so `fusenet bench` never reports such numbers).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int

    @staticmethod
    def of(samples_ms: list[float]) -> "Timing":
        s = sorted(samples_ms)
        pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
        return Timing(statistics.median(s), pick(0.2), pick(0.8), len(s))


def rotation_slots(bytes_per_slot: int, l2_bytes: int, lo: int = 2, hi: int = 16) -> int:
    """How many input copies to rotate through so that together they overflow the
    L2 twice over (at least `lo`, at most `hi`)."""
    need = math.ceil(2 * l2_bytes / max(1, bytes_per_slot))
    return max(lo, min(hi, need))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run: Callable[[int], object], device: torch.device, *, warmup: int = 5, repeats: int = 50,
            max_seconds: float | None = None) -> Timing:
    """Time `run(i)` (i = the call index, for rotating inputs): `warmup` untimed
    calls, then `repeats` timed ones, each between its own pair of device events.
    `max_seconds` caps the timed phase for slow contenders (at least 5 repeats),
    from the pace of the warm-up; nothing synchronises inside the timed loop, so
    the host can run ahead of the GPU as it does in training."""
    t0 = time.perf_counter()
    for i in range(warmup):
        run(i)
        if i == 0:  # the first call compiles; pace the rest
            synchronize(device)
            t0 = time.perf_counter()
    synchronize(device)
    if max_seconds is not None and warmup > 1:
        per_call = (time.perf_counter() - t0) / (warmup - 1)
        repeats = max(min(5, repeats), min(repeats, int(max_seconds / max(per_call, 1e-9))))
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for i, (start, end) in enumerate(events):
            start.record()
            run(warmup + i)
            end.record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) for s, e in events]
    else:
        samples = []
        for i in range(repeats):
            a = time.perf_counter()
            run(warmup + i)
            samples.append(1e3 * (time.perf_counter() - a))
    return Timing.of(samples)


class GraphedSlots:
    """One CUDA graph per input slot of `fn(slot)`, captured after a warm-up on a
    side stream (as torch.cuda.graph requires) and sharing one memory pool.

    `fn` must be capturable: no host synchronisation, no CPU-GPU copies from
    pageable memory, same shapes every call. Raises RuntimeError naming the
    slot if capture fails.
    """

    def __init__(self, fn: Callable[[int], object], slots: int, warmup: int = 3):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(warmup):
                fn(i % slots)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.outputs: list[object] = []
        pool = None
        for slot in range(slots):
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g, pool=pool):
                    self.outputs.append(fn(slot))
            except Exception as e:
                raise RuntimeError(f"CUDA graph capture failed (slot {slot}): {type(e).__name__}: {e}") from None
            pool = g.pool()
            self.graphs.append(g)

    def __call__(self, i: int) -> object:
        slot = i % len(self.graphs)
        self.graphs[slot].replay()
        return self.outputs[slot]
