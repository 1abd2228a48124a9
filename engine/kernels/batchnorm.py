"""Batch normalisation over channels-last `[M, C]` rows (M = N*H*W), fused with
the following activation. Forward and backward side by side.

Training mode (`batch_norm_train` / `BatchNormTrainFunction`):
  forward  1. `_bn_stats_kernel`     grid (T, C-blocks): fp32 partial sums and sums
                                     of squares per row-block -> psum/psumsq [T, C]
                                     (skipped when a producer, e.g. a conv
                                     epilogue, supplies `partials=(psum, psumsq)`)
           2. `_bn_finalize_kernel`  grid (C-blocks): reduces the T partials in a
                                     fixed order -> mean, rstd [C]; updates
                                     running_mean/running_var in place like PyTorch
           3. `_bn_count_kernel`     num_batches_tracked += 1 (when given)
           4. `_bn_apply_kernel`     y = act((x - mean) * rstd * weight + bias)
  backward 1. `_bn_bwd_reduce_kernel` partials of sum(dz), sum(dz * xhat) with
                                     dz = act'(z) * dy (z recomputed from x)
           2. pointwise.sum_partials  fixed-order reduction -> dbias, dweight [C]
           3. `_bn_bwd_apply_kernel`  dx = weight*rstd*(dz - dbias/M - xhat*dweight/M)
Everything is deterministic (no atomics). Statistics use fp32 sum / sum of
squares (var = E[x^2] - mean^2, clamped at 0): fine for normalised activations,
less accurate than Welford when |mean| >> std.

Eval mode: `bn_eval_scale_shift(weight, bias, running_mean, running_var, eps)`
folds BN into per-channel (scale, shift) with a tiny kernel (differentiable wrt
weight and bias), for conv/linear epilogues or `pointwise.affine_act`;
`batch_norm_eval(...)` is that composition.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.activations import act_grad, apply_act
from engine.kernels.launch import launch
from engine.kernels.pointwise import (
    _act_code_checked,
    _contig,
    affine_act,
    check_activation,
    check_param,
    finalize_plan,
    next_pow2,
    reduce_plan,
    reduce_rows,
    row_tile,
    rows_of,
    sum_partials,
    tile_2d,
)


# --------------------------------------------------------------------------- #
# Training-mode kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _bn_stats_kernel(
    x_ptr,  # [M, C] activations
    psum_ptr,  # [T, C] fp32 out: partial sum(x)
    psumsq_ptr,  # [T, C] fp32 out: partial sum(x*x)
    M,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    N_ITER: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = cols < C
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # [BLOCK_M, BLOCK_C] sum x
    acc2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # [BLOCK_M, BLOCK_C] sum x^2
    for i in range(N_ITER):
        mask, offs = row_tile(pid_t * N_ITER + i, M, C, cols, cmask, BLOCK_M)  # [BLOCK_M, BLOCK_C] each
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
        acc += x
        acc2 += x * x
    poffs = pid_t.to(tl.int64) * C + cols  # [BLOCK_C]
    tl.store(psum_ptr + poffs, tl.sum(acc, axis=0), mask=cmask)
    tl.store(psumsq_ptr + poffs, tl.sum(acc2, axis=0), mask=cmask)


@triton.jit
def _bn_finalize_kernel(
    psum_ptr,  # [T, C] fp32 partial sums
    psumsq_ptr,  # [T, C] fp32 partial sums of squares
    mean_ptr,  # [C] fp32 out: batch mean
    rstd_ptr,  # [C] fp32 out: 1/sqrt(biased var + eps)
    rmean_ptr,  # [C] fp32 running mean, updated in place (if HAS_RUNNING)
    rvar_ptr,  # [C] fp32 running var, updated in place (if HAS_RUNNING)
    nbt_ptr,  # [] int64 num_batches_tracked before this step (if CMA)
    T,
    C,
    inv_m,  # 1/M
    unbias,  # M/(M-1)
    eps,
    momentum,
    HAS_RUNNING: tl.constexpr,
    CMA: tl.constexpr,  # momentum=None: cumulative moving average, factor 1/(nbt+1)
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = cols < C
    s = reduce_rows(psum_ptr, T, C, cols, cmask, BLOCK_T, BLOCK_C)  # [BLOCK_C] fp32
    ss = reduce_rows(psumsq_ptr, T, C, cols, cmask, BLOCK_T, BLOCK_C)  # [BLOCK_C] fp32
    mean = s * inv_m
    var = tl.maximum(ss * inv_m - mean * mean, 0.0)  # [BLOCK_C] biased variance
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(rstd_ptr + cols, rstd, mask=cmask)
    if HAS_RUNNING:
        if CMA:
            n = tl.load(nbt_ptr) + 1  # scalar int64: count including this batch
            f = 1.0 / n.to(tl.float32)
        else:
            f = momentum
        rm = tl.load(rmean_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
        rv = tl.load(rvar_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
        tl.store(rmean_ptr + cols, (1.0 - f) * rm + f * mean, mask=cmask)
        tl.store(rvar_ptr + cols, (1.0 - f) * rv + f * (var * unbias), mask=cmask)


@triton.jit
def _bn_count_kernel(nbt_ptr):  # [] int64 num_batches_tracked, += 1
    tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


@triton.jit
def _bn_apply_kernel(
    x_ptr,  # [M, C] input
    mean_ptr,  # [C] fp32
    rstd_ptr,  # [C] fp32
    w_ptr,  # [C] fp32 weight (if HAS_W)
    b_ptr,  # [C] fp32 bias (if HAS_B)
    y_ptr,  # [M, C] out, x's dtype
    M,
    C,
    slope,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = cols < C
    mask, offs = row_tile(pid_m, M, C, cols, cmask, BLOCK_M)  # [BLOCK_M, BLOCK_C] each
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    a = tl.load(rstd_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32 rstd*weight
    if HAS_W:
        a = a * tl.load(w_ptr + cols, mask=cmask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
    z = (x - mean[None, :]) * a[None, :]  # [BLOCK_M, BLOCK_C] pre-activation
    if HAS_B:
        z += tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
    y = apply_act(z, ACT, slope)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_dz(dy, x, mean, rstd, w, b, slope, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr):
    """(dz, xhat) for a [BLOCK_M, BLOCK_C] tile: xhat = (x-mean)*rstd, z = xhat*w + b,
    dz = act'(z) * dy. mean/rstd/w/b are [BLOCK_C]."""
    xhat = (x - mean[None, :]) * rstd[None, :]
    if ACT == 0:
        dz = dy
    else:
        z = xhat
        if HAS_W:
            z = z * w[None, :]
        if HAS_B:
            z = z + b[None, :]
        dz = act_grad(dy, z, ACT, slope)
    return dz, xhat


