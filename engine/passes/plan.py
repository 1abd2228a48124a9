"""The fusion plan: typed data saying which kernels run, in order, and what each fuses.

A `Plan` is a tuple of `KernelGroup`s in execution order. A group owns a run
of IR nodes (its anchor first, its output last) and is launched when its
output is due. What the anchor's kernel does besides its own op is its
`Epilogue`: one typed field per fused step, each naming the IR node it comes
from (so the runtime reads that node's attributes, and the printer its line).
New fusions add a field here; the runtime, the analytic model and the
printer read the fields, never strings.

`format_plan` is the one printer (`fusenet check --kernels`, `--ir`, and the
golden plan tests); it takes optional per-group launch lists, which the
runtime records from its own launches (engine.runtime.launches).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator, Mapping, Sequence

from engine.ir.graph import Graph, Node
from engine.ir.ops import Family


@dataclass(frozen=True)
class Epilogue:
    """What a group's kernel computes after its anchor op, in this order:
    z = anchor (+ bias) (folded bn: * scale + shift) (+ residual); statistics of z;
    y = dropout(act(z)); with a fused max pool, y = maxpool(act(z)) and the statistics are
    those of the pooled y. Each field is the IR node of that step (None: not fused).
    Then the backward work a neighbour's kernel does for the group (`pool_grad_by`, `sums_by`,
    `apply_by`)."""

    bias: bool = False  # the anchor layer's own bias
    folded_bn: int | None = None  # an eval-mode batch norm folded into a per-channel scale and shift
    residual: int | None = None  # an `add`: its other input is added to z
    stats: int | None = None  # a training-mode batch norm whose batch statistics are emitted as partial sums of z
    act: int | None = None  # an activation applied to z
    dropout: int | None = None  # a training-mode dropout (mask regenerated from its seed in the backward)
    pool: int | None = None  # a K x K / stride K `maxpool` of the conv's output (argmax saved for the backward)
    # backward hand-offs (engine.kernels.batchnorm.backward), each on the group that runs first:
    pool_grad_by: int | None = None  # conv: the training bn reading the pooled output, whose backward
    #                                  writes this conv's full-resolution gradient through the argmax
    sums_by: int | None = None  # bn: the node reading this bn's output alone (a conv, a max pool) whose
    #                             backward kernel makes the bn's dz and its per-channel gradient sums
    apply_by: int | None = None  # conv (its input takes no gradient: a stem): the training bn alone reading
    #                              its output (with `sums_by`), whose dx this conv's wgrad takes from its dz

    def steps(self, graph: Graph) -> list[str]:
        """The fused steps as words, for the printer: bias, bn (folded), add, bn statistics, relu, dropout."""
        out = ["bias"] if self.bias else []
        if self.folded_bn is not None:
            out.append("bn (folded)")
        if self.residual is not None:
            out.append("add")
        if self.stats is not None and self.pool is None:
            out.append("bn statistics")
        if self.act is not None:
            out.append(graph.node(self.act).op)
        if self.dropout is not None:
            out.append("dropout")
        if self.pool is not None:
            out.append("maxpool")
            if self.stats is not None:
                out.append("bn statistics")
        if self.pool_grad_by is not None:
            out.append("bwd: pool grad from bn")
        if self.apply_by is not None:
            out.append("bwd: bn dx in wgrad")
        if self.sums_by is not None:  # the conv's dgrad, or the max pool's backward gather
            out.append(f"bwd: sums from {graph.node(self.sums_by).op}")
        return out

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) not in (None, False) for f in fields(self))


@dataclass(frozen=True)
class ConcatSlot:
    """Where a producer writes its output in place: the channel slice of a concat's buffer."""

    concat: int  # the concat node
    channel: int  # first channel of the slice


@dataclass(frozen=True)
class KernelGroup:
    family: Family
    nodes: tuple[int, ...]  # IR node ids in order: the anchor first, the output last
    epilogue: Epilogue = Epilogue()
    writes_into: ConcatSlot | None = None  # the output is written into a concat's buffer
    in_place: tuple[int, ...] = ()  # concat only: inputs already written into its buffer by their producers

    @property
    def anchor(self) -> int:
        return self.nodes[0]

    @property
    def output(self) -> int:
        return self.nodes[-1]


@dataclass(frozen=True)
class Plan:
    graph: Graph
    groups: tuple[KernelGroup, ...]
    training: bool

    def __iter__(self) -> Iterator[KernelGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def producer(self, node_id: int) -> KernelGroup | None:
        """The group whose output is node `node_id`."""
        return next((g for g in self.groups if g.output == node_id), None)

    def nodes_of(self, group: KernelGroup) -> list[Node]:
        return [self.graph.node(i) for i in group.nodes]

    def readers(self) -> dict[int, int]:
        """How often each value is read by a group other than the one that made it
        (the network's output counts as one read)."""
        reads: dict[int, int] = {self.graph.output.id: 1}
        for group in self.groups:
            members = set(group.nodes)
            for nid in group.nodes:
                for i in self.graph.node(nid).inputs:
                    if i not in members:
                        reads[i] = reads.get(i, 0) + 1
        return reads

    def pretty(self) -> str:
        return format_plan(self)


def describe_group(plan: Plan, group: KernelGroup) -> str:
    """`conv -> bn -> relu  [bias, bn (folded), relu]  -> concat %7[16:]` style text."""
    g = plan.graph
    text = " -> ".join([g.node(group.anchor).describe()] + [g.node(i).op for i in group.nodes[1:]])
    steps = group.epilogue.steps(g)
    if steps:
        text += f"  [{', '.join(steps)}]"
    if group.writes_into is not None:
        text += f"  -> into concat %{group.writes_into.concat} at channel {group.writes_into.channel}"
    if group.in_place:
        text += f"  (written in place: {', '.join(f'%{i}' for i in group.in_place)})"
    return text


def _count_names(names: Sequence[str]) -> str:
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    for n, k in seen.items():
        out.append(n if k == 1 else f"{n} x{k}")
    return ", ".join(out) or "-"


def format_plan(plan: Plan, launches: Mapping[int, tuple[Sequence[str], Sequence[str]]] | None = None) -> str:
    """The plan as text, one group per line: family, IR nodes, source lines, what
    it fuses; with `launches` (group index -> (forward kernels, backward
    kernels)), the kernels each group launches under it."""
    g = plan.graph
    head = f"plan {g.name} ({'training' if plan.training else 'inference'}): {len(plan)} kernel groups"
    lines = [head]
    width = max((len(grp.family.value) for grp in plan), default=4)
    for k, grp in enumerate(plan):
        ids = f"%{grp.anchor}" if len(grp.nodes) == 1 else f"%{grp.anchor}..%{grp.output}"
        src = ",".join(str(n) for n in sorted({g.node(i).pos.line for i in grp.nodes}))
        lines.append(f"  g{k:<3} {grp.family.value:<{width}}  {ids:<9} line {src:<6} {describe_group(plan, grp)}")
        if launches is not None and k in launches:
            fwd, bwd = launches[k]
            lines.append(f"        forward:  {_count_names(fwd)}")
            if plan.training:
                lines.append(f"        backward: {_count_names(bwd)}")
    return "\n".join(lines)
