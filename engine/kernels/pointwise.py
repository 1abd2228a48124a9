"""Pointwise kernels: activations, fused residual add + activation, constant
scale, pointwise chains and fan-out. Forward and backward side by side.

Every kernel here treats its tensor as a flat `[numel]` vector.

Public API (autograd-aware, what the runtime calls):
    activation(x, act="relu", slope=0.01)         -> y          (ActFunction)
    add_act(a, b, act="none", slope=0.01)         -> y          (AddActFunction)
    scale(x, factor)                              -> y          (ScaleFunction)
    pointwise_chain(x, ops)                       -> y          (PointwiseChainFunction)
    fan_out(x, n)                                 -> n aliases  (FanOutFunction)

Host launchers (no autograd; also used by other kernel modules):
    act_forward, act_backward, add_act_forward, add_act_backward, scale_forward.

Per-channel affine + activation (eval-mode batch norm) lives in
engine.kernels.batchnorm, the channel-slice copies of concatenation in
engine.kernels.concat, the shared tile plans in engine.kernels.common.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from engine.kernels.activations import act_grad, apply_act
from engine.kernels.common import act_code_checked, block_1d, check_activation, check_like, contiguous
from engine.kernels.launch import launch


# --------------------------------------------------------------------------- #
# Elementwise kernels: y = act(x [+ b]),  dz = act_grad(dy, x [+ b]),  y = x*f
# --------------------------------------------------------------------------- #
@triton.jit
def _act_fwd_kernel(
    x_ptr,  # [n] input (pre-activation, or first addend)
    b_ptr,  # [n] second addend (if HAS_B)
    y_ptr,  # [n] output, x's dtype
    n,
    slope,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat index
    mask = offs < n
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] fp32
    if HAS_B:
        z += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = apply_act(z, ACT, slope)  # [BLOCK] fp32
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd_kernel(
    dy_ptr,  # [n] upstream gradient
    x_ptr,  # [n] saved input (first addend)
    b_ptr,  # [n] saved second addend (if HAS_B)
    dx_ptr,  # [n] gradient wrt the pre-activation, x's dtype
    n,
    slope,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat index
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] fp32
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] fp32
    if HAS_B:
        z += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dz = act_grad(dy, z, ACT, slope)  # [BLOCK] fp32
    tl.store(dx_ptr + offs, dz.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(
    x_ptr,  # [n] input
    y_ptr,  # [n] output = x * factor
    n,
    factor,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat index
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] fp32
    tl.store(y_ptr + offs, (x * factor).to(y_ptr.dtype.element_ty), mask=mask)


def act_forward(x: torch.Tensor, act: str = "relu", slope: float = 0.01) -> torch.Tensor:
    """y = act(x), new tensor of x's shape/dtype. No autograd (see `activation`)."""
    check_activation(x)
    code = act_code_checked(act)
    x = contiguous(x)
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    blk, nw = block_1d(n)
    launch(_act_fwd_kernel, (triton.cdiv(n, blk),), x, x, y, n, float(slope),
           HAS_B=False, ACT=code, BLOCK=blk, num_warps=nw)
    return y


def act_backward(dy: torch.Tensor, x: torch.Tensor, act: str = "relu", slope: float = 0.01,
                 b: torch.Tensor | None = None) -> torch.Tensor:
    """dz = act'(z) * dy with z = x (+ b). Returns a tensor in x's dtype."""
    check_activation(x)
    code = act_code_checked(act)
    if dy.shape != x.shape:
        raise ValueError(f"dy shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")
    if b is not None and b.shape != x.shape:
        raise ValueError(f"b shape {tuple(b.shape)} != x shape {tuple(x.shape)}")
    dy, x = contiguous(dy), contiguous(x)
    b = contiguous(b) if b is not None else None
    dx = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return dx
    blk, nw = block_1d(n)
    launch(_act_bwd_kernel, (triton.cdiv(n, blk),), dy, x, b if b is not None else x, dx, n, float(slope),
           HAS_B=b is not None, ACT=code, BLOCK=blk, num_warps=nw)
    return dx


