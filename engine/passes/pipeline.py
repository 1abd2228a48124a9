"""The pass pipeline, in one list, with the IR printable after each pass.

The graph arrives expanded and shape-checked from engine.ir.frontend. Graph
passes (Graph -> Graph) run first, then fusion planning makes a Plan and plan
passes (Plan -> Plan) refine it. Every pass is a small pure function;
`run_pipeline` returns the final plan and, on request, the text of the IR
after every pass (`fusenet check FILE --ir`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from engine.ir.graph import Graph
from engine.passes.fusion import plan_backward_links, plan_bn_stats, plan_concat_writes, plan_fusion
from engine.passes.plan import Plan, format_plan


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


GRAPH_PASSES: tuple[tuple[str, Callable[[Graph, bool], Graph]], ...] = (
    ("drop_eval_dropout", drop_eval_dropout),
)
PLAN_PASSES: tuple[tuple[str, Callable[[Plan], Plan]], ...] = (
    ("plan_concat_writes", plan_concat_writes),
    ("plan_bn_stats", plan_bn_stats),
    ("plan_backward_links", plan_backward_links),
)


def run_pipeline(graph: Graph, training: bool = True) -> Plan:
    """The graph passes, fusion planning and the plan passes, in order."""
    return trace_pipeline(graph, training)[-1][1]


def trace_pipeline(graph: Graph, training: bool = True) -> list[tuple[str, Graph | Plan]]:
    """(pass name, IR after it) for every pass, the input first; the last is the final plan."""
    trace: list[tuple[str, Graph | Plan]] = [("frontend (expand + shapes)", graph)]
    for name, graph_pass in GRAPH_PASSES:
        graph = graph_pass(graph, training)
        trace.append((name, graph))
    plan = plan_fusion(graph, training)
    trace.append(("plan_fusion", plan))
    for name, plan_pass in PLAN_PASSES:
        plan = plan_pass(plan)
        trace.append((name, plan))
    return trace


def format_trace(trace: list[tuple[str, Graph | Plan]]) -> str:
    """The IR after every pass, as `fusenet check --ir` prints it."""
    parts = []
    for name, ir in trace:
        text = format_plan(ir) if isinstance(ir, Plan) else ir.pretty()
        parts.append(f";; after {name}\n{text}")
    return "\n\n".join(parts)
