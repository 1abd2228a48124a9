"""Training-mode batch normalisation over channels-last `[M, C]` rows (M = N*H*W),
fused with the following activation: the forward kernels, and the autograd Function
that pairs them with the backward's.

  forward  1. `_bn_stats_kernel`     grid (T, C-blocks): fp32 partial sums and sums
                                     of squares per row-block -> psum/psumsq [T, C]
                                     (skipped when a producer, e.g. a conv
                                     epilogue, supplies `partials=(psum, psumsq)`)
           2. `_bn_finalize_kernel`  grid (C-blocks): reduces the T partials in a
                                     fixed order -> mean, rstd [C]; updates
                                     running_mean/running_var in place like PyTorch
                                     and num_batches_tracked += 1 (one program).
              More than common.FOLD_ROWS partial rows (a conv epilogue's per-tile
              sums) take `_bn_fold_finalize_kernel` instead, grid (T2, C-blocks):
              the rows are folded in parallel to T2 ~ GPU_TARGET_PARTIALS rows and
              the last program of each channel block to finish its fold (ticket
              counter, reduction.last_to_arrive) finalises that block: one launch.
              A conv producer finishes them itself instead (`bn_stats_tail` in its
              epilogue, the same fold and finalise without a launch: a BatchStats)
           3. `_bn_apply_kernel`     y = act((x - mean) * rstd * weight + bias)
  backward   engine.kernels.batchnorm.backward: the sums of dz and dz*xhat (its own pass, or
             the epilogue of the conv dgrad that makes dy), then dx (through a fused pool's argmax
             when x is a conv's pooled output)
Everything is deterministic (the only atomics are the int32 tickets that pick
which program adds the partials, never the order they are added in).
Statistics use fp32 sum / sum of
squares (var = E[x^2] - mean^2, clamped at 0): fine for normalised activations,
less accurate than Welford when |mean| >> std.

Public API: bn_train_forward, BatchNormTrainFunction, batch_norm_train, BatchStats, StatsTail; device:
bn_stats_tail.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.kernels.activations import apply_act
from engine.kernels.batchnorm.backward import BnApplyLink, BnGradLink, PoolGradLink, bn_train_backward
from engine import device as _device
from engine.kernels.common import (FOLD_ROWS, act_code_checked, channel_block, check_activation, check_param,
                                   contiguous, finalize_plan, reduce_plan, reduce_rows, row_tile, rows_block, rows_of,
                                   store_partial_row, tile_2d)
from engine.kernels.layout import operand_align
from engine.kernels.reduction import (TAIL_ELEMS, fold_plan, fold_rows, fold_tail, fold_tail_buffers,
                                      last_to_arrive, sum_row_range, ticket_counters)
from engine.kernels.launch import launch


class BatchStats(NamedTuple):
    """A training batch norm's batch statistics, finished by the kernel that made its input
    (bn_stats_tail): mean and rstd, fp32 [C]; the running statistics are already updated."""

    mean: torch.Tensor
    rstd: torch.Tensor


@dataclass(frozen=True)
class StatsTail:
    """What a producer's kernel needs to finish a training batch norm's statistics itself
    (bn_stats_tail): the batch norm's running statistics (or None), num_batches_tracked (or None),
    momentum (None: cumulative average) and eps."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    momentum: float | None
    eps: float

    def finalize_args(self, M: int, C: int, device) -> tuple[tuple, tuple, dict]:
        """The arguments every finalize of M values per channel and C channels takes (the finalize
        kernels', bn_stats_tail's): tensors mean, rstd (new), running mean, running var,
        num_batches_tracked (placeholders where absent); scalars 1/M, M/(M-1), eps, momentum;
        constexprs HAS_RUNNING, CMA, COUNT."""
        has_running = self.running_mean is not None
        count = self.num_batches_tracked is not None
        if self.momentum is None and has_running and not count:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        mean = torch.empty(C, device=device, dtype=torch.float32)
        rstd = torch.empty(C, device=device, dtype=torch.float32)
        tensors = (mean, rstd, self.running_mean if has_running else mean,
                   self.running_var if has_running else rstd, self.num_batches_tracked if count else mean)
        momentum = float(self.momentum) if self.momentum is not None else 0.0
        scalars = (1.0 / M, M / max(M - 1, 1), float(self.eps), momentum)
        return tensors, scalars, dict(HAS_RUNNING=has_running, CMA=has_running and self.momentum is None,
                                      COUNT=count)

    def launch_args(self, T: int, M: int, C: int, block_c: int, device) -> tuple[tuple, tuple, dict, BatchStats]:
        """(tensors, scalars, constexprs, the BatchStats they fill) of bn_stats_tail for T partial rows
        of M values per channel, C channels in blocks of block_c: tensors fsum, fsumsq, tickets, then
        finalize_args'; scalars T, R, then finalize_args'."""
        fsum, fsumsq, tickets, R, bt = fold_tail_buffers(T, C, block_c, device, extra_tickets=1)
        stats, scalars, flags = self.finalize_args(M, C, device)
        return (fsum, fsumsq, tickets, *stats), (T, R, *scalars), dict(flags, ST_BLOCK_T=bt), BatchStats(*stats[:2])