def add_act_forward(a: torch.Tensor, b: torch.Tensor, act: str = "none", slope: float = 0.01) -> torch.Tensor:
    """y = act(a + b) (same shapes and dtypes, no broadcasting). No autograd."""
    check_like(a, b, "add_act")
    code = act_code_checked(act)
    a, b = contiguous(a), contiguous(b)
    y = torch.empty_like(a)
    n = a.numel()
    if n == 0:
        return y
    blk, nw = block_1d(n)
    launch(_act_fwd_kernel, (triton.cdiv(n, blk),), a, b, y, n, float(slope),
           HAS_B=True, ACT=code, BLOCK=blk, num_warps=nw)
    return y


def add_act_backward(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, act: str = "none",
                     slope: float = 0.01) -> torch.Tensor:
    """Gradient wrt a (== gradient wrt b) of act(a + b)."""
    if act == "none":
        return dy
    return act_backward(dy, a, act, slope, b=b)


def scale_forward(x: torch.Tensor, factor: float) -> torch.Tensor:
    """y = x * factor (a Python number). No autograd."""
    check_activation(x)
    x = contiguous(x)
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    blk, nw = block_1d(n)
    launch(_scale_kernel, (triton.cdiv(n, blk),), x, y, n, float(factor), BLOCK=blk, num_warps=nw)
    return y


class ActFunction(torch.autograd.Function):
    """y = act(x). Saves x (the pre-activation)."""

    @staticmethod
    def forward(ctx, x, act="relu", slope=0.01):
        ctx.act, ctx.slope = act, slope
        ctx.save_for_backward(x)
        return act_forward(x, act, slope)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return act_backward(dy, x, ctx.act, ctx.slope), None, None


class AddActFunction(torch.autograd.Function):
    """y = act(a + b). Saves a and b when act != "none" (z = a + b is recomputed
    in the backward kernel), nothing otherwise. Both inputs get the same
    gradient tensor."""

    @staticmethod
    def forward(ctx, a, b, act="none", slope=0.01):
        ctx.act, ctx.slope = act, slope
        if act != "none":
            ctx.save_for_backward(a, b)
        return add_act_forward(a, b, act, slope)

    @staticmethod
    def backward(ctx, dy):
        if ctx.act == "none":
            dz = dy
        else:
            a, b = ctx.saved_tensors
            dz = act_backward(dy, a, ctx.act, ctx.slope, b=b)
        return (dz if ctx.needs_input_grad[0] else None,
                dz if ctx.needs_input_grad[1] else None, None, None)


class ScaleFunction(torch.autograd.Function):
    """y = x * factor. Saves nothing."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = float(factor)
        return scale_forward(x, factor)

    @staticmethod
    def backward(ctx, dy):
        return scale_forward(dy, ctx.factor), None


def activation(x: torch.Tensor, act: str = "relu", slope: float = 0.01) -> torch.Tensor:
    """Autograd-aware act(x). act="none" returns x itself."""
    check_activation(x)
    act_code_checked(act)
    if act == "none":
        return x
    return ActFunction.apply(x, act, slope)


def add_act(a: torch.Tensor, b: torch.Tensor, act: str = "none", slope: float = 0.01) -> torch.Tensor:
    """Autograd-aware fused residual add + activation: act(a + b)."""
    return AddActFunction.apply(a, b, act, slope)


def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Autograd-aware x * factor (constant)."""
    return ScaleFunction.apply(x, factor)

