"""Softmax and log-softmax over the channel (last) dim of `[M, C]` rows.

Numerically stable (max subtracted). When a row block holds all C channels
(`SINGLE`), each row is read once; for wider C the forward does an online
(running max / rescaled sum) pass over channel blocks, then a second pass that
writes. Backward (y = saved output):
    softmax:      dx = y * (dy - sum(dy * y))
    log_softmax:  dx = dy - exp(y) * sum(dy)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine import device as _device
from engine.kernels.common import check_activation, contiguous, next_pow2, rows_of
from engine.kernels.launch import launch

INTERP_MAX_BLOCK_C = 4096
INTERP_TILE = 1 << 16
GPU_MAX_BLOCK_C = 4096
GPU_TILE = 4096


def _plan(M: int, C: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_C, SINGLE, num_warps)."""
    if _device.INTERPRETED:
        bc = min(next_pow2(C), INTERP_MAX_BLOCK_C)
        bm = max(1, min(next_pow2(M), INTERP_TILE // bc))
        return bm, bc, bc >= C, 4
    bc = max(16, min(next_pow2(C), GPU_MAX_BLOCK_C))
    bm = max(1, min(next_pow2(M), GPU_TILE // bc))
    return bm, bc, bc >= C, (8 if bc >= 2048 else 4)


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,  # [M, C] input
    y_ptr,  # [M, C] output, x's dtype
    M,
    C,
    LOG: tl.constexpr,
    SINGLE: tl.constexpr,  # BLOCK_C >= C: one load per row
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rmask = rows < M
    rbase = rows[:, None].to(tl.int64) * C  # [BLOCK_M, 1]
    if SINGLE:
        cols = tl.arange(0, BLOCK_C)  # [BLOCK_C]
        mask = rmask[:, None] & (cols[None, :] < C)  # [BLOCK_M, BLOCK_C]
        x = tl.load(x_ptr + rbase + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        x = tl.where(rmask[:, None], x, 0.0)  # padded rows behave like zeros (no NaN)
        m = tl.max(x, axis=1)  # [BLOCK_M]
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(x - m[:, None])  # [BLOCK_M, BLOCK_C]; padded cols -> 0
        s = tl.sum(e, axis=1)  # [BLOCK_M]
        if LOG:
            y = x - m[:, None] - tl.log(s)[:, None]
        else:
            y = e / s[:, None]
        tl.store(y_ptr + rbase + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # [BLOCK_M] running max
        s = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BLOCK_M] running sum of exp(x - m)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = rmask[:, None] & (cols[None, :] < C)
            x = tl.load(x_ptr + rbase + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            x = tl.where(rmask[:, None], x, 0.0)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
            m = m_new
        m = tl.where(m == float("-inf"), 0.0, m)
        if LOG:
            lse = m + tl.log(s)  # [BLOCK_M]
        else:
            inv = 1.0 / s  # [BLOCK_M]
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = rmask[:, None] & (cols[None, :] < C)
            x = tl.load(x_ptr + rbase + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if LOG:
                y = x - lse[:, None]
            else:
                y = tl.exp(x - m[:, None]) * inv[:, None]
            tl.store(y_ptr + rbase + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    dy_ptr,  # [M, C] upstream gradient
    y_ptr,  # [M, C] saved forward output
    dx_ptr,  # [M, C] out, y's dtype
    M,
    C,
    LOG: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rmask = rows < M
    rbase = rows[:, None].to(tl.int64) * C  # [BLOCK_M, 1]
    if SINGLE:
        cols = tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols[None, :] < C)  # [BLOCK_M, BLOCK_C]
        dy = tl.load(dy_ptr + rbase + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rbase + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if LOG:
            p = tl.where(mask, tl.exp(y), 0.0)
            dx = dy - p * tl.sum(dy, axis=1)[:, None]
        else:
            dx = y * (dy - tl.sum(dy * y, axis=1)[:, None])
        tl.store(dx_ptr + rbase + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # [BLOCK_M, BLOCK_C] partial dots
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = rmask[:, None] & (cols[None, :] < C)
            dy = tl.load(dy_ptr + rbase + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if LOG:
                acc += dy
            else:
                y = tl.load(y_ptr + rbase + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                acc += dy * y
        dot = tl.sum(acc, axis=1)  # [BLOCK_M]
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = rmask[:, None] & (cols[None, :] < C)
            dy = tl.load(dy_ptr + rbase + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + rbase + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if LOG:
                dx = dy - tl.exp(y) * dot[:, None]
            else:
                dx = y * (dy - dot[:, None])
            tl.store(dx_ptr + rbase + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


def softmax_forward(x: torch.Tensor, log: bool = False) -> torch.Tensor:
    """(log-)softmax over the last dim; new tensor of x's dtype. No autograd."""
    check_activation(x)
    M, C = rows_of(x)
    x = contiguous(x)
    y = torch.empty_like(x)
    if M == 0 or C == 0:
        return y
    bm, bc, single, nw = _plan(M, C)
    launch(_softmax_fwd_kernel, (triton.cdiv(M, bm),), x, y, M, C,
           LOG=bool(log), SINGLE=single, BLOCK_M=bm, BLOCK_C=bc, num_warps=nw)
    return y


def softmax_backward(dy: torch.Tensor, y: torch.Tensor, log: bool = False) -> torch.Tensor:
    """Gradient wrt the input of (log-)softmax given its output y."""
    check_activation(y, "y")
    if dy.shape != y.shape:
        raise ValueError(f"dy shape {tuple(dy.shape)} != y shape {tuple(y.shape)}")
    M, C = rows_of(y)
    dy, y = contiguous(dy), contiguous(y)
    dx = torch.empty_like(y)
    if M == 0 or C == 0:
        return dx
    bm, bc, single, nw = _plan(M, C)
    launch(_softmax_bwd_kernel, (triton.cdiv(M, bm),), dy, y, dx, M, C,
           LOG=bool(log), SINGLE=single, BLOCK_M=bm, BLOCK_C=bc, num_warps=nw)
    return dx


class SoftmaxFunction(torch.autograd.Function):
    """Softmax (log=False) or log-softmax (log=True) over the last dim. Saves the output y."""

    @staticmethod
    def forward(ctx, x, log=False):
        y = softmax_forward(x, log)
        ctx.log = bool(log)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return softmax_backward(dy, y, ctx.log), None


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Autograd-aware softmax over the last (channel) dim."""
    return SoftmaxFunction.apply(x, False)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """Autograd-aware log-softmax over the last (channel) dim."""
    return SoftmaxFunction.apply(x, True)