# --------------------------------------------------------------------------- #
# Training-mode kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _bn_stats_kernel(
    x_ptr,  # [M, C] activations
    psum_ptr,  # [T, C] fp32 out: partial sum(x)
    psumsq_ptr,  # [T, C] fp32 out: partial sum(x*x)
    M, C,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, N_ITER: tl.constexpr,
):
    pid_t = tl.program_id(0)
    cols, cmask = channel_block(tl.program_id(1), C, BLOCK_C)  # [BLOCK_C] each
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # [BLOCK_M, BLOCK_C] sum x
    acc2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # [BLOCK_M, BLOCK_C] sum x^2
    for i in range(N_ITER):
        mask, offs = row_tile(pid_t * N_ITER + i, M, C, cols, cmask, BLOCK_M)  # [BLOCK_M, BLOCK_C] each
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
        acc += x
        acc2 += x * x
    store_partial_row(psum_ptr, psumsq_ptr, acc, acc2, pid_t, C, cols, cmask)


@triton.jit
def _bn_finish_block(s, ss, cols, cmask, mean_ptr, rstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
                     inv_m, unbias, eps, momentum, HAS_RUNNING: tl.constexpr, CMA: tl.constexpr):
    """mean, rstd and the running statistics of channels `cols` from their sums s and sums of squares ss
    ([BLOCK_C] fp32 each)."""
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
def _bn_count(nbt_ptr, ctr_ptr, block, n_blocks, COUNT: tl.constexpr, CMA: tl.constexpr):
    """num_batches_tracked += 1, once per launch, by one of the n_blocks programs finalising channel
    blocks (`block` is this one's): block 0; with CMA, where every one reads the count first, the last of
    them to arrive at the counter ctr_ptr."""
    if COUNT:
        if CMA:
            if last_to_arrive(ctr_ptr, n_blocks):
                tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
        else:
            if block == 0:
                tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


