"""Dropout with a counter-based mask: nothing is stored between forward and backward.

Mask convention (shared by every kernel that fuses dropout, e.g. conv/linear
epilogues, through the `dropout_mask_scale` device function):

  * `offsets` = the int32 flat element index of the value in the logical,
    contiguous, channels-last output tensor: `row * C + col` for `[M, C]` rows
    (`((n*H + h)*W + w)*C + c` for NHWC). Tensors must have < 2**31 elements.
  * `seed` = a runtime integer in [0, 2**31) (a kernel argument, never a
    constexpr, so a new seed per step does not recompile).
  * element kept iff `tl.rand(seed, offsets) >= p` (probability 1-p), kept values
    scaled by 1/(1-p), dropped ones set to 0.

So a fused epilogue that calls `dropout_mask_scale(acc, seed, row*C + col, p)` on
its output tile produces exactly what `dropout(y, p, seed)` would on the
unfused output, and its backward can use `dropout_backward` (or the same
device function on the incoming gradient).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.common import block_1d, check_activation, contiguous
from engine.kernels.launch import launch

MAX_SEED = 2**31


@triton.jit
def dropout_mask_scale(v, seed, offsets, p):
    """Apply the dropout mask to `v` (fp32 block of any shape).

    `offsets` (int32, same shape as v) = flat index of each element in the
    contiguous output (see module docstring); `seed` runtime int; `p` drop
    probability as a runtime fp32 with 0 <= p < 1 (hosts handle p >= 1 by
    writing zeros). Returns where(rand(seed, offsets) >= p, v / (1 - p), 0)."""
    r = tl.rand(seed, offsets)  # same shape as offsets, uniform [0, 1)
    keep = r >= p
    return tl.where(keep, v * (1.0 / (1.0 - p)), 0.0)


@triton.jit
def _dropout_kernel(
    x_ptr,  # [n] input (or upstream gradient in the backward)
    y_ptr,  # [n] output, x's dtype
    n,
    seed,
    p,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int32 flat index (n < 2**31)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] fp32
    y = dropout_mask_scale(x, seed, offs, p)  # [BLOCK] fp32
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x, p, seed):
    check_activation(x)
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
        raise ValueError(f"dropout probability must be in [0, 1], got {p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"dropout seed must be an int in [0, 2**31), got {seed!r}")
    if x.numel() >= 2**31:
        raise ValueError("dropout: tensors must have fewer than 2**31 elements (int32 mask offsets)")


def dropout_forward(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Training-mode dropout of x (new tensor, x's dtype). No autograd.
    p == 1 gives zeros."""
    _check(x, p, seed)
    x = contiguous(x)
    if p >= 1.0:
        return torch.zeros_like(x)
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    blk, nw = block_1d(n)
    launch(_dropout_kernel, (triton.cdiv(n, blk),), x, y, n, seed, float(p), BLOCK=blk, num_warps=nw)
    return y


def dropout_backward(dy: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Gradient of dropout_forward: the same mask (regenerated from seed and the
    flat offsets) and scale applied to dy."""
    return dropout_forward(dy, p, seed)


class DropoutFunction(torch.autograd.Function):
    """y = dropout(x) with mask rand(seed, flat index) >= p. Saves nothing but
    (p, seed): the backward regenerates the mask."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = float(p), int(seed)
        return dropout_forward(x, p, seed)

    @staticmethod
    def backward(ctx, dy):
        return dropout_backward(dy, ctx.p, ctx.seed), None, None


def dropout(x: torch.Tensor, p: float, seed: int, training: bool = True) -> torch.Tensor:
    """Autograd-aware dropout. Identity (x itself) when not training or p == 0."""
    _check(x, p, seed)
    if not training or p == 0.0:
        return x
    return DropoutFunction.apply(x, p, seed)
