"""Shape inference: every node's per-sample output shape, parameters and FLOPs.

Errors name the layer's source position and, for spatial sizes, show the
formula with the numbers that went wrong.
"""
from __future__ import annotations

from dataclasses import replace
from math import prod

from dsl.errors import Collector, Note
from dsl.gc_pause import gc_paused
from dsl.limits import MAX_CHANNELS, MAX_SIZE
from engine.ir.expand import CallSites
from engine.ir.graph import ACTIVATION_OPS, Graph, Node


class ShapeError(Exception):
    def __init__(self, message: str, hint: str | None = None, notes=()):
        super().__init__(message)
        self.message, self.hint, self.notes = message, hint, tuple(notes)


def _fmt(shape) -> str:
    return "x".join(map(str, shape))


def _spatial(size: int, k: int, s: int, p: int, d: int, axis: str, what: str) -> int:
    """The output size along `axis` ("height" or "width"); the caller passes that
    axis's own numbers, and the formula is written with its letter, H or W."""
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    if out < 1:
        letter = axis[0].upper()
        raise ShapeError(
            f"{what} shrinks {axis} to {out}: ({letter} + 2*pad - dilation*(k-1) - 1)/stride + 1 "
            f"= ({size} + 2*{p} - {d}*({k}-1) - 1)/{s} + 1 = {out}",
            f"the input {axis} is {size}; use a smaller kernel or stride, more padding, or remove a downsampling layer",
        )
    return out


def _need_image(node: Node, shape, what: str | None = None) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ShapeError(
            f"'{node.op}' needs a CxHxW image, but its input has shape {_fmt(shape)}",
            "image layers must come before flatten / global pools / linear, "
            "and a network on `input F` features has none",
        )
    return shape


def _check_size(shape) -> None:
    """Layers can grow a tensor (upsample, concat): keep it within the bounds
    a written input has (dsl/limits.py)."""
    if len(shape) == 3 and (shape[0] > MAX_CHANNELS or max(shape[1:]) > MAX_SIZE):
        raise ShapeError(
            f"the output, {_fmt(shape)}, is too large",
            f"fusenet's limits are {MAX_CHANNELS:,} channels and {MAX_SIZE:,} rows or columns "
            "(MAX_CHANNELS, MAX_SIZE in dsl/limits.py)",
        )


