"""Ahead-of-time GPU compile check and SASS inspector.

Collect the kernel variants a network launches (`engine.kernels.launch.recording`),
compile each for sm_80 (A100) and/or sm_90 (H100) with Triton's real compiler
(no GPU needed: Triton lowers to PTX and runs the `ptxas` shipped in its wheel),
and report per variant: registers per thread, spill bytes, shared memory, the
tensor-core (MMA) instructions in the SASS and the total instruction count.

    from engine.perf.aot import inspect_network, format_report
    print(format_report(inspect_network(lambda: net(x), targets=("sm_80", "sm_90"))))

Public API: `KernelReport`, `compile_specialization`, `compile_all`,
`format_report`, `inspect_network`, `record_network`, `clear_cache`,
`constexpr_tag`, `spec_tag`, `TARGETS`, and `gpu_tiles` (engine.device's).

The check is four modules:
- aot.py         this API: what to compile, from the caches or in workers;
- aot_worker.py  the compile worker (`python -m engine.perf.aot_worker`), a fresh
                 process with Triton's interpreter off, and the parent's side
                 of its protocol; why a process and what it reads off ptxas and
                 the SASS are described there;
- aot_cache.py   the in-process and on-disk caches of compile results;
- aot_report.py  KernelReport, the targets, constexpr tags and the text table.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from engine.device import gpu_tiles
from engine.kernels.launch import Specialization, recording
from engine.perf import aot_cache
from engine.perf.aot_cache import clear_cache
from engine.perf.aot_report import (TARGETS, KernelReport, constexpr_tag, format_report, make_report,
                                    normalise_target, spec_tag)
from engine.perf.aot_worker import job_for, run_worker


def _run_shards(todo: list[tuple[int, dict, str | None]], jobs: int) -> list[tuple[tuple[int, dict, str | None], tuple]]:
    """Compile the jobs of `todo` split across `jobs` worker processes; (todo item, result) pairs."""
    n = max(1, min(int(jobs), len(todo)))
    shards = [todo[k::n] for k in range(n)]
    results: list[list] = [[] for _ in range(n)]

    def work(k: int) -> None:
        # generous: a big fused kernel takes ~10 s; the worker's start-up a few more
        results[k] = run_worker([job for _, job, _ in shards[k]], timeout=60 + 120 * len(shards[k]))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return [pair for shard, res in zip(shards, results) for pair in zip(shard, res)]


def compile_all(specs: Sequence[Specialization], targets: Sequence[str] = ("sm_80", "sm_90"),
                jobs: int = 2) -> list[KernelReport]:
    """Compile every (spec, target) pair; one report per pair, in order (specs outer, targets inner).

    Uncached pairs are split across `jobs` worker processes. A variant that fails
    to compile gets a report whose `error` says why (kernel name in `name`).
    """
    targets = [normalise_target(t) for t in targets]
    pairs = [(s, t) for s in specs for t in targets]
    reports: list[KernelReport | None] = [None] * len(pairs)
    todo: list[tuple[int, dict, str | None]] = []  # (pair index, job, disk key)
    pending: dict[Any, list[int]] = {}  # memory key -> pair indices waiting for that compile
    for i, (spec, t) in enumerate(pairs):
        mk = aot_cache.memory_key(spec, t)
        hit = aot_cache.recall(mk)
        if hit is not None:
            reports[i] = hit
            continue
        if mk in pending:  # same variant twice in the input
            pending[mk].append(i)
            continue
        try:
            dk = aot_cache.disk_key(spec, t)
        except Exception:  # noqa: BLE001 - no disk caching for a variant whose sources cannot be hashed
            dk = None
        data = aot_cache.disk_load(dk) if dk else None
        if data is not None:
            reports[i] = make_report(spec, t, data, None, cached=True)
            aot_cache.remember(mk, reports[i])
            continue
        try:
            job = job_for(spec, TARGETS[t])
        except Exception as e:  # noqa: BLE001
            reports[i] = make_report(spec, t, None, f"{type(e).__name__}: {e}", cached=False)
            continue
        pending[mk] = [i]
        todo.append((i, job, dk))

    for (i, job, dk), (status, val) in (_run_shards(todo, jobs) if todo else []):
        spec, t = pairs[i]
        mk = aot_cache.memory_key(spec, t)
        if status == "ok":
            rep = make_report(spec, t, val, None, cached=False)
            aot_cache.remember(mk, rep)
            if dk:
                aot_cache.disk_store(dk, val, {"kernel": spec.name, "tag": rep.tag, "target": t,
                                               "triton": aot_cache.triton_version(),
                                               "ptxas_log": val.get("ptxas_log", "")})
        else:
            rep = make_report(spec, t, None, str(val), cached=False)
            if not str(val).startswith("compile worker died"):  # a deterministic compile error
                aot_cache.remember(mk, rep)
        for j in pending[mk]:
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
