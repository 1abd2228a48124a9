"""The pass pipeline, in one list, with the IR printable after each pass.

The graph arrives expanded and shape-checked from engine.ir.frontend. Passes are
pure functions; `run_pipeline` returns the final plan and, on request, the
text of the IR after every pass (`fusenet check FILE --ir`).
"""
from __future__ import annotations

from dataclasses import replace
from math import prod

from engine.ir.graph import Graph
from engine.passes.fusion import Kernel, plan_fusion, pretty_plan


def drop_eval_dropout(graph: Graph, training: bool) -> Graph:
    """In eval mode dropout is the identity: route its users to its input."""
    if training:
        return graph
    alias = {n.id: n.inputs[0] for n in graph if n.op == "dropout"}
    if not alias:
        return graph

    def resolve(i: int) -> int:
        while i in alias:
            i = alias[i]
        return i

    nodes = [replace(n, inputs=tuple(resolve(i) for i in n.inputs)) for n in graph if n.id not in alias]
    # renumber densely so node ids stay list positions
    new_id = {n.id: k for k, n in enumerate(nodes)}
    nodes = [replace(n, id=new_id[n.id], inputs=tuple(new_id[i] for i in n.inputs)) for n in nodes]
    taps = {t: new_id[resolve(i)] for t, i in graph.taps.items()}
    return replace(graph, nodes=tuple(nodes), taps=taps)


PASSES = (("drop_eval_dropout", drop_eval_dropout),)


def run_pipeline(graph: Graph, training: bool = True, verbose: bool = False):
    """Apply PASSES then plan fusion. Returns (graph, plan), or with verbose=True
    a list of (pass name, IR text) for printing."""
    trace = [("frontend (expand + shapes)", graph.pretty())]
    for name, fn in PASSES:
        graph = fn(graph, training)
        trace.append((name, graph.pretty()))
    plan = plan_fusion(graph, training)
    trace.append(("plan_fusion", pretty_plan(graph, plan)))
    return trace if verbose else (graph, plan)


_BACKWARD = {
    "conv": ["dgrad (implicit GEMM{act})", "wgrad (implicit GEMM, split-K{act})", "wgrad partial reduce"],
    "linear": ["dgrad (GEMM{act})", "wgrad (GEMM, split-K{act})", "wgrad partial reduce"],
    "bn": ["bn backward reduce (split{act})", "bn backward apply"],
    "pool": ["pool backward (gather)"],
    "global_pool": ["global pool backward"],
    "blurpool": ["blurpool backward (gather)"],
    "upsample": ["upsample backward (gather)"],
    "dropout": ["dropout backward (mask regenerated)"],
    "softmax": ["softmax backward"],
    "act": ["activation backward"],
    "pointwise": ["pointwise chain backward (links recomputed from the input)"],
    "add": [],
    "scale": ["scale backward"],
    "concat": ["concat backward (slices)"],
    "flatten": [],
}


def kernel_bytes(graph: Graph, kern: Kernel, batch: int, elem: int, in_place: set[int]) -> int:
    """Minimum HBM bytes of one forward kernel: external inputs read, parameters,
    the output written. A concat moves only the inputs not written in place by
    their producers; flatten of an image is a copy (NHWC to PyTorch's C, H, W
    order), of a vector nothing."""
    if kern.kind == "flatten" and len(graph.node(graph.node(kern.anchor).inputs[0]).shape) == 1:
        return 0  # already flat: a view
    if kern.kind == "concat":
        copied = [i for i in graph.node(kern.anchor).inputs if i not in in_place]
        return 2 * sum(prod(graph.node(i).shape) for i in copied) * batch * elem
    nodes = set(kern.nodes)
    total = 0
    for nid in kern.nodes:
        n = graph.node(nid)
        for i in n.inputs:
            if i not in nodes:
                total += prod(graph.node(i).shape) * batch * elem
        total += n.params * 4
    total += prod(graph.node(kern.output).shape) * batch * elem
    return total


def kernel_table(spec, batch: int | None = None, training: bool = True) -> str:
    """`fusenet check --kernels`: each kernel, the source lines fused into it,
    estimated FLOPs and minimum HBM bytes, forward and backward."""
    batch = batch or spec.train.batch
    graph, plan = run_pipeline(spec.graph, training)
    elem = 2 if spec.train.precision in ("fp16", "bf16") else 4
    rows = [("#", "kernel", "lines", "fuses", "GFLOP", "MB")]
    tot_f = tot_b = 0
    in_place = {k.output for k in plan if k.writes_into is not None}
    for k, kern in enumerate(plan):
        ns = [graph.node(i) for i in kern.nodes]
        lines = sorted({n.pos.line for n in ns})
        flops = sum(n.flops for n in ns) * batch
        nbytes = kernel_bytes(graph, kern, batch, elem, in_place)
        tot_f += flops
        tot_b += nbytes
        rows.append(
            (
                f"k{k}",
                kern.kind
                + (f" [{', '.join(kern.epilogue)}]" if kern.epilogue else "")
                + (f" -> into concat %{kern.writes_into[0]}" if kern.writes_into else ""),
                ",".join(map(str, lines)),
                " -> ".join(n.op for n in ns),
                f"{flops / 1e9:.4f}",
                f"{nbytes / 1e6:.2f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    out = [f"forward kernels ({'training' if training else 'inference'}, batch {batch}):"]
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            out.append("-" * len(out[-1]))
    out.append(f"{len(plan)} forward kernels, {tot_f / 1e9:.3f} GFLOP, {tot_b / 1e6:.1f} MB minimum HBM traffic")
    if training:
        out.append("")
        out.append("backward kernels (reverse order):")
        count = 0
        for k, kern in reversed(list(enumerate(plan))):
            acts = [e for e in kern.epilogue if e.startswith("act")]
            names = _BACKWARD.get(kern.kind, [])
            if kern.kind == "conv" and graph.node(kern.anchor).inputs == (0,):
                names = names[1:]  # no gradient needed for the network input
            if "dropout" in kern.epilogue:
                names = ["dropout backward (mask regenerated from the seed)"] + names
            if "add" in kern.epilogue:
                names = ["activation backward (materialises the residual gradient)"] + [n.format(act="") for n in names]
            else:
                names = [n.format(act=", act grad fused on load" if acts else "") for n in names]
            if kern.kind == "act":
                names = [f"{graph.node(kern.anchor).op} backward"]
            if kern.kind == "add" and acts:
                names = ["activation backward (gradient shared by both branches)"]
            for name in names:
                out.append(f"  k{k}.b: {name}")
                count += 1
        out.append(f"{count} backward kernels + 1 fused cross-entropy (loss and gradient) + 1 optimizer launch per step")
    return "\n".join(out)