# --------------------------------------------------------------------------- #
# Fan-out: one value, several consumers
# --------------------------------------------------------------------------- #
class FanOutFunction(torch.autograd.Function):
    """Hands one activation to n consumers as n aliases (views, no copy).

    Without it, PyTorch's autograd engine would sum the consumers' gradients
    itself (an aten add). Here the backward sums them with fusenet's add kernel,
    in consumer order, so the whole backward pass stays on Triton and is
    deterministic."""

    @staticmethod
    def forward(ctx, x, n: int):
        return tuple(x.view_as(x) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        total = None
        for g in grads:
            if g is None:
                continue
            total = g if total is None else add_act_forward(total, g)
        return total, None


def fan_out(x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """n aliases of x whose gradients are summed by a Triton kernel (see FanOutFunction)."""
    if n < 2:
        raise ValueError(f"fan_out needs at least 2 consumers, got {n}")
    return FanOutFunction.apply(x, n)


# --------------------------------------------------------------------------- #
# Pointwise chains: up to CHAIN_MAX unary ops in one pass
# --------------------------------------------------------------------------- #
CHAIN_MAX = 4
# A link's op code: an activation's code (activations.CODES, 0 the identity), or
# SCALE_LINK for a constant multiply. Activation codes are never negative, so no
# activation can ever be taken for a scale.
_SCALE_OP = -1
SCALE_LINK = tl.constexpr(_SCALE_OP)


@triton.jit
def _chain_op(v, OP: tl.constexpr, c):
    """One link: identity, an activation (c = its parameter) or a constant scale (c = factor)."""
    if OP == SCALE_LINK:
        return v * c
    else:
        return apply_act(v, OP, c)


@triton.jit
def _chain_op_grad(g, v, OP: tl.constexpr, c):
    """Gradient through one link, given the link's input v."""
    if OP == SCALE_LINK:
        return g * c
    else:
        return act_grad(g, v, OP, c)


@triton.jit
def _chain_kernel(
    x_ptr,  # [n] chain input
    dy_ptr,  # [n] upstream gradient (BACKWARD only)
    out_ptr,  # [n] chain output (forward) or input gradient (backward)
    n, c1, c2, c3, c4,
    OP1: tl.constexpr, OP2: tl.constexpr, OP3: tl.constexpr, OP4: tl.constexpr,
    BACKWARD: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] fp32
    z1 = _chain_op(x, OP1, c1)  # each link's output stays in registers
    z2 = _chain_op(z1, OP2, c2)
    z3 = _chain_op(z2, OP3, c3)
    if BACKWARD:
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
        g = _chain_op_grad(g, z3, OP4, c4)
        g = _chain_op_grad(g, z2, OP3, c3)
        g = _chain_op_grad(g, z1, OP2, c2)
        g = _chain_op_grad(g, x, OP1, c1)
        tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        y = _chain_op(z3, OP4, c4)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _chain_codes(ops: Sequence[tuple[str, float]]) -> tuple[list[int], list[float]]:
    if not 1 <= len(ops) <= CHAIN_MAX:
        raise ValueError(f"pointwise_chain: 1..{CHAIN_MAX} ops, got {len(ops)}")
    codes, consts = [], []
    for name, c in ops:
        codes.append(_SCALE_OP if name == "scale" else act_code_checked(name))
        consts.append(float(c))
    pad = CHAIN_MAX - len(ops)
    return codes + [0] * pad, consts + [0.0] * pad


def _chain_launch(x, dy, ops, backward: bool) -> torch.Tensor:
    check_activation(x, "x")
    codes, consts = _chain_codes(ops)
    x = contiguous(x)
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    blk, nw = block_1d(n)
    launch(_chain_kernel, (triton.cdiv(n, blk),), x, contiguous(dy) if backward else x, out, n, *consts,
           OP1=codes[0], OP2=codes[1], OP3=codes[2], OP4=codes[3], BACKWARD=backward, BLOCK=blk, num_warps=nw)
    return out


class PointwiseChainFunction(torch.autograd.Function):
    """y = f_k(...f_1(x)) for unary ops f_i (activations, constant scales) in one
    kernel. Saves only x: the backward recomputes the links in registers."""

    @staticmethod
    def forward(ctx, x, ops):
        ctx.save_for_backward(x)
        ctx.ops = ops
        return _chain_launch(x, None, ops, backward=False)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _chain_launch(x, dy, ctx.ops, backward=True), None


def pointwise_chain(x: torch.Tensor, ops: Sequence[tuple[str, float]]) -> torch.Tensor:
    """Apply `ops` in order, e.g. [("tanh", 0), ("scale", 0.5), ("leaky_relu", 0.1)]:
    an activation with its slope (used by leaky_relu) or ("scale", factor)."""
    return PointwiseChainFunction.apply(x, tuple((name, float(c)) for name, c in ops))
