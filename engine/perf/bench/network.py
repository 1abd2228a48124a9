"""A whole network against the baselines: every contender, batch size, mode
(forward, training step) and CUDA graphs setting, in one process.

Before anything is timed, each baseline's eval-mode output is compared with
fusenet's on the same input and weights (and, for networks without dropout,
the first training step's loss), so a fast but wrong number is flagged, never
reported as a win. The rows are plain dicts (see results.py).
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Callable

import torch

from engine.kernels.params import flush_uploads
from engine.perf.analytic import analytic_report
from engine.precision import PRECISIONS
from engine.perf.bench.contenders import InputPool, build, matmul_precision
from engine.perf.bench.roster import BASELINES, LABELS
from engine.perf.bench.devices import device_info, mfu
from engine.perf.bench.timing import GraphedSlots, measure, rotation_slots

MODES = ("forward", "step")
# norm-wise relative error allowed between a baseline's output and fusenet's
CHECK_TOL = {p.name: p.agreement_tol for p in PRECISIONS.values()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _has_dropout(spec) -> bool:
    return any(n.op == "dropout" and float(n.attrs.get("p", 0)) > 0 for n in spec.graph)


def bench_network(source: str | Path, batches: list[int], precision: str, *,
                  contenders: tuple[str, ...] = ("fusenet",) + BASELINES, graphs: tuple[bool, ...] = (False, True),
                  modes: tuple[str, ...] = MODES, device: torch.device | str | None = None, warmup: int = 5,
                  repeats: int = 50, max_seconds: float = 10.0, slots: int | None = None,
                  log: Callable[[str], None] | None = None) -> list[dict]:
    """Rows of results (one per network x batch x mode x contender x graphs)."""
    import engine

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = device_info(device)
    spec = engine.load(source)
    if device.type != "cuda":
        graphs = tuple(g for g in graphs if not g)  # CUDA graphs need CUDA
    rows: list[dict] = []
    for batch in batches:
        model_flops = analytic_report(spec, batch, precision)["fused"]
        flops = {"forward": model_flops["forward"]["flops"], "step": model_flops["step"]["flops"]}
        torch.manual_seed(0)
        state = engine.compile(source, backend="torch").state_dict()
        n_slots = slots or rotation_slots(InputPool.slot_bytes(spec, batch), info["l2_bytes"])
        pool = InputPool.make(spec, batch, n_slots, device)
        reference = None  # fusenet's eval output and first-step loss, for the checks
        for name in contenders:
            for use_graphs in graphs:
                base = {"network": spec.graph.name, "batch": batch, "precision": precision,
                        "contender": name, "label": LABELS[name], "graphs": use_graphs}
                try:
                    c = build(name, source, state, precision, pool, graphs=use_graphs)
                except Exception as e:
                    for mode in modes:
                        rows.append({**base, "mode": mode, "error": f"build failed: {type(e).__name__}: {e}"})
                    log(f"  {LABELS[name]}: build failed: {e}")
                    continue
                check = _check(c, reference, precision, spec, modes)
                if name == "fusenet" and reference is None:
                    reference = check.pop("_reference")
                check.pop("_reference", None)
                for mode in modes:
                    row = {**base, "mode": mode, "check": check, "notes": c.notes}
                    try:
                        with matmul_precision(precision):
                            c.train(mode == "step")
                            fn = c.step if mode == "step" else c.forward
                            run = GraphedSlots(fn, n_slots) if use_graphs else fn
                            flush_uploads()  # fusenet's optimizer tables for the captured graphs
                            t = measure(run, device, warmup=warmup, repeats=repeats, max_seconds=max_seconds)
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {e}"
                        log(f"  {spec.graph.name} b{batch} {mode:7} {c.label:28} graphs={use_graphs!s:5} "
                            f"failed: {row['error'][:200]}")
                        rows.append(row)
                        continue
                    seconds = t.median_ms / 1e3
                    row.update(ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, repeats=t.repeats,
                               images_per_s=batch / seconds, flops=flops[mode],
                               tflops=flops[mode] / seconds / 1e12, mfu=mfu(flops[mode], seconds, precision, info))
                    rows.append(row)
                    flag = "" if check.get("ok", True) else "  OUTPUT MISMATCH"
                    log(f"  {spec.graph.name} b{batch} {mode:7} {c.label:28} graphs={use_graphs!s:5} "
                        f"{t.median_ms:9.3f} ms{flag}")
                del c
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _check(c, reference: dict | None, precision: str, spec, modes) -> dict:
    """The contender's eval output (and first-step loss) against fusenet's."""
    out = c.output(0)
    result: dict = {"tol": CHECK_TOL[precision]}
    loss = None
    if "step" in modes and not _has_dropout(spec):
        c.train(True)
        with matmul_precision(precision):
            loss = float(c.step(0))
        result["loss"] = loss
    if reference is None:  # fusenet itself: the reference for the baselines
        result.update(ok=True, rel_err=0.0, _reference={"out": out, "loss": loss})
        return result
    err = rel_err(out, reference["out"])
    result["rel_err"] = err
    ok = err <= result["tol"]
    if loss is not None and reference["loss"] is not None:
        loss_err = abs(loss - reference["loss"]) / max(abs(reference["loss"]), 1e-6)
        result["loss_rel_err"] = loss_err
        ok = ok and loss_err <= result["tol"]
    result["ok"] = bool(ok)
    return result
