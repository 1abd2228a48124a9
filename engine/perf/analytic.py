"""The analytic performance model: what a network's kernels must compute and
move, fused against unfused, and the fastest an H100 could run them.

Without a GPU, `fusenet bench` prints this instead of timings. Definitions:
- FLOPs: the IR's forward FLOPs (multiply-add = 2). The backward of a conv or
  linear is a dgrad plus a wgrad (2x its forward FLOPs); other ops' backward
  FLOPs equal their forward FLOPs.
- Minimum HBM bytes: each kernel reads its inputs and parameters once and
  writes its output once (engine.passes.pipeline.kernel_bytes). A kernel's
  backward reads what its forward read plus the incoming gradient, and writes
  the input gradient: modelled as twice its forward bytes.
- Unfused: every IR node its own kernel, as PyTorch eager runs the same
  network (a conv, then a batch norm, then an activation, ...).
- Roofline floor: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth), per kernel,
  summed: no real kernel beats it.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.ir.graph import Graph
from engine.passes.fusion import Kernel
from engine.passes.pipeline import kernel_bytes, run_pipeline

# H100 SXM (design section 5): dense tensor-core peaks, and HBM3 bandwidth
H100 = {
    "name": "H100 SXM",
    "hbm_bytes_per_s": 3.35e12,
    "flops_per_s": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
}
GEMM_KINDS = ("conv", "linear")


@dataclass(frozen=True)
class KernelCost:
    name: str
    kind: str
    lines: tuple[int, ...]
    flops: int  # forward
    bytes: int  # forward minimum HBM traffic

    @property
    def backward_flops(self) -> int:
        return self.flops * (2 if self.kind in GEMM_KINDS else 1)

    @property
    def backward_bytes(self) -> int:
        return 2 * self.bytes


def _floor_s(flops: float, nbytes: float, precision: str) -> float:
    return max(flops / H100["flops_per_s"][precision], nbytes / H100["hbm_bytes_per_s"])


def kernel_costs(graph: Graph, plan: tuple[Kernel, ...], batch: int, elem: int) -> list[KernelCost]:
    in_place = {k.output for k in plan if k.writes_into is not None}
    costs = []
    for i, kern in enumerate(plan):
        nodes = [graph.node(n) for n in kern.nodes]
        costs.append(
            KernelCost(
                name=f"k{i} " + " -> ".join(n.op for n in nodes),
                kind=kern.kind,
                lines=tuple(sorted({n.pos.line for n in nodes})),
                flops=sum(n.flops for n in nodes) * batch,
                bytes=kernel_bytes(graph, kern, batch, elem, in_place),
            )
        )
    return costs


def unfused_plan(graph: Graph) -> tuple[Kernel, ...]:
    """One kernel per IR node: PyTorch eager's op sequence for the same network."""
    from engine.passes.fusion import _FAMILY

    return tuple(Kernel(_FAMILY[n.op], (n.id,)) for n in graph if n.op != "input")


def analytic_report(spec, batch: int | None = None, precision: str | None = None) -> dict:
    """The analytic model as plain data (JSON-ready): per fused kernel, and totals
    for the forward pass and a training step, fused and unfused."""
    batch = batch or spec.train.batch
    precision = precision or spec.train.precision
    elem = 2 if precision in ("fp16", "bf16") else 4
    graph, plan = run_pipeline(spec.graph, training=True)
    fused = kernel_costs(graph, plan, batch, elem)
    unfused = kernel_costs(graph, unfused_plan(graph), batch, elem)

    def totals(costs: list[KernelCost]) -> dict:
        fwd_f, fwd_b = sum(c.flops for c in costs), sum(c.bytes for c in costs)
        step_f = fwd_f + sum(c.backward_flops for c in costs)
        step_b = fwd_b + sum(c.backward_bytes for c in costs)
        return {
            "kernels": len(costs),
            "forward": {"flops": fwd_f, "bytes": fwd_b,
                        "floor_s": sum(_floor_s(c.flops, c.bytes, precision) for c in costs)},
            "step": {"flops": step_f, "bytes": step_b,
                     "floor_s": sum(_floor_s(c.flops, c.bytes, precision)
                                    + _floor_s(c.backward_flops, c.backward_bytes, precision) for c in costs)},
        }

    return {
        "network": graph.name,
        "batch": batch,
        "precision": precision,
        "device_model": H100["name"],
        "kernels": [
            {"name": c.name, "kind": c.kind, "lines": list(c.lines), "flops": c.flops, "bytes": c.bytes,
             "floor_us": 1e6 * _floor_s(c.flops, c.bytes, precision),
             "bound": "compute" if c.flops / H100["flops_per_s"][precision] > c.bytes / H100["hbm_bytes_per_s"] else "memory"}
            for c in fused
        ],
        "fused": totals(fused),
        "unfused": totals(unfused),
    }


def format_analytic(report: dict) -> str:
    rows = [("kernel", "lines", "GFLOP", "MB", "floor us", "bound")]
    for k in report["kernels"]:
        rows.append((k["name"][:48], ",".join(map(str, k["lines"])), f"{k['flops'] / 1e9:.3f}",
                     f"{k['bytes'] / 1e6:.2f}", f"{k['floor_us']:.2f}", k["bound"]))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    out = [f"{report['network']}: analytic model, batch {report['batch']}, {report['precision']}, "
           f"roofline floors on an {report['device_model']}"]
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i < 2 or i == 5 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            out.append("-" * len(out[-1]))
    out.append("")
    out.append(f"{'':24}{'kernels':>9}{'GFLOP':>10}{'HBM MB':>10}{'floor ms':>10}")
    for label, part in (("forward", "forward"), ("training step", "step")):
        for name in ("fused", "unfused"):
            t = report[name]
            out.append(f"{label + ' ' + name:24}{t['kernels']:>9}{t[part]['flops'] / 1e9:>10.3f}"
                       f"{t[part]['bytes'] / 1e6:>10.1f}{1e3 * t[part]['floor_s']:>10.3f}")
    f, u = report["fused"]["step"], report["unfused"]["step"]
    out.append(f"fusion saves {100 * (1 - f['bytes'] / u['bytes']):.0f}% of the training step's minimum HBM "
               f"traffic; floor {1e3 * u['floor_s']:.3f} ms unfused -> {1e3 * f['floor_s']:.3f} ms fused")
    return "\n".join(out)