def _conv(node: Node, shape):
    c, h, w = _need_image(node, shape)
    a = node.attrs
    (kh, kw), (sh, sw), (dh, dw), g = a["kernel"], a["stride"], a["dilation"], a["groups"]
    if c % g or a["out"] % g:
        raise ShapeError(
            f"groups={g} must divide both input channels ({c}) and output channels ({a['out']})",
            "for a depthwise conv use groups equal to the input channels",
        )
    pad = a["pad"]
    if pad == "same":
        if (sh, sw) != (1, 1):
            raise ShapeError("pad=same needs stride 1", "give explicit padding with stride > 1")
        if dh * (kh - 1) % 2 or dw * (kw - 1) % 2:
            raise ShapeError(
                "pad=same with this kernel needs uneven padding, which fusenet does not do",
                "use an odd kernel size",
            )
        pad = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
        node = replace(node, attrs={**a, "pad": pad})
    ph, pw = pad
    ho = _spatial(h, kh, sh, ph, dh, "height", "conv")
    wo = _spatial(w, kw, sw, pw, dw, "width", "conv")
    out = a["out"]
    k = (c // g) * kh * kw
    params = out * k + (out if a["bias"] else 0)
    return node, (out, ho, wo), params, 2 * out * ho * wo * k


def _pool(node: Node, shape):
    c, h, w = _need_image(node, shape)
    a = node.attrs
    (kh, kw), (ph, pw) = a["kernel"], a["pad"]
    stride = a["stride"] or a["kernel"]
    if ph > kh // 2 or pw > kw // 2:
        raise ShapeError(f"{node.op} pad {ph}x{pw} is more than half its kernel {kh}x{kw}", "as in PyTorch, pad <= kernel/2")
    node = replace(node, attrs={**a, "stride": stride})
    ho = _spatial(h, kh, stride[0], ph, 1, "height", node.op)
    wo = _spatial(w, kw, stride[1], pw, 1, "width", node.op)
    return node, (c, ho, wo), 0, c * ho * wo * kh * kw


def infer_node(node: Node, inputs: list[tuple[int, ...]], graph_nodes) -> tuple[Node, tuple[int, ...], int, int]:
    op, a = node.op, node.attrs
    x = inputs[0] if inputs else None
    numel = prod(x) if x else 0
    if op == "conv":
        return _conv(node, x)
    if op in ("maxpool", "avgpool"):
        return _pool(node, x)
    if op == "linear":
        if len(x) != 1:
            raise ShapeError(
                f"'linear' needs a flat N x features input, but its input is {_fmt(x)} per sample",
                "insert `flatten` or a global pool (`global_avgpool`) before it",
            )
        return node, (a["out"],), x[0] * a["out"] + (a["out"] if a["bias"] else 0), 2 * x[0] * a["out"]
    if op == "bn":
        return node, x, 2 * x[0], 2 * numel
    if op in ACTIVATION_OPS or op in ("dropout", "scale"):
        return node, x, 0, numel
    if op == "softmax":
        return node, x, 0, 3 * numel
    if op in ("global_avgpool", "global_maxpool"):
        c, _, _ = _need_image(node, x)
        return node, (c,), 0, numel
    if op == "flatten":
        return node, (numel,), 0, 0
    if op == "upsample":
        c, h, w = _need_image(node, x)
        f = a["factor"]
        out = (c, h * f, w * f)
        return node, out, 0, prod(out) * (4 if a["mode"] == "bilinear" else 1)
    if op == "blurpool":
        c, h, w = _need_image(node, x)
        f, s = a["filter"], a["stride"]
        if (f - 1) // 2 >= min(h, w) or f // 2 >= min(h, w):
            raise ShapeError(
                f"blurpool filter={f} needs reflect padding of {f // 2}, which must be smaller than the input {h}x{w}",
                "use a smaller filter or apply blurpool earlier",
            )
        out = (c, (h - 1) // s + 1, (w - 1) // s + 1)
        return node, out, 0, prod(out) * f * f
    if op in ("add", "concat"):
        other = inputs[1]
        src = graph_nodes[node.inputs[1]]
        cur = graph_nodes[node.inputs[0]]
        notes = [
            Note(f"the current tensor, {_fmt(x)}, comes from `{cur.describe()}` here", cur.pos),
            Note(f"'{a.get('tap', 'shortcut')}' is {_fmt(other)}, defined by `{src.describe()}` here", src.pos),
        ]
        if op == "add":
            if x != other:
                what = "residual body and shortcut" if a.get("merge") == "residual" else f"'add {a['tap']}'"
                hint = (
                    "give the shortcut a 1x1 conv with the same stride and channels"
                    if a.get("merge") == "residual"
                    else "the shapes must be equal; a 1x1 conv or a pool can match them"
                )
                raise ShapeError(f"{what}: shapes differ, {_fmt(x)} vs {_fmt(other)}", hint, notes)
            return node, x, 0, numel
        if len(x) != 3 or len(other) != 3 or x[1:] != other[1:]:
            raise ShapeError(
                f"'concat {a['tap']}' needs equal HxW: {_fmt(x)} vs {_fmt(other)}",
                "upsample or pool one side so the spatial sizes match",
                notes,
            )
        return node, (x[0] + other[0], x[1], x[2]), 0, 0
    raise AssertionError(f"no shape rule for op {op}")


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
            new, shape, params, flops = infer_node(node, ins, nodes)
            _check_size(shape)
        except ShapeError as e:
            errors.error(e.message, node.pos, e.hint, e.notes + call_sites.get(node.id, ()))
            nodes.append(node)
            continue
        nodes.append(replace(new, shape=shape, params=params, flops=flops))
    return graph.with_nodes(nodes)
