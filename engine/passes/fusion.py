"""Fusion planning: group IR nodes into the kernels that will run.

A plan is a tuple of `Kernel`s in execution order; each owns a run of nodes
and is launched when its last node's value is due. Rules (why in brackets):
- conv absorbs what follows it while the value has one user: in eval mode a
  `bn` (folded into a per-channel scale and shift), then a residual/skip
  `add`, then an activation; linear absorbs an activation; in training both
  then absorb a `dropout` [epilogue work costs no extra HBM round trip].
- In training mode a `bn` after a conv cannot be folded (it needs the batch
  statistics of the conv output); the `bn` kernel (split statistics, finalize,
  normalize) absorbs the following activation [one pass instead of two].
- `add` absorbs one following activation; a run of unary pointwise ops
  (activations, `scale`) becomes one chain kernel; everything else is its own
  kernel.
A node whose value has several users ends its group, so no value is lost.
- A conv whose output only feeds a `concat` writes into its channel slice of
  the concat's buffer (plan_concat_writes) [concat without a copy].
- In training, a conv whose output only feeds a `bn` computes the bn's
  batch statistics in its epilogue (plan_conv_stats) [one read fewer].
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from engine.ir.graph import ACTIVATION_OPS, Graph, Node


@dataclass(frozen=True)
class Kernel:
    kind: str  # conv | linear | bn | add | act | pool | ... (the anchor op family)
    nodes: tuple[int, ...]  # IR node ids, in order; the last one is the output
    epilogue: tuple[str, ...] = ()  # what the anchor's epilogue fuses: bias, bn, add, act:NAME, dropout
    writes_into: tuple[int, int] | None = None  # (concat node, first channel): output written in place

    @property
    def anchor(self) -> int:
        return self.nodes[0]

    @property
    def output(self) -> int:
        return self.nodes[-1]


_FAMILY = {
    "conv": "conv",
    "linear": "linear",
    "bn": "bn",
    "maxpool": "pool",
    "avgpool": "pool",
    "global_avgpool": "global_pool",
    "global_maxpool": "global_pool",
    "blurpool": "blurpool",
    "upsample": "upsample",
    "dropout": "dropout",
    "softmax": "softmax",
    "add": "add",
    "scale": "scale",
    "concat": "concat",
    "flatten": "flatten",
    **{a: "act" for a in ACTIVATION_OPS},
}


# unary elementwise ops a pointwise-chain kernel runs back to back (at most
# CHAIN_MAX, engine.kernels.pointwise's limit)
UNARY_POINTWISE = ACTIVATION_OPS + ("scale",)
CHAIN_MAX = 4


def _single_user(graph: Graph, node: Node, users: dict[int, list[int]]) -> Node | None:
    """The only consumer of `node`'s value, if it has exactly one and is not an output/tap."""
    if node.id in graph.taps.values() or node.id == graph.output.id:
        return None
    us = users.get(node.id, [])
    return graph.node(us[0]) if len(us) == 1 else None


def plan_fusion(graph: Graph, training: bool) -> tuple[Kernel, ...]:
    users: dict[int, list[int]] = {}
    for n in graph:
        for i in n.inputs:
            users.setdefault(i, []).append(n.id)
    taken: set[int] = set()
    kernels: list[Kernel] = []

    for node in graph:
        if node.op == "input" or node.id in taken:
            continue
        group, epilogue = [node.id], []
        cur = node

        def absorb(op_test) -> bool:
            nonlocal cur
            nxt = _single_user(graph, cur, users)
            if nxt is None or nxt.id in taken or not op_test(nxt) or nxt.inputs[0] != cur.id:
                return False
            group.append(nxt.id)
            cur = nxt
            return True

        if node.op in ("conv", "linear"):
            if node.attrs.get("bias"):
                epilogue.append("bias")
            # Training-mode bn needs batch statistics of the conv output, so it
            # stays a kernel of its own; the conv's epilogue computes those
            # statistics as per-tile partial sums (plan_conv_stats).
            if not training and node.op == "conv" and absorb(lambda n: n.op == "bn"):
                epilogue.append("bn")
            # The epilogue computes act(acc [+bias] [*scale+shift] [+residual]):
            # an activation either ends it or follows a residual add.
            if node.op == "conv" and absorb(lambda n: n.op == "add"):
                epilogue.append("add")
            if absorb(lambda n: n.op in ACTIVATION_OPS):
                epilogue.append(f"act:{cur.op}")
            # training-mode dropout is the last epilogue step (its mask comes from a
            # seed, so the backward regenerates it instead of storing it)
            if training and absorb(lambda n: n.op == "dropout"):
                epilogue.append("dropout")
        elif node.op == "bn":
            if absorb(lambda n: n.op in ACTIVATION_OPS):
                epilogue.append(f"act:{cur.op}")
        elif node.op == "add":
            if absorb(lambda n: n.op in ACTIVATION_OPS):
                epilogue.append(f"act:{cur.op}")
        elif node.op in UNARY_POINTWISE:
            while len(group) < CHAIN_MAX and absorb(lambda n: n.op in UNARY_POINTWISE):
                pass
        taken.update(group)
        kind = "pointwise" if node.op in UNARY_POINTWISE and len(group) > 1 else _FAMILY[node.op]
        kernels.append(Kernel(kind, tuple(group), tuple(epilogue)))

    kernels.sort(key=lambda k: k.output)
    _check_order(graph, kernels)
    return plan_conv_stats(graph, plan_concat_writes(graph, tuple(kernels)), training)


