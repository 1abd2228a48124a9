"""Shape inference: every node's per-sample output shape, parameters and FLOPs.

Each op's rule is named by its registry entry (engine.ir.ops) and written in
engine.ir.shape_rules. Errors name the layer's source position and, for
spatial sizes, show the formula with the numbers that went wrong.
"""
from __future__ import annotations

from dataclasses import replace

from dsl.errors import Collector
from engine.ir.expand import CallSites
from engine.ir.graph import Graph, Node
from engine.ir.ops import REGISTRY
from engine.ir.shape_rules import ShapeError


def infer_shapes(graph: Graph, errors: Collector, call_sites: CallSites | None = None) -> Graph:
    """Annotate every node; nodes downstream of an error keep shape None.

    `call_sites` (from `expand_with_call_sites`) adds to an error in a block
    body the block calls it was expanded in: the same body can fit one call's
    input shape and not another's."""
    call_sites = call_sites or {}
    nodes: list[Node] = []
    for node in graph.nodes:
        if node.op == "input":
            nodes.append(replace(node, shape=tuple(graph.input_shape)))
            continue
        ins = [nodes[i].shape for i in node.inputs]
        if any(s is None for s in ins):
            nodes.append(node)
            continue
        try:
            new, shape, params, flops = REGISTRY[node.op].shape(node, ins, nodes)
        except ShapeError as e:
            errors.error(e.message, node.pos, e.hint, e.notes + call_sites.get(node.id, ()))
            nodes.append(node)
            continue
        nodes.append(replace(new, shape=shape, params=params, flops=flops))
    return graph.with_nodes(nodes)
