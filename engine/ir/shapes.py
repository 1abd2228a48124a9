"""Shape inference: every node's per-sample output shape, parameters and FLOPs.

Each op's rule is named by its registry entry (engine.ir.ops) and written in
engine.ir.shape_rules. Errors name the layer's source position and, for
spatial sizes, show the formula with the numbers that went wrong.
"""
from __future__ import annotations

from dataclasses import replace

from dsl.errors import Collector
from dsl.gc_pause import gc_paused
from dsl.limits import MAX_CHANNELS, MAX_SIZE
from engine.ir.expand import CallSites
from engine.ir.graph import Graph, Node
from engine.ir.ops import REGISTRY
from engine.ir.shape_rules import ShapeError, fmt_shape


def _check_size(shape) -> None:
    """Layers can grow a tensor (upsample, concat): keep it within the bounds
    a written input has (dsl/limits.py)."""
    if len(shape) == 3 and (shape[0] > MAX_CHANNELS or max(shape[1:]) > MAX_SIZE):
        raise ShapeError(
            f"the output, {fmt_shape(shape)}, is too large",
            f"fusenet's limits are {MAX_CHANNELS:,} channels and {MAX_SIZE:,} rows or columns "
            "(MAX_CHANNELS, MAX_SIZE in dsl/limits.py)",
        )


@gc_paused()  # on a big graph 80% of the time was the collector's (see dsl/gc_pause.py)
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
            _check_size(shape)
        except ShapeError as e:
            errors.error(e.message, node.pos, e.hint, e.notes + call_sites.get(node.id, ()))
            nodes.append(node)
            continue
        nodes.append(replace(new, shape=shape, params=params, flops=flops))
    return graph.with_nodes(nodes)