@triton.jit
def _bn_bwd_reduce_kernel(
    dy_ptr,  # [M, C] upstream gradient
    x_ptr,  # [M, C] saved input
    mean_ptr,  # [C] fp32
    rstd_ptr,  # [C] fp32
    w_ptr,  # [C] fp32 (if HAS_W)
    b_ptr,  # [C] fp32 (if HAS_B)
    pdz_ptr,  # [T, C] fp32 out: partial sum(dz)
    pdzx_ptr,  # [T, C] fp32 out: partial sum(dz * xhat)
    M,
    C,
    slope,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    N_ITER: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    else:
        w = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    else:
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # [BLOCK_M, BLOCK_C] sum dz
    accx = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # [BLOCK_M, BLOCK_C] sum dz*xhat
    for i in range(N_ITER):
        mask, offs = row_tile(pid_t * N_ITER + i, M, C, cols, cmask, BLOCK_M)  # [BLOCK_M, BLOCK_C] each
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
        dz, xhat = _bn_dz(dy, x, mean, rstd, w, b, slope, HAS_W, HAS_B, ACT)
        dz = tl.where(mask, dz, 0.0)
        acc += dz
        accx += dz * xhat
    poffs = pid_t.to(tl.int64) * C + cols  # [BLOCK_C]
    tl.store(pdz_ptr + poffs, tl.sum(acc, axis=0), mask=cmask)
    tl.store(pdzx_ptr + poffs, tl.sum(accx, axis=0), mask=cmask)


@triton.jit
def _bn_bwd_apply_kernel(
    dy_ptr,  # [M, C] upstream gradient
    x_ptr,  # [M, C] saved input
    mean_ptr,  # [C] fp32
    rstd_ptr,  # [C] fp32
    w_ptr,  # [C] fp32 (if HAS_W)
    b_ptr,  # [C] fp32 (if HAS_B)
    sdz_ptr,  # [C] fp32 sum(dz)        (= dbias)
    sdzx_ptr,  # [C] fp32 sum(dz*xhat)  (= dweight)
    dx_ptr,  # [M, C] out, x's dtype
    M,
    C,
    inv_m,
    slope,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = cols < C
    mask, offs = row_tile(pid_m, M, C, cols, cmask, BLOCK_M)  # [BLOCK_M, BLOCK_C] each
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    else:
        w = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    else:
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
    mdz = tl.load(sdz_ptr + cols, mask=cmask, other=0.0) * inv_m  # [BLOCK_C] mean(dz)
    mdzx = tl.load(sdzx_ptr + cols, mask=cmask, other=0.0) * inv_m  # [BLOCK_C] mean(dz*xhat)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
    dz, xhat = _bn_dz(dy, x, mean, rstd, w, b, slope, HAS_W, HAS_B, ACT)
    k = w * rstd  # [BLOCK_C]
    dx = k[None, :] * (dz - mdz[None, :] - xhat * mdzx[None, :])  # [BLOCK_M, BLOCK_C] fp32
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- #
# Host launchers (training mode)
# --------------------------------------------------------------------------- #
def _check_opt_param(p, C, x, name):
    if p is not None:
        check_param(p, C, x, name)


def bn_train_forward(
    x, weight, bias, running_mean, running_var, *, momentum=0.1, eps=1e-5,
    num_batches_tracked=None, act="none", slope=0.01, partials=None,
):
    """Training-mode batch norm + activation on channels-last x ([..., C]).

    Returns (y, mean, rstd): y in x's dtype and shape; mean and rstd fp32 [C]
    (rstd = 1/sqrt(biased batch var + eps)). Updates running_mean/running_var
    (fp32 [C] or both None) in place like torch.nn.functional.batch_norm, and
    num_batches_tracked (int64 tensor, if given) += 1. momentum=None means a
    cumulative moving average with factor 1/num_batches_tracked (after the
    increment) and requires num_batches_tracked. `partials=(psum, psumsq)`
    (fp32 [T, C] partial sums of x and x*x over disjoint row sets covering all
    rows) skips the statistics pass. No autograd: see batch_norm_train.
    """
    check_activation(x)
    M, C = rows_of(x)
    _check_opt_param(weight, C, x, "weight")
    _check_opt_param(bias, C, x, "bias")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    has_running = running_mean is not None
    if has_running:
        check_param(running_mean, C, x, "running_mean")
        check_param(running_var, C, x, "running_var")
    if num_batches_tracked is not None:
        if (not isinstance(num_batches_tracked, torch.Tensor) or num_batches_tracked.dtype != torch.int64
                or num_batches_tracked.numel() != 1 or num_batches_tracked.device != x.device):
            raise ValueError("num_batches_tracked must be a one-element int64 tensor on x's device")
    if momentum is None and has_running and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if M <= 1:
        raise ValueError(f"batch norm in training mode needs more than 1 value per channel, got M={M} rows "
                         f"for input shape {tuple(x.shape)}")
    code = _act_code_checked(act)
    x = _contig(x)
    dev = x.device

    if partials is None:
        bm, bc, n_iter, T, nw = reduce_plan(M, C)
        psum = torch.empty((T, C), device=dev, dtype=torch.float32)
        psumsq = torch.empty((T, C), device=dev, dtype=torch.float32)
        launch(_bn_stats_kernel, (T, triton.cdiv(C, bc)), x, psum, psumsq, M, C,
               BLOCK_M=bm, BLOCK_C=bc, N_ITER=n_iter, num_warps=nw)
    else:
        psum, psumsq = partials
        for name, p in (("psum", psum), ("psumsq", psumsq)):
            if (not isinstance(p, torch.Tensor) or p.dtype != torch.float32 or p.dim() != 2
                    or p.shape[1] != C or not p.is_contiguous() or p.device != dev):
                raise ValueError(f"partials: {name} must be a contiguous fp32 [T, {C}] tensor on {dev}")
        if psum.shape != psumsq.shape:
            raise ValueError(f"partials: psum {tuple(psum.shape)} and psumsq {tuple(psumsq.shape)} differ")
        T = psum.shape[0]

    mean = torch.empty(C, device=dev, dtype=torch.float32)
    rstd = torch.empty(C, device=dev, dtype=torch.float32)
    bt, bcf, nwf = finalize_plan(T, C)
    cma = has_running and momentum is None
    launch(_bn_finalize_kernel, (triton.cdiv(C, bcf),),
           psum, psumsq, mean, rstd,
           running_mean if has_running else mean, running_var if has_running else rstd,
           num_batches_tracked if cma else psum,
           T, C, 1.0 / M, M / (M - 1), float(eps), float(momentum) if momentum is not None else 0.0,
           HAS_RUNNING=has_running, CMA=cma, BLOCK_T=bt, BLOCK_C=bcf, num_warps=nwf)
    if num_batches_tracked is not None:
        launch(_bn_count_kernel, (1,), num_batches_tracked, num_warps=1)

    y = torch.empty_like(x)
    bm, bc, nw = tile_2d(M, C)
    launch(_bn_apply_kernel, (triton.cdiv(M, bm), triton.cdiv(C, bc)),
           x, mean, rstd, weight if weight is not None else mean, bias if bias is not None else mean, y,
           M, C, float(slope), HAS_W=weight is not None, HAS_B=bias is not None, ACT=code,
           BLOCK_M=bm, BLOCK_C=bc, num_warps=nw)
    return y, mean, rstd


def bn_train_backward(dy, x, mean, rstd, weight, bias, act="none", slope=0.01, need_dx=True):
    """Backward of bn_train_forward. Returns (dx or None, dweight [C] fp32,
    dbias [C] fp32); dweight = sum(dz*xhat), dbias = sum(dz), dz = act'(z)*dy."""
    check_activation(x)
    M, C = rows_of(x)
    if dy.shape != x.shape:
        raise ValueError(f"dy shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")
    check_param(mean, C, x, "mean")
    check_param(rstd, C, x, "rstd")
    _check_opt_param(weight, C, x, "weight")
    _check_opt_param(bias, C, x, "bias")
    code = _act_code_checked(act)
    dy, x = _contig(dy), _contig(x)
    dev = x.device
    has_w, has_b = weight is not None, bias is not None
    wp = weight if has_w else mean
    bp = bias if has_b else mean

    bm, bc, n_iter, T, nw = reduce_plan(M, C)
    pdz = torch.empty((T, C), device=dev, dtype=torch.float32)
    pdzx = torch.empty((T, C), device=dev, dtype=torch.float32)
    launch(_bn_bwd_reduce_kernel, (T, triton.cdiv(C, bc)),
           dy, x, mean, rstd, wp, bp, pdz, pdzx, M, C, float(slope),
           HAS_W=has_w, HAS_B=has_b, ACT=code, BLOCK_M=bm, BLOCK_C=bc, N_ITER=n_iter, num_warps=nw)
    dbias, dweight = sum_partials(pdz, pdzx)
    dx = None
    if need_dx:
        dx = torch.empty_like(x)
        bm, bc, nw = tile_2d(M, C)
        launch(_bn_bwd_apply_kernel, (triton.cdiv(M, bm), triton.cdiv(C, bc)),
               dy, x, mean, rstd, wp, bp, dbias, dweight, dx, M, C, 1.0 / M, float(slope),
               HAS_W=has_w, HAS_B=has_b, ACT=code, BLOCK_M=bm, BLOCK_C=bc, num_warps=nw)
    return dx, dweight, dbias


class BatchNormTrainFunction(torch.autograd.Function):
    """y = act(batchnorm_train(x)). Inputs: (x, weight, bias, running_mean,
    running_var, num_batches_tracked, momentum, eps, act, slope, psum, psumsq).
    Saves x, weight, bias, mean [C] and rstd [C] (fp32); the pre-activation and
    xhat are recomputed from x in the backward kernels. Gradients for x, weight,
    bias; none for the running statistics or partials."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, act, slope, psum, psumsq):
        partials = (psum, psumsq) if psum is not None else None
        y, mean, rstd = bn_train_forward(
            x, weight, bias, running_mean, running_var, momentum=momentum, eps=eps,
            num_batches_tracked=num_batches_tracked, act=act, slope=slope, partials=partials)
        ctx.act, ctx.slope = act, slope
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = bn_train_backward(dy, x, mean, rstd, weight, bias, ctx.act, ctx.slope,
                                       need_dx=ctx.needs_input_grad[0])
        return (dx, dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None,
                None, None, None, None, None, None, None, None, None)


def batch_norm_train(
    x, weight, bias, running_mean, running_var, *, momentum=0.1, eps=1e-5,
    num_batches_tracked=None, act="none", slope=0.01, partials=None,
):
    """Autograd-aware training-mode batch norm + activation (see bn_train_forward)."""
    psum, psumsq = partials if partials is not None else (None, None)
    return BatchNormTrainFunction.apply(x, weight, bias, running_mean, running_var, num_batches_tracked,
                                        momentum, eps, act, slope, psum, psumsq)


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
    C,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = cols < C
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
    C,
    eps,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = cols < C
    ds = tl.load(ds_ptr + cols, mask=cmask, other=0.0)
    dt = tl.load(dt_ptr + cols, mask=cmask, other=0.0)
    rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0)
    rv = tl.load(rv_ptr + cols, mask=cmask, other=1.0)
    r = 1.0 / tl.sqrt(rv + eps)
    tl.store(dw_ptr + cols, r * (ds - rm * dt), mask=cmask)
    tl.store(db_ptr + cols, dt, mask=cmask)


def _fold_block(C):
    return max(16, min(next_pow2(C), 1024))


def bn_eval_fold(weight, bias, running_mean, running_var, eps=1e-5):
    """(scale, shift) fp32 [C]: scale = weight/sqrt(running_var+eps),
    shift = bias - running_mean*scale. No autograd."""
    if not isinstance(running_mean, torch.Tensor):
        raise ValueError("running_mean must be a tensor")
    C = running_mean.shape[0] if running_mean.dim() == 1 else -1
    check_param(running_mean, C, running_mean, "running_mean")
    check_param(running_var, C, running_mean, "running_var")
    _check_opt_param(weight, C, running_mean, "weight")
    _check_opt_param(bias, C, running_mean, "bias")
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
        dscale, dshift = _contig(dscale), _contig(dshift)
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