def plan_conv_stats(graph: Graph, kernels: tuple[Kernel, ...], training: bool) -> tuple[Kernel, ...]:
    """In training, a conv whose output feeds only a batch norm emits that
    batch norm's statistics: per-tile partial sums of its output from the
    epilogue [the bn kernel then skips its statistics pass, one read of the
    conv output fewer]. Only when the conv's output is its pre-activation (no
    activation, residual or dropout in its epilogue), which in training is the
    case whenever a bn follows."""
    if not training:
        return kernels
    readers: dict[int, list[Node]] = {}
    for n in graph:
        for i in n.inputs:
            readers.setdefault(i, []).append(n)
    out = list(kernels)
    for i, kern in enumerate(kernels):
        if kern.kind != "conv" or kern.writes_into is not None:
            continue
        if any(e.startswith("act:") or e in ("add", "dropout") for e in kern.epilogue):
            continue
        users = readers.get(kern.output, [])
        if len(users) == 1 and users[0].op == "bn" and users[0].inputs[0] == kern.output:
            out[i] = replace(kern, epilogue=kern.epilogue + ("stats",))
    return tuple(out)


def plan_concat_writes(graph: Graph, kernels: tuple[Kernel, ...]) -> tuple[Kernel, ...]:
    """A conv whose output only feeds a `concat` writes it straight into its
    channel slice of the concat's buffer [no copy]; the concat kernel then only
    copies in the inputs whose producers could not (a tap with other readers)."""
    producer = {k.output: i for i, k in enumerate(kernels)}
    readers: dict[int, int] = {}
    for n in graph:
        for i in n.inputs:
            readers[i] = readers.get(i, 0) + 1
    out = list(kernels)
    for i, kern in enumerate(kernels):
        if kern.kind != "concat":
            continue
        node = graph.node(kern.anchor)
        offset, in_place = 0, []
        for slot, src in enumerate(node.inputs):
            p = producer.get(src)
            single = readers.get(src) == 1 and src not in graph.taps.values()
            if p is not None and out[p].kind == "conv" and out[p].writes_into is None and single:
                out[p] = replace(out[p], writes_into=(node.id, offset))
                in_place.append("current" if slot == 0 else "tap")
            offset += graph.node(src).shape[0]
        if in_place:
            out[i] = replace(kern, epilogue=tuple(f"in place: {w}" for w in in_place))
    return tuple(out)


def _check_order(graph: Graph, kernels: list[Kernel]) -> None:
    """Every kernel's external inputs are produced by an earlier kernel."""
    done = {0}
    for k in kernels:
        for nid in k.nodes:
            for i in graph.node(nid).inputs:
                if i not in k.nodes and i not in done:
                    raise AssertionError(f"fusion plan out of order: node %{nid} needs %{i}")
        done.update(k.nodes)


def pretty_plan(graph: Graph, kernels) -> str:
    lines = []
    for k, kern in enumerate(kernels):
        ops = " -> ".join(graph.node(n).op for n in kern.nodes)
        epi = f"  epilogue[{', '.join(kern.epilogue)}]" if kern.epilogue else ""
        lines.append(f"  k{k}: {kern.kind:<11} %{kern.nodes[0]}..%{kern.output}  {ops}{epi}")
    return "\n".join(lines)
