"""Fusion planning: group IR nodes into the kernels that will run.

`plan_fusion` makes the groups; `plan_concat_writes`, `plan_bn_stats` and
`plan_backward_links` refine them (each a pure function Plan -> Plan, listed in
engine.passes.pipeline). Rules, with why in brackets:
- A GEMM (conv, linear) absorbs what follows it while the value has one user:
  in eval mode a conv absorbs a `bn` (folded into a per-channel scale and
  shift), then a conv absorbs a residual/skip `add`, then either absorbs an
  activation; in training both then absorb a `dropout` [epilogue work costs
  no extra HBM round trip].
- In training a `bn` after a conv cannot be folded (it needs the batch
  statistics of the conv output); the bn group (finalize statistics,
  normalize) absorbs the following activation [one pass instead of two].
- `add` absorbs one following activation; a run of unary pointwise ops
  (activations, `scale`) becomes one chain kernel; everything else is a group
  of its own.
- A conv then absorbs a `maxpool` with kernel == stride (a power of two, at most
  4), no padding, when the conv's output has it as its sole user: the epilogue
  pools whole windows and saves a one-byte argmax, dgrad/wgrad expand the pooled
  gradient in their loads [no full-res output, no pool kernels, no full-res dy].
  In training only straight after the conv (+bias): nothing with a backward
  through the full-res value (act, residual, dropout) may sit between; in
  inference after the folded bn and activation too (max after act needs no
  backward there).
- A node whose value has several users, or is a tap or the output, ends its
  group, so no value is lost.
- A conv whose output only feeds a `concat` writes into its channel slice of
  the concat's buffer (plan_concat_writes) [concat without a copy].
- In training, a group whose output only feeds a `bn` computes the bn's batch
  statistics itself when its op can (`emits_stats` in the op registry: conv in
  its epilogue, max pool in its forward) (plan_bn_stats) [one read fewer, and
  the bn launches no statistics kernel].
- In training, backward work moves to the kernel next to it (plan_backward_links):
  a bn (+ act) whose output only a conv or a max pool reads gets dz and its
  gradient sums from that conv's dgrad epilogue or the pool's backward gather
  [no reduce pass over x and dy];
  a conv whose fused pool's output only a bn reads gets its full-resolution
  gradient from the bn's backward, which gathers through the argmax [no pool
  backward kernel, no pooled dx round trip].
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from engine.ir.graph import Graph, Node
from engine.ir.ops import Family, Group, emits_stats, family, is_, makes_bn_grad
from engine.passes.plan import ConcatSlot, Epilogue, KernelGroup, Plan

# The most unary ops one pointwise chain kernel runs back to back
# (engine.kernels.pointwise.CHAIN_MAX; a test checks they agree).
CHAIN_MAX = 4


def _users(graph: Graph) -> dict[int, list[int]]:
    users: dict[int, list[int]] = {}
    for n in graph:
        for i in n.inputs:
            users.setdefault(i, []).append(n.id)
    return users


def _sole_user(graph: Graph, node: Node, users: dict[int, list[int]]) -> Node | None:
    """The only consumer of `node`'s value, if it has exactly one and is not an output or a tap."""
    if node.id in graph.taps.values() or node.id == graph.output.id:
        return None
    us = users.get(node.id, [])
    return graph.node(us[0]) if len(us) == 1 else None


# The largest fused pool window side: K*K rows of a window must divide the conv's BLOCK_M
# (a power of two, 16 at the least), so K is a power of two up to 4
POOL_MAX = 4


def _fusable_pool(n: Node) -> bool:
    """A max pool a conv epilogue can run: K x K, stride K (whole disjoint windows), K a power of
    two up to POOL_MAX, no padding (engine.kernels.conv's pool=K)."""
    if n.op != "maxpool":
        return False
    (kh, kw), (sh, sw), (ph, pw) = n.attr("kernel"), n.attr("stride") or n.attr("kernel"), n.attr("pad")
    return kh == kw == sh == sw and 2 <= kh <= POOL_MAX and kh & (kh - 1) == 0 and ph == pw == 0


def plan_fusion(graph: Graph, training: bool) -> Plan:
    users = _users(graph)
    taken: set[int] = set()
    groups: list[KernelGroup] = []

    for node in graph:
        if node.op == "input" or node.id in taken:
            continue
        members, cur = [node.id], node

        def absorb(test: Callable[[Node], bool]) -> int | None:
            """Take the sole user of the group's current value into the group if `test` holds."""
            nonlocal cur
            nxt = _sole_user(graph, cur, users)
            if nxt is None or nxt.id in taken or not test(nxt) or nxt.inputs[0] != cur.id:
                return None
            members.append(nxt.id)
            cur = nxt
            return nxt.id

        def op_is(name: str) -> Callable[[Node], bool]:
            return lambda n: n.op == name

        def activation(n: Node) -> bool:
            return is_(n, Group.ACTIVATION)

        fam, epi = family(node), Epilogue()
        if is_(node, Group.GEMM):
            conv = fam is Family.CONV
            # Training-mode bn needs the batch statistics of the conv output, so it
            # stays a group of its own (plan_bn_stats feeds it those statistics).
            folded = absorb(op_is("bn")) if conv and not training else None
            # the epilogue computes act(acc [+bias] [*scale+shift] [+residual]):
            # an activation either ends it or follows a residual add
            residual = absorb(op_is("add")) if conv else None
            act = absorb(activation)
            # training-mode dropout is the last step: its mask comes from a seed,
            # so the backward regenerates it instead of storing it
            dropout = absorb(op_is("dropout")) if training else None
            plain = residual is None and act is None and dropout is None
            pool = absorb(_fusable_pool) if conv and node.attr("groups") == 1 and (plain or not training) else None
            epi = Epilogue(bias=bool(node.attr("bias")), folded_bn=folded, residual=residual, act=act,
                           dropout=dropout, pool=pool)
        elif fam in (Family.BATCH_NORM, Family.ADD):
            epi = Epilogue(act=absorb(activation))
        elif is_(node, Group.UNARY_POINTWISE):
            while len(members) < CHAIN_MAX and absorb(lambda n: is_(n, Group.UNARY_POINTWISE)) is not None:
                pass
            if len(members) > 1:
                fam = Family.POINTWISE
        taken.update(members)
        groups.append(KernelGroup(fam, tuple(members), epi))

    groups.sort(key=lambda grp: grp.output)
    _check_order(graph, groups)
    return Plan(graph, tuple(groups), training)


