"""The analytic performance model: what a network's kernels must compute and
move, fused against unfused, and the fastest an H100 could run them.

Without a GPU, `fusenet bench` prints this instead of timings. Definitions:
- FLOPs: the IR's forward FLOPs (multiply-add = 2). An op's backward FLOPs are
  its forward FLOPs times its registry entry's `backward_flops` (a GEMM's
  backward is a dgrad plus a wgrad: 2x).
- Minimum HBM bytes (`group_bytes`): each kernel group reads its external
  inputs and parameters once and writes its output once. A concat moves only
  the inputs its producers did not write in place; flatten of an image is a
  copy (NHWC to PyTorch's C, H, W order), of a vector nothing. A group's
  backward reads what its forward read plus the incoming gradient, and writes
  the input gradient: modelled as twice its forward bytes.
- Unfused: every IR node its own kernel, as PyTorch eager runs the same
  network (a conv, then a batch norm, then an activation, ...).
- Roofline floor: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth), per kernel,
  summed: no real kernel beats it.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

from engine.ir.ops import Family, family, op
from engine.passes.pipeline import run_pipeline
from engine.passes.plan import KernelGroup, Plan, describe_group
from engine.perf.peaks import H100
from engine.precision import PRECISIONS
from engine.text import format_table

@dataclass(frozen=True)
class GroupCost:
    name: str
    family: str
    lines: tuple[int, ...]
    flops: int  # forward
    backward_flops: int
    bytes: int  # forward minimum HBM traffic

    @property
    def backward_bytes(self) -> int:
        return 2 * self.bytes


def group_bytes(plan: Plan, group: KernelGroup, batch: int, elem: int) -> int:
    """Minimum HBM bytes of one forward kernel group (see the module docstring)."""
    graph = plan.graph
    anchor = graph.node(group.anchor)
    if group.family is Family.FLATTEN and len(graph.node(anchor.inputs[0]).shape) == 1:
        return 0  # already flat: a view
    if group.family is Family.CONCAT:
        copied = [i for i in anchor.inputs if i not in group.in_place]
        return 2 * sum(prod(graph.node(i).shape) for i in copied) * batch * elem
    members = set(group.nodes)
    total = 0
    for n in plan.nodes_of(group):
        total += sum(prod(graph.node(i).shape) for i in n.inputs if i not in members) * batch * elem
        total += n.params * 4
    return total + prod(graph.node(group.output).shape) * batch * elem


def group_costs(plan: Plan, batch: int, elem: int) -> list[GroupCost]:
    costs = []
    for i, group in enumerate(plan):
        nodes = plan.nodes_of(group)
        costs.append(GroupCost(
            name=f"g{i} " + " -> ".join(n.op for n in nodes),
            family=group.family.value,
            lines=tuple(sorted({n.pos.line for n in nodes})),
            flops=sum(n.flops for n in nodes) * batch,
            backward_flops=int(sum(n.flops * op(n.op).backward_flops for n in nodes) * batch),
            bytes=group_bytes(plan, group, batch, elem),
        ))
    return costs


def unfused_plan(plan: Plan) -> Plan:
    """One kernel group per IR node: PyTorch eager's op sequence for the same network."""
    groups = tuple(KernelGroup(family(n), (n.id,)) for n in plan.graph if n.op != "input")
    return Plan(plan.graph, groups, plan.training)


def _floor_s(flops: float, nbytes: float, precision: str) -> float:
    return max(flops / H100["flops_per_s"][precision], nbytes / H100["hbm_bytes_per_s"])


def analytic_report(spec, batch: int | None = None, precision: str | None = None) -> dict:
    """The analytic model as plain data (JSON-ready): per fused kernel group, and
    totals for the forward pass and a training step, fused and unfused."""
    batch = batch or spec.train.batch
    precision = precision or spec.train.precision
    elem = PRECISIONS[precision].bytes
    plan = run_pipeline(spec.graph, training=True)
    fused = group_costs(plan, batch, elem)
    unfused = group_costs(unfused_plan(plan), batch, elem)

    def totals(costs: list[GroupCost]) -> dict:
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

    def bound(c: GroupCost) -> str:
        return "compute" if c.flops / H100["flops_per_s"][precision] > c.bytes / H100["hbm_bytes_per_s"] else "memory"

    return {
        "network": plan.graph.name,
        "batch": batch,
        "precision": precision,
        "device_model": H100["name"],
        "kernels": [
            {"name": c.name, "kind": c.family, "lines": list(c.lines), "flops": c.flops, "bytes": c.bytes,
             "floor_us": 1e6 * _floor_s(c.flops, c.bytes, precision), "bound": bound(c)}
            for c in fused
        ],
        "fused": totals(fused),
        "unfused": totals(unfused),
    }


def format_analytic(report: dict) -> str:
    rows = [(k["name"][:48], ",".join(map(str, k["lines"])), f"{k['flops'] / 1e9:.3f}", f"{k['bytes'] / 1e6:.2f}",
             f"{k['floor_us']:.2f}", k["bound"]) for k in report["kernels"]]
    out = [f"{report['network']}: analytic model, batch {report['batch']}, {report['precision']}, "
           f"roofline floors on an {report['device_model']}",
           format_table(("kernel", "lines", "GFLOP", "MB", "floor us", "bound"), rows, align="llrrrl"), ""]
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


def format_group_costs(plan: Plan, batch: int, precision: str) -> str:
    """`fusenet check --kernels`: each kernel group, its source lines, what it
    fuses, its FLOPs and minimum HBM bytes (forward)."""
    costs = group_costs(plan, batch, PRECISIONS[precision].bytes)
    rows = [(f"g{k}", c.family, ",".join(map(str, c.lines)), describe_group(plan, group), f"{c.flops / 1e9:.4f}",
             f"{c.bytes / 1e6:.2f}") for k, (group, c) in enumerate(zip(plan, costs))]
    mode = "training" if plan.training else "inference"
    out = [f"forward kernel groups ({mode}, batch {batch}, {precision}):",
           format_table(("#", "family", "lines", "fuses", "GFLOP", "MB"), rows, align="llllr")]
    out.append(f"{len(plan)} kernel groups, {sum(c.flops for c in costs) / 1e9:.3f} GFLOP, "
               f"{sum(c.bytes for c in costs) / 1e6:.1f} MB minimum HBM traffic (forward)")
    return "\n".join(out)


def kernel_report(spec, batch: int | None = None, training: bool = True, precision: str | None = None) -> str:
    """`fusenet check --kernels`: each kernel group's FLOPs and minimum HBM bytes,
    then the plan with the kernels each group launches on a GPU (a dry run)."""
    from engine.runtime.fused import TritonNetwork
    from engine.runtime.launches import format_launches, record_launches

    batch = batch or spec.train.batch
    precision = precision or spec.train.precision
    launches = record_launches(TritonNetwork(spec, precision=precision), batch, training=training)
    return format_group_costs(launches.plan, batch, precision) + "\n\n" + format_launches(launches)