@triton.jit
def _bn_finalize_kernel(
    psum_ptr,  # [T, C] fp32 partial sums
    psumsq_ptr,  # [T, C] fp32 partial sums of squares
    mean_ptr,  # [C] fp32 out: batch mean
    rstd_ptr,  # [C] fp32 out: 1/sqrt(biased var + eps)
    rmean_ptr,  # [C] fp32 running mean, updated in place (if HAS_RUNNING)
    rvar_ptr,  # [C] fp32 running var, updated in place (if HAS_RUNNING)
    nbt_ptr,  # [] int64 num_batches_tracked, read (if CMA) and += 1 (if COUNT)
    ctr_ptr,  # [1] int32 ticket counter, 0 between launches (if COUNT and CMA)
    T, C,
    inv_m,  # 1/M
    unbias,  # M/(M-1)
    eps, momentum,
    HAS_RUNNING: tl.constexpr,
    CMA: tl.constexpr,  # momentum=None: cumulative moving average, factor 1/(nbt+1)
    COUNT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, cmask = channel_block(tl.program_id(0), C, BLOCK_C)  # [BLOCK_C] each
    s = reduce_rows(psum_ptr, T, C, cols, cmask, BLOCK_T, BLOCK_C)  # [BLOCK_C] fp32
    ss = reduce_rows(psumsq_ptr, T, C, cols, cmask, BLOCK_T, BLOCK_C)  # [BLOCK_C] fp32
    _bn_finish_block(s, ss, cols, cmask, mean_ptr, rstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
                     inv_m, unbias, eps, momentum, HAS_RUNNING, CMA)
    _bn_count(nbt_ptr, ctr_ptr, tl.program_id(0), tl.num_programs(0), COUNT, CMA)


@triton.jit
def _bn_fold_finalize_kernel(
    psum_ptr,  # [T, C] fp32 partial sums (many rows: a conv epilogue's per-tile sums)
    psumsq_ptr,  # [T, C] fp32 partial sums of squares
    fsum_ptr,  # [T2, C] fp32 scratch: the fold's rows (R input rows each)
    fsumsq_ptr,  # [T2, C] fp32 scratch
    mean_ptr, rstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr,  # as in _bn_finalize_kernel
    ctr_ptr,  # [C-blocks + 1] int32 ticket counters, 0 between launches: one per channel block, one for CMA
    T, C, R, inv_m, unbias, eps, momentum,
    HAS_RUNNING: tl.constexpr, CMA: tl.constexpr, COUNT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_T2: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (T2, C-blocks): program (r, c) folds rows r*R ... of channel block c in parallel with the
    others; the last of the T2 to finish block c reduces its T2 folded rows (fixed order) and finalises it."""
    pid_c = tl.program_id(1)
    cols, cmask = channel_block(pid_c, C, BLOCK_C)  # [BLOCK_C] each
    fold_rows(psum_ptr, psumsq_ptr, fsum_ptr, fsumsq_ptr, tl.program_id(0), T, C, R, cols, cmask,
              True, BLOCK_T, BLOCK_C)
    T2 = tl.num_programs(0)
    if last_to_arrive(ctr_ptr + pid_c, T2):
        s, ss = sum_row_range(fsum_ptr, fsumsq_ptr, 0, T2, C, cols, cmask, True, BLOCK_T2, BLOCK_C)  # [BLOCK_C] each
        _bn_finish_block(s, ss, cols, cmask, mean_ptr, rstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
                         inv_m, unbias, eps, momentum, HAS_RUNNING, CMA)
        _bn_count(nbt_ptr, ctr_ptr + tl.num_programs(1), pid_c, tl.num_programs(1), COUNT, CMA)


@triton.jit
def bn_stats_tail(psum_ptr, psumsq_ptr, fsum_ptr, fsumsq_ptr, ctr_ptr, row, T, R, C, cblock, n_cblocks, cols, cmask,
                  mean_ptr, rstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr, inv_m, unbias, eps, momentum,
                  HAS_RUNNING: tl.constexpr, CMA: tl.constexpr, COUNT: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """`_bn_fold_finalize_kernel` without its launch, in the kernel that writes the partial sums (a conv
    epilogue): called by every program after it stored row `row` (of T) of psum/psumsq for channel
    block `cblock` (of n_cblocks; channels `cols`), the last programs to arrive fold and sum the rows
    (reduction.fold_tail) and finalise the block: mean, rstd, the running statistics, and
    num_batches_tracked once per launch. ctr: int32 [(cdiv(T, R) + 1) * n_cblocks + 1] tickets at 0."""
    done, s, ss = fold_tail(psum_ptr, psumsq_ptr, fsum_ptr, fsumsq_ptr, ctr_ptr, row, T, R, C, cblock, n_cblocks,
                            cols, cmask, BLOCK_T, BLOCK_C)  # [BLOCK_C] each
    if done:
        _bn_finish_block(s, ss, cols, cmask, mean_ptr, rstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
                         inv_m, unbias, eps, momentum, HAS_RUNNING, CMA)
        _bn_count(nbt_ptr, ctr_ptr + ((T + R - 1) // R + 1) * n_cblocks, cblock, n_cblocks, COUNT, CMA)


@triton.jit
def _bn_apply_kernel(
    x_ptr,  # [M, C] input
    mean_ptr,  # [C] fp32
    rstd_ptr,  # [C] fp32
    w_ptr,  # [C] fp32 weight (if HAS_W)
    b_ptr,  # [C] fp32 bias (if HAS_B)
    y_ptr,  # [M, C] out, x's dtype
    M, C_A, slope,  # C = C_A * ALIGN channels
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # C in units of ALIGN (channels per 16 bytes): the compiler then proves each row's channels 16-byte
    # aligned and moves them in vectors (a 24-channel bf16 tensor took 2-byte loads: 1,614 instructions
    # a program, issue-bound at 52 us against 28 us of HBM in airbench94)
    C = C_A * ALIGN
    cols, cmask = channel_block(tl.program_id(1), C, BLOCK_C)  # [BLOCK_C] each
    mask, offs = row_tile(tl.program_id(0), M, C, cols, cmask, BLOCK_M)  # [BLOCK_M, BLOCK_C] each
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


# --------------------------------------------------------------------------- #
# Host launchers (training mode)
# --------------------------------------------------------------------------- #
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
    rows) skips the statistics pass; a BatchStats (the producer's kernel finished them and updated
    the running statistics, bn_stats_tail) skips the finalize too. No autograd: see batch_norm_train.
    """
    check_activation(x)
    M, C = rows_of(x)
    check_param(weight, C, x, "weight", optional=True)
    check_param(bias, C, x, "bias", optional=True)
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
    if M <= 1:
        raise ValueError(f"batch norm in training mode needs more than 1 value per channel, got M={M} rows "
                         f"for input shape {tuple(x.shape)}")
    code = act_code_checked(act)
    x = contiguous(x)
    dev = x.device

    if isinstance(partials, BatchStats):  # finished by the producer: only the apply pass is left
        mean, rstd = partials
        check_param(mean, C, x, "mean")
        check_param(rstd, C, x, "rstd")
        return _apply(x, mean, rstd, weight, bias, code, slope), mean, rstd
    stats, scalars, flags = StatsTail(running_mean, running_var, num_batches_tracked, momentum,
                                      eps).finalize_args(M, C, dev)
    mean, rstd = stats[:2]
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

    if T > FOLD_ROWS and not _device.INTERPRETED:
        # a conv epilogue's per-tile sums (thousands of rows): folded in parallel, the last program of
        # each channel block to finish folding walks the ~GPU_TARGET_PARTIALS folded rows
        R, T2, bt, bc = fold_plan(T, C)
        nb = triton.cdiv(C, bc)
        fsum = torch.empty((T2, C), device=dev, dtype=torch.float32)
        fsumsq = torch.empty((T2, C), device=dev, dtype=torch.float32)
        launch(_bn_fold_finalize_kernel, (T2, nb), psum, psumsq, fsum, fsumsq, *stats,
               ticket_counters(dev, nb + 1), T, C, R, *scalars, **flags,
               BLOCK_T=bt, BLOCK_T2=rows_block(T2, bc, TAIL_ELEMS), BLOCK_C=bc, num_warps=4)
    else:
        bt, bcf, nwf = finalize_plan(T, C)
        launch(_bn_finalize_kernel, (triton.cdiv(C, bcf),), psum, psumsq, *stats, ticket_counters(dev, 1),
               T, C, *scalars, **flags, BLOCK_T=bt, BLOCK_C=bcf, num_warps=nwf)

    return _apply(x, mean, rstd, weight, bias, code, slope), mean, rstd


def _apply(x, mean, rstd, weight, bias, code: int, slope) -> torch.Tensor:
    """y = act((x - mean) * rstd * weight + bias), one launch."""
    M, C = rows_of(x)
    y = torch.empty_like(x)
    bm, bc, nw = tile_2d(M, C)
    align = operand_align(C, C, x.dtype)
    launch(_bn_apply_kernel, (triton.cdiv(M, bm), triton.cdiv(C, bc)),
           x, mean, rstd, weight if weight is not None else mean, bias if bias is not None else mean, y,
           M, C // align, float(slope), HAS_W=weight is not None, HAS_B=bias is not None, ACT=code, ALIGN=align,
           BLOCK_M=bm, BLOCK_C=bc, num_warps=nw)
    return y


class BatchNormTrainFunction(torch.autograd.Function):
    """y = act(batchnorm_train(x)). Inputs: (x, weight, bias, running_mean,
    running_var, num_batches_tracked, momentum, eps, act, slope, partials, grad_link, pool_link); partials:
    bn_train_forward's (statistics, not values: no gradient).
    Saves x, weight, bias, mean [C] and rstd [C] (fp32); the pre-activation and
    xhat are recomputed from x in the backward kernels. Gradients for x, weight,
    bias; none for the running statistics or partials.

    grad_link (a BnGradLink): y's one reader is a conv whose dgrad makes dz and the sums; the
    backward then receives dz. pool_link (a PoolGradLink): x is a conv's fused-pool output; the
    backward hands the conv its full-resolution gradient through the link and returns an
    unmaterialised placeholder for x's (the conv's backward takes the link's instead). apply_link (a
    BnApplyLink): x is the output of a conv whose input takes no gradient; with dz and the sums from
    grad_link, the backward leaves the apply to that conv's wgrad and returns a placeholder likewise."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, act, slope, partials, grad_link=None, pool_link=None, apply_link=None):
        y, mean, rstd = bn_train_forward(
            x, weight, bias, running_mean, running_var, momentum=momentum, eps=eps,
            num_batches_tracked=num_batches_tracked, act=act, slope=slope, partials=partials)
        ctx.act, ctx.slope = act, slope
        ctx.links = grad_link, pool_link, apply_link
        if grad_link is not None:
            grad_link.saved = (x, mean, rstd, weight, bias, act_code_checked(act), float(slope))
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_link, pool_link, apply_link = ctx.links
        sums = grad_link.take_sums() if grad_link is not None else None
        pool = pool_link.pool if pool_link is not None and pool_link.pool is not None else None
        need_dx = ctx.needs_input_grad[0]
        defer = need_dx and apply_link is not None and sums is not None and pool is None  # dy is dz
        dx, dw, db = bn_train_backward(dy, x, mean, rstd, weight, bias, ctx.act, ctx.slope,
                                       need_dx=need_dx and not defer, sums=sums, pool=pool)
        if defer:
            apply_link.apply = (dy, x, mean, rstd, weight, sums)
            # the sums are dbias and dweight: hand autograd views of them, which it can take as the
            # parameters' gradients without the copy the link's reference to the sums would force
            dw, db = dw.view_as(dw), db.view_as(db)
        if (pool is not None or defer) and need_dx:
            if pool is not None:
                pool_link.grad = dx
            dx = torch.empty((), device=x.device, dtype=x.dtype).expand(x.shape)  # no memory, no launch
        return (dx, dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None,
                None, None, None, None, None, None, None, None, None, None, None)


def batch_norm_train(
    x, weight, bias, running_mean, running_var, *, momentum=0.1, eps=1e-5,
    num_batches_tracked=None, act="none", slope=0.01, partials=None, grad_link: BnGradLink | None = None,
    pool_link: PoolGradLink | None = None, apply_link: BnApplyLink | None = None,
):
    """Autograd-aware training-mode batch norm + activation (see bn_train_forward; the links:
    BatchNormTrainFunction)."""
    return BatchNormTrainFunction.apply(x, weight, bias, running_mean, running_var, num_batches_tracked,
                                        momentum, eps, act, slope, partials, grad_link, pool_link, apply_link)