def plan_concat_writes(plan: Plan) -> Plan:
    """A conv whose output only feeds a `concat` writes it straight into its
    channel slice of the concat's buffer [no copy]; the concat group then only
    copies in the inputs whose producers could not (a tap with other readers)."""
    graph = plan.graph
    producer = {grp.output: i for i, grp in enumerate(plan)}
    readers: dict[int, int] = {}
    for n in graph:
        for i in n.inputs:
            readers[i] = readers.get(i, 0) + 1
    out = list(plan.groups)
    for i, grp in enumerate(plan):
        if grp.family is not Family.CONCAT:
            continue
        node = graph.node(grp.anchor)
        offset, in_place = 0, []
        for src in node.inputs:
            p = producer.get(src)
            single = readers.get(src) == 1 and src not in graph.taps.values()
            if (p is not None and out[p].family is Family.CONV and out[p].writes_into is None and single
                    and out[p].epilogue.pool is None):  # a fused pool stores its own pooled layout
                out[p] = replace(out[p], writes_into=ConcatSlot(node.id, offset))
                in_place.append(src)
            offset += graph.node(src).shape[0]
        if in_place:
            out[i] = replace(grp, in_place=tuple(in_place))
    return replace(plan, groups=tuple(out))


def plan_bn_stats(plan: Plan) -> Plan:
    """In training, a group whose output feeds only a batch norm emits that
    batch norm's statistics, when its anchor's op can (`emits_stats` in the op
    registry): per-tile partial sums of its output [the bn group then skips its
    statistics pass, one read of that output fewer]. Only when the group's
    output is its anchor's own (no activation, residual or dropout fused after
    it), which in training is the case whenever a bn follows, or the pooled
    output of a max pool its conv fused (the statistics are then the pooled
    output's), and not written into a concat's buffer."""
    if not plan.training:
        return plan
    graph = plan.graph
    users = _users(graph)
    out = list(plan.groups)
    for i, grp in enumerate(plan):
        anchor = graph.node(grp.anchor)
        own = grp.output == grp.anchor or grp.output == grp.epilogue.pool
        if not emits_stats(anchor) or not own or grp.writes_into is not None:
            continue
        readers = users.get(grp.output, [])
        if len(readers) == 1:
            bn = graph.node(readers[0])
            if family(bn) is Family.BATCH_NORM and bn.inputs[0] == grp.output:
                out[i] = replace(grp, epilogue=replace(grp.epilogue, stats=bn.id))
    return replace(plan, groups=tuple(out))


def _check_order(graph: Graph, groups: list[KernelGroup]) -> None:
    """Every group's external inputs are produced by an earlier group."""
    done = {0}
    for grp in groups:
        for nid in grp.nodes:
            for i in graph.node(nid).inputs:
                if i not in grp.nodes and i not in done:
                    raise AssertionError(f"fusion plan out of order: node %{nid} needs %{i}")
        done.update(grp.nodes)


def plan_backward_links(plan: Plan) -> Plan:
    """In training: `sums_by` on a bn group whose output's one reader can make its gradient
    (`makes_bn_grad` in the op registry: a plain conv's dgrad epilogue, a max pool's backward gather):
    that node's backward kernel will make the bn's dz and gradient sums; `pool_grad_by` on a conv group
    whose fused pool's output feeds only a bn (the bn it emits statistics for), the bn whose backward
    will write the conv's full-resolution gradient; `apply_by` on a conv group whose input is the
    network's (no gradient) and whose plain output (no bias) feeds only a bn with `sums_by`: that bn's dx
    has one reader, this conv's wgrad, which takes it from dz [engine.kernels.batchnorm.backward]."""
    if not plan.training:
        return plan
    graph = plan.graph
    users = _users(graph)
    out = list(plan.groups)
    sums = {}  # bn node -> the node making its dz and sums
    for i, grp in enumerate(plan):
        if grp.family is Family.BATCH_NORM:
            reader = _sole_user(graph, graph.node(grp.output), users)
            if reader is not None and makes_bn_grad(reader) and reader.inputs[0] == grp.output:
                out[i] = replace(grp, epilogue=replace(grp.epilogue, sums_by=reader.id))
                sums[grp.anchor] = reader.id
    for i, grp in enumerate(out):
        if grp.family is not Family.CONV or grp.epilogue.stats is None:
            continue
        e = grp.epilogue
        if e.pool is not None:
            # plan_bn_stats set `stats` only for the bn alone reading the output; plan_fusion fuses a
            # pool only into a groups-1 conv
            out[i] = replace(grp, epilogue=replace(e, pool_grad_by=e.stats))
        elif (e.stats in sums and family(graph.node(graph.node(grp.anchor).inputs[0])) is Family.INPUT
              and (e.bias, e.folded_bn, e.residual, e.act, e.dropout) == (False,) + (None,) * 4):
            out[i] = replace(grp, epilogue=replace(e, apply_by=e.stats))
    return replace(plan, groups=tuple(out))
