"""Shape rules: one function per op shape, giving its per-sample output shape,
parameter count and forward FLOPs (multiply-add = 2).

Each rule takes the node and its inputs' per-sample shapes and returns
`(node, shape, params, flops)`; the node comes back changed only where a rule
resolves an attribute (`pad=same`, a pool's default stride). The op registry
(engine.ir.ops) names the rule of every op; `engine.ir.shapes` runs them over a
graph. Errors name the formula with the numbers that went wrong.
"""
from __future__ import annotations

from dataclasses import replace
from math import prod
from typing import Callable, Sequence

from dsl.errors import Note
from engine.ir.graph import Node

Shape = tuple[int, ...]
ShapeResult = tuple[Node, Shape, int, int]  # (node, per-sample shape, parameters, forward FLOPs)
ShapeRule = Callable[[Node, Sequence[Shape], Sequence[Node]], ShapeResult]


class ShapeError(Exception):
    def __init__(self, message: str, hint: str | None = None, notes=()):
        super().__init__(message)
        self.message, self.hint, self.notes = message, hint, tuple(notes)


def fmt_shape(shape) -> str:
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


def _need_image(node: Node, shape) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ShapeError(
            f"'{node.op}' needs a CxHxW image, but its input has shape {fmt_shape(shape)}",
            "image layers must come before flatten / global pools / linear, "
            "and a network on `input F` features has none",
        )
    return shape


def conv(node: Node, inputs, nodes) -> ShapeResult:
    c, h, w = _need_image(node, inputs[0])
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


def pool(node: Node, inputs, nodes) -> ShapeResult:
    c, h, w = _need_image(node, inputs[0])
    a = node.attrs
    (kh, kw), (ph, pw) = a["kernel"], a["pad"]
    stride = a["stride"] or a["kernel"]
    if ph > kh // 2 or pw > kw // 2:
        raise ShapeError(f"{node.op} pad {ph}x{pw} is more than half its kernel {kh}x{kw}", "as in PyTorch, pad <= kernel/2")
    node = replace(node, attrs={**a, "stride": stride})
    ho = _spatial(h, kh, stride[0], ph, 1, "height", node.op)
    wo = _spatial(w, kw, stride[1], pw, 1, "width", node.op)
    return node, (c, ho, wo), 0, c * ho * wo * kh * kw


def linear(node: Node, inputs, nodes) -> ShapeResult:
    x, a = inputs[0], node.attrs
    if len(x) != 1:
        raise ShapeError(
            f"'linear' needs a flat N x features input, but its input is {fmt_shape(x)} per sample",
            "insert `flatten` or a global pool (`global_avgpool`) before it",
        )
    return node, (a["out"],), x[0] * a["out"] + (a["out"] if a["bias"] else 0), 2 * x[0] * a["out"]


def batch_norm(node: Node, inputs, nodes) -> ShapeResult:
    x = inputs[0]
    return node, x, 2 * x[0], 2 * prod(x)


def elementwise(node: Node, inputs, nodes) -> ShapeResult:
    """Same shape out as in, one FLOP per element (activations, dropout, scale)."""
    return node, inputs[0], 0, prod(inputs[0])


def softmax(node: Node, inputs, nodes) -> ShapeResult:
    return node, inputs[0], 0, 3 * prod(inputs[0])


def global_pool(node: Node, inputs, nodes) -> ShapeResult:
    c, _, _ = _need_image(node, inputs[0])
    return node, (c,), 0, prod(inputs[0])


def flatten(node: Node, inputs, nodes) -> ShapeResult:
    return node, (prod(inputs[0]),), 0, 0


def upsample(node: Node, inputs, nodes) -> ShapeResult:
    c, h, w = _need_image(node, inputs[0])
    f = node.attrs["factor"]
    out = (c, h * f, w * f)
    return node, out, 0, prod(out) * (4 if node.attrs["mode"] == "bilinear" else 1)


def blurpool(node: Node, inputs, nodes) -> ShapeResult:
    c, h, w = _need_image(node, inputs[0])
    f, s = node.attrs["filter"], node.attrs["stride"]
    if (f - 1) // 2 >= min(h, w) or f // 2 >= min(h, w):
        raise ShapeError(
            f"blurpool filter={f} needs reflect padding of {f // 2}, which must be smaller than the input {h}x{w}",
            "use a smaller filter or apply blurpool earlier",
        )
    out = (c, (h - 1) // s + 1, (w - 1) // s + 1)
    return node, out, 0, prod(out) * f * f


def _merge_notes(node: Node, inputs, nodes) -> list[Note]:
    """Where the two merged tensors come from, for the error notes of add/concat."""
    cur, src = nodes[node.inputs[0]], nodes[node.inputs[1]]
    return [
        Note(f"the current tensor, {fmt_shape(inputs[0])}, comes from `{cur.describe()}` here", cur.pos),
        Note(f"'{node.attrs.get('tap', 'shortcut')}' is {fmt_shape(inputs[1])}, defined by `{src.describe()}` here",
             src.pos),
    ]


def add(node: Node, inputs, nodes) -> ShapeResult:
    x, other, a = inputs[0], inputs[1], node.attrs
    if x != other:
        residual = a.get("merge") == "residual"
        what = "residual body and shortcut" if residual else f"'add {a['tap']}'"
        hint = ("give the shortcut a 1x1 conv with the same stride and channels" if residual
                else "the shapes must be equal; a 1x1 conv or a pool can match them")
        raise ShapeError(f"{what}: shapes differ, {fmt_shape(x)} vs {fmt_shape(other)}", hint,
                         _merge_notes(node, inputs, nodes))
    return node, x, 0, prod(x)


def concat(node: Node, inputs, nodes) -> ShapeResult:
    x, other = inputs[0], inputs[1]
    if len(x) != 3 or len(other) != 3 or x[1:] != other[1:]:
        raise ShapeError(
            f"'concat {node.attrs['tap']}' needs equal HxW: {fmt_shape(x)} vs {fmt_shape(other)}",
            "upsample or pool one side so the spatial sizes match",
            _merge_notes(node, inputs, nodes),
        )
    return node, (x[0] + other[0], x[1], x[2]), 0, 0
