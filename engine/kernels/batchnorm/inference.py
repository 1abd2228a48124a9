"""Eval-mode batch normalisation: the fold into per-channel (scale, shift), and the
per-channel affine + activation y = act(x * scale[c] + shift[c]) that applies it
to channels-last `[M, C]` rows. Forward and backward side by side.

`bn_eval_scale_shift(weight, bias, running_mean, running_var, eps)` folds BN
with a tiny kernel (differentiable wrt weight and bias), for conv/linear
epilogues or `affine_act`; `batch_norm_eval(...)` is that composition.

Public API: bn_eval_fold, BNEvalScaleShiftFunction, bn_eval_scale_shift,
batch_norm_eval, affine_act_forward, affine_act_backward, AffineActFunction, affine_act.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.activations import act_grad, apply_act
from engine.kernels.common import (act_code_checked, channel_block, check_activation, check_param,
                                   contiguous, next_pow2, reduce_plan, row_tile, rows_of, store_partial_row, tile_2d)
from engine.kernels.reduction import sum_partials
from engine.kernels.launch import launch


# --------------------------------------------------------------------------- #
# Eval mode: fold into per-channel scale/shift
# --------------------------------------------------------------------------- #
@triton.jit
def _bn_eval_fold_kernel(
    w_ptr,  # [C] fp32 weight (if HAS_W)
    b_ptr,  # [C] fp32 bias (if HAS_B)
    rm_ptr,  # [C] fp32 running mean
    rv_ptr,  # [C] fp32 running var
    scale_ptr,  # [C] fp32 out: w / sqrt(rv + eps)
    shift_ptr,  # [C] fp32 out: b - rm * scale
    C, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols, cmask = channel_block(tl.program_id(0), C, BLOCK_C)  # [BLOCK_C] each
    rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0)
    rv = tl.load(rv_ptr + cols, mask=cmask, other=1.0)
    s = 1.0 / tl.sqrt(rv + eps)  # [BLOCK_C] fp32
    if HAS_W:
        s = s * tl.load(w_ptr + cols, mask=cmask, other=0.0)
    t = -rm * s
    if HAS_B:
        t += tl.load(b_ptr + cols, mask=cmask, other=0.0)
    tl.store(scale_ptr + cols, s, mask=cmask)
    tl.store(shift_ptr + cols, t, mask=cmask)


@triton.jit
def _bn_eval_fold_bwd_kernel(
    ds_ptr,  # [C] fp32 d scale
    dt_ptr,  # [C] fp32 d shift
    rm_ptr,  # [C] fp32
    rv_ptr,  # [C] fp32
    dw_ptr,  # [C] fp32 out: rstd * (ds - rm * dt)
    db_ptr,  # [C] fp32 out: dt
    C, eps,
    BLOCK_C: tl.constexpr,
):
    cols, cmask = channel_block(tl.program_id(0), C, BLOCK_C)  # [BLOCK_C] each
    ds = tl.load(ds_ptr + cols, mask=cmask, other=0.0)
    dt = tl.load(dt_ptr + cols, mask=cmask, other=0.0)
    rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0)
    rv = tl.load(rv_ptr + cols, mask=cmask, other=1.0)
    r = 1.0 / tl.sqrt(rv + eps)
    tl.store(dw_ptr + cols, r * (ds - rm * dt), mask=cmask)
    tl.store(db_ptr + cols, dt, mask=cmask)


def _fold_block(C):
    return next_pow2(C, 16, 1024)


def bn_eval_fold(weight, bias, running_mean, running_var, eps=1e-5):
    """(scale, shift) fp32 [C]: scale = weight/sqrt(running_var+eps),
    shift = bias - running_mean*scale. No autograd."""
    if not isinstance(running_mean, torch.Tensor):
        raise ValueError("running_mean must be a tensor")
    C = running_mean.shape[0] if running_mean.dim() == 1 else -1
    check_param(running_mean, C, running_mean, "running_mean")
    check_param(running_var, C, running_mean, "running_var")
    check_param(weight, C, running_mean, "weight", optional=True)
    check_param(bias, C, running_mean, "bias", optional=True)
    scale_ = torch.empty(C, device=running_mean.device, dtype=torch.float32)
    shift_ = torch.empty(C, device=running_mean.device, dtype=torch.float32)
    bc = _fold_block(C)
    launch(_bn_eval_fold_kernel, (triton.cdiv(C, bc),),
           weight if weight is not None else running_mean, bias if bias is not None else running_mean,
           running_mean, running_var, scale_, shift_, C, float(eps),
           HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=bc, num_warps=1)
    return scale_, shift_


class BNEvalScaleShiftFunction(torch.autograd.Function):
    """(scale, shift) from BN parameters and running stats. Saves running_mean,
    running_var; gradients flow to weight and bias (not to the running stats)."""

    @staticmethod
    def forward(ctx, weight, bias, running_mean, running_var, eps):
        ctx.eps = float(eps)
        ctx.save_for_backward(running_mean, running_var)
        return bn_eval_fold(weight, bias, running_mean, running_var, eps)

    @staticmethod
    def backward(ctx, dscale, dshift):
        rm, rv = ctx.saved_tensors
        C = rm.shape[0]
        if dscale is None:
            dscale = torch.zeros(C, device=rm.device, dtype=torch.float32)
        if dshift is None:
            dshift = torch.zeros(C, device=rm.device, dtype=torch.float32)
        dscale, dshift = contiguous(dscale), contiguous(dshift)
        dw = torch.empty(C, device=rm.device, dtype=torch.float32)
        db = torch.empty(C, device=rm.device, dtype=torch.float32)
        bc = _fold_block(C)
        launch(_bn_eval_fold_bwd_kernel, (triton.cdiv(C, bc),), dscale, dshift, rm, rv, dw, db, C, ctx.eps,
               BLOCK_C=bc, num_warps=1)
        return (dw if ctx.needs_input_grad[0] else None, db if ctx.needs_input_grad[1] else None,
                None, None, None)


def bn_eval_scale_shift(weight, bias, running_mean, running_var, eps=1e-5):
    """Autograd-aware eval-mode BN fold -> (scale, shift), fp32 [C] each.
    weight/bias may be None (affine-free BN)."""
    return BNEvalScaleShiftFunction.apply(weight, bias, running_mean, running_var, eps)


def batch_norm_eval(x, weight, bias, running_mean, running_var, eps=1e-5, act="none", slope=0.01):
    """Autograd-aware eval-mode batch norm + activation = affine_act(x, *fold)."""
    s, t = bn_eval_scale_shift(weight, bias, running_mean, running_var, eps)
    return affine_act(x, s, t, act, slope)


# --------------------------------------------------------------------------- #
# Per-channel affine + activation: y = act(x * scale[c] + shift[c])
# --------------------------------------------------------------------------- #
@triton.jit
def _affine_act_fwd_kernel(
    x_ptr,  # [M, C] input
    scale_ptr,  # [C] fp32
    shift_ptr,  # [C] fp32
    y_ptr,  # [M, C] output, x's dtype
    M, C, slope,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, cmask = channel_block(tl.program_id(1), C, BLOCK_C)  # [BLOCK_C] each
    mask, offs = row_tile(tl.program_id(0), M, C, cols, cmask, BLOCK_M)  # [BLOCK_M, BLOCK_C] each
    s = tl.load(scale_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    t = tl.load(shift_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
    z = x * s[None, :] + t[None, :]
    y = apply_act(z, ACT, slope)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_act_bwd_kernel(
    dy_ptr,  # [M, C] upstream gradient
    x_ptr,  # [M, C] saved input
    scale_ptr,  # [C] fp32
    shift_ptr,  # [C] fp32
    dx_ptr,  # [M, C] out, x's dtype (if NEED_DX)
    pds_ptr,  # [T, C] fp32 partial sums of dz * x (if NEED_PARAM)
    pdt_ptr,  # [T, C] fp32 partial sums of dz (if NEED_PARAM)
    M, C, slope,
    ACT: tl.constexpr, NEED_DX: tl.constexpr, NEED_PARAM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, N_ITER: tl.constexpr,
):
    pid_t = tl.program_id(0)
    cols, cmask = channel_block(tl.program_id(1), C, BLOCK_C)  # [BLOCK_C] each
    s = tl.load(scale_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    t = tl.load(shift_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    acc_s = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # [BLOCK_M, BLOCK_C] sum dz*x
    acc_t = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # [BLOCK_M, BLOCK_C] sum dz
    for i in range(N_ITER):
        mask, offs = row_tile(pid_t * N_ITER + i, M, C, cols, cmask, BLOCK_M)  # [BLOCK_M, BLOCK_C] each
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
        z = x * s[None, :] + t[None, :]
        dz = tl.where(mask, act_grad(dy, z, ACT, slope), 0.0)  # [BLOCK_M, BLOCK_C] fp32
        if NEED_DX:
            tl.store(dx_ptr + offs, (dz * s[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_PARAM:
            acc_s += dz * x
            acc_t += dz
    if NEED_PARAM:
        store_partial_row(pds_ptr, pdt_ptr, acc_s, acc_t, pid_t, C, cols, cmask)


def affine_act_forward(x, scale, shift, act="none", slope=0.01):
    """y = act(x * scale[c] + shift[c]) over the last (channel) dim. No autograd."""
    check_activation(x)
    M, C = rows_of(x)
    check_param(scale, C, x, "scale")
    check_param(shift, C, x, "shift")
    code = act_code_checked(act)
    x = contiguous(x)
    y = torch.empty_like(x)
    if M == 0 or C == 0:
        return y
    bm, bc, nw = tile_2d(M, C)
    launch(_affine_act_fwd_kernel, (triton.cdiv(M, bm), triton.cdiv(C, bc)),
           x, scale, shift, y, M, C, float(slope), ACT=code, BLOCK_M=bm, BLOCK_C=bc, num_warps=nw)
    return y


def affine_act_backward(dy, x, scale, shift, act="none", slope=0.01, need_dx=True, need_param=True):
    """Returns (dx or None, d_scale [C] fp32 or None, d_shift [C] fp32 or None).
    d_scale = sum_rows(dz * x), d_shift = sum_rows(dz), dz = act'(z) * dy, split
    deterministic two-stage reduction."""
    check_activation(x)
    M, C = rows_of(x)
    check_param(scale, C, x, "scale")
    check_param(shift, C, x, "shift")
    if dy.shape != x.shape:
        raise ValueError(f"dy shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")
    code = act_code_checked(act)
    dy, x = contiguous(dy), contiguous(x)
    if not (need_dx or need_param):
        return None, None, None
    bm, bc, n_iter, T, nw = reduce_plan(M, C)
    dx = torch.empty_like(x) if need_dx else None
    if need_param:
        pds = torch.empty((T, C), device=x.device, dtype=torch.float32)
        pdt = torch.empty((T, C), device=x.device, dtype=torch.float32)
    else:
        pds = pdt = None
    launch(_affine_act_bwd_kernel, (T, triton.cdiv(C, bc)),
           dy, x, scale, shift, dx if need_dx else x, pds if need_param else scale,
           pdt if need_param else scale, M, C, float(slope),
           ACT=code, NEED_DX=need_dx, NEED_PARAM=need_param,
           BLOCK_M=bm, BLOCK_C=bc, N_ITER=n_iter, num_warps=nw)
    if not need_param:
        return dx, None, None
    d_scale, d_shift = sum_partials(pds, pdt)
    return dx, d_scale, d_shift


class AffineActFunction(torch.autograd.Function):
    """y = act(x * scale + shift) per channel. Saves x, scale, shift (z is
    recomputed in the backward kernel)."""

    @staticmethod
    def forward(ctx, x, scale, shift, act="none", slope=0.01):
        ctx.act, ctx.slope = act, slope
        ctx.save_for_backward(x, scale, shift)
        return affine_act_forward(x, scale, shift, act, slope)

    @staticmethod
    def backward(ctx, dy):
        x, s, t = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_param = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx, ds, dt = affine_act_backward(dy, x, s, t, ctx.act, ctx.slope, need_dx, need_param)
        return (dx, ds if ctx.needs_input_grad[1] else None,
                dt if ctx.needs_input_grad[2] else None, None, None)


def affine_act(x, scale, shift, act="none", slope=0.01):
    """Autograd-aware per-channel affine + activation (eval-mode batch norm folded
    into scale/shift, see bn_eval_scale_shift)."""
    return AffineActFunction.apply(x, scale, shift, act, slope)
