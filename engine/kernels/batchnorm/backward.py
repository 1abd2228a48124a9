"""Training-mode batch norm (+ activation) backward over channels-last `[M, C]` rows, and the
two hand-offs that let its neighbours' kernels do part of it.

  1. the per-channel sums  sdz = sum(dz), sdzx = sum(dz * xhat), dz = act'(z) * dy
     (z = xhat * weight + bias recomputed from the saved input x), either
     - `_bn_bwd_reduce_kernel`: a pass over x and dy, partial rows per row block, the last
       program of each channel block summing them (reduction.sum_partials for tall partials); or
     - `bn_grad_epilogue`, run by the kernel that makes dy -- the dgrad epilogue of the conv that
       alone reads the batch norm's output (engine.kernels.conv.dgrad): it forms dz from its fp32
       accumulator and one read of x, stores dz instead of dy, and emits the sums (two-level
       ticket tail, no second launch; a max pool's backward gather does the same). `BnGradLink`
       carries the saved tensors there and the sums back (the runtime pairs the two Functions:
       engine.passes.fusion.plan_backward_links);
  2. `_bn_bwd_apply_kernel`: dx = weight*rstd*(dz - sdz/M - xhat*sdzx/M). When x is the pooled
     output of a conv with a fused max pool (POOL), it writes the conv's full-resolution gradient
     directly, gathered through the pool's one-byte argmax (zeros off the argmax and on rows the
     pool dropped): the pool backward and the pooled dx round trip disappear. `PoolGradLink`
     hands that gradient to the conv's backward.
  3. `BnApplyLink`: when the batch norm's input is a stem conv's output (its dx's one reader is that
     conv's wgrad), the apply is left to the wgrad, which needs no dx (engine.kernels.conv.wgrad_folded).

Everything is deterministic (fixed-order sums; int32 tickets only pick who adds).

Public API: bn_train_backward, BnApplyLink, BnGradLink, PoolGradLink, bn_apply_dx, bn_grad_args; device:
bn_channel_params, bn_dz, bn_grad_epilogue.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.activations import act_grad
from engine.kernels.common import (FOLD_ROWS, act_code_checked, channel_block, check_activation, check_param,
                                   contiguous, next_pow2, prev_pow2, reduce_plan, row_tile, rows_block, rows_of,
                                   store_partial_row, tile_2d)
from engine.kernels.launch import launch
from engine.kernels.reduction import (TAIL_ELEMS, fold_tail, fold_tail_buffers, last_to_arrive, sum_partials,
                                      sum_row_range, ticket_counters)


# --------------------------------------------------------------------------- #
# Device helpers
# --------------------------------------------------------------------------- #
@triton.jit
def bn_channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, cols, cmask,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """(mean, rstd, weight, bias), each [BLOCK_C] fp32 at channels `cols`; weight 1 and
    bias 0 where the batch norm has none."""
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
    return mean, rstd, w, b


@triton.jit
def bn_dz(dy, x, mean, rstd, w, b, slope, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr):
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
def _bn_grad_rows(g, dz_ptr, pix, pix_ok, cols, cmask, C, x_ptr, mean, rstd, w, b, slope,
                  ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Stores dz = act'(z) * g for rows `pix` ([rows] of x [*, C]); returns its column sums of dz and
    dz*xhat ([BLOCK_C] each). g is 0 in masked lanes, so dz is too (act_grad is linear in dy)."""
    # offsets built here, from row indices and channels, not split from a 2-D tile: the compiler then
    # knows the channels are contiguous and C's alignment, and loads x / stores dz in 16-byte vectors
    offs = (pix * C)[:, None] + cols[None, :]  # [rows, BLOCK_C]
    mask = pix_ok[:, None] & cmask[None, :]  # [rows, BLOCK_C]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [rows, BLOCK_C] fp32
    dz, xhat = bn_dz(g, x, mean, rstd, w, b, slope, HAS_W, HAS_B, ACT)  # [rows, BLOCK_C] each
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    return tl.sum(dz, axis=0), tl.sum(dz * xhat, axis=0)


@triton.jit
def _row_halves(v, BLOCK_M: tl.constexpr):
    """A [BLOCK_M] vector as its first and second halves."""
    return tl.split(tl.permute(tl.reshape(v, (2, BLOCK_M // 2)), (1, 0)))


@triton.jit
def _tile_halves(t, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """A [BLOCK_M, BLOCK_C] tile as its first and second halves of rows."""
    return tl.split(tl.permute(tl.reshape(t, (2, BLOCK_M // 2, BLOCK_C)), (1, 2, 0)))


@triton.jit
def bn_grad_epilogue(g, dz_ptr, pix, pix_ok, row, cblock, n_cblocks, cols, cmask,
                     x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, pdz_ptr, pdzx_ptr, fdz_ptr, fdzx_ptr,
                     sdz_ptr, sdzx_ptr, ctr_ptr, T, R, C, slope,
                     ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HALVES: tl.constexpr):
    """In the kernel that makes dy = g ([BLOCK_M, BLOCK_C] fp32, 0 in masked lanes) for rows `pix`
    ([BLOCK_M] row indices of the batch norm's saved input x [M, C], real where pix_ok) and channels
    `cols` (real where cmask): stores dz = act'(z) * g at the same places of dz_ptr (its dtype), and
    writes partial row `row` (of T) of sum(dz), sum(dz*xhat) for channel block `cblock` (of n_cblocks);
    the last programs to arrive sum the T rows into sdz/sdzx [C] (reduction.fold_tail: fold rows
    fdz/fdzx, tickets ctr, R rows a fold). HALVES: the tile is worked in two row halves, so a thread
    holding many elements (64 fp32 of g) keeps the activation's temporaries of half of them live at a
    time (no spills on sm_90)."""
    mean, rstd, w, b = bn_channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, cols, cmask, HAS_W, HAS_B, BLOCK_C)
    if HALVES:
        g0, g1 = _tile_halves(g, BLOCK_M, BLOCK_C)
        p0, p1 = _row_halves(pix, BLOCK_M)
        k0, k1 = _row_halves(pix_ok, BLOCK_M)
        s, sx = _bn_grad_rows(g0, dz_ptr, p0, k0, cols, cmask, C, x_ptr, mean, rstd, w, b, slope, ACT, HAS_W, HAS_B)
        s1, sx1 = _bn_grad_rows(g1, dz_ptr, p1, k1, cols, cmask, C, x_ptr, mean, rstd, w, b, slope, ACT, HAS_W,
                                HAS_B)
        s += s1
        sx += sx1
    else:
        s, sx = _bn_grad_rows(g, dz_ptr, pix, pix_ok, cols, cmask, C, x_ptr, mean, rstd, w, b, slope, ACT, HAS_W,
                              HAS_B)
    part = row.to(tl.int64) * C + cols  # [BLOCK_C]
    tl.store(pdz_ptr + part, s, mask=cmask)
    tl.store(pdzx_ptr + part, sx, mask=cmask)
    # the tail runs with no tile live: the fold and the final sum have the registers to themselves
    done, sdz, sdzx = fold_tail(pdz_ptr, pdzx_ptr, fdz_ptr, fdzx_ptr, ctr_ptr, row, T, R, C, cblock, n_cblocks,
                                cols, cmask, BLOCK_T, BLOCK_C)  # [BLOCK_C] each
    if done:
        tl.store(sdz_ptr + cols, sdz, mask=cmask)
        tl.store(sdzx_ptr + cols, sdzx, mask=cmask)


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #
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
    sdz_ptr,  # [C] fp32 out: sum(dz) = dbias (if TAIL)
    sdzx_ptr,  # [C] fp32 out: sum(dz * xhat) = dweight (if TAIL)
    ctr_ptr,  # [C-blocks] int32 ticket counters, 0 between launches (if TAIL)
    M, C, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, N_ITER: tl.constexpr,
    TAIL: tl.constexpr,  # the last of the T programs of a channel block sums its partial rows
    BLOCK_T: tl.constexpr,  # rows per step of that sum
):
    pid_t = tl.program_id(0)
    cols, cmask = channel_block(tl.program_id(1), C, BLOCK_C)  # [BLOCK_C] each
    mean, rstd, w, b = bn_channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, cols, cmask, HAS_W, HAS_B, BLOCK_C)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # [BLOCK_M, BLOCK_C] sum dz
    accx = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # [BLOCK_M, BLOCK_C] sum dz*xhat
    for i in range(N_ITER):
        mask, offs = row_tile(pid_t * N_ITER + i, M, C, cols, cmask, BLOCK_M)  # [BLOCK_M, BLOCK_C] each
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
        dz, xhat = bn_dz(dy, x, mean, rstd, w, b, slope, HAS_W, HAS_B, ACT)
        dz = tl.where(mask, dz, 0.0)
        acc += dz
        accx += dz * xhat
    store_partial_row(pdz_ptr, pdzx_ptr, acc, accx, pid_t, C, cols, cmask)
    if TAIL:
        T = tl.num_programs(0)
        if last_to_arrive(ctr_ptr + tl.program_id(1), T):
            sdz, sdzx = sum_row_range(pdz_ptr, pdzx_ptr, 0, T, C, cols, cmask, True, BLOCK_T, BLOCK_C)  # [BLOCK_C] each
            tl.store(sdz_ptr + cols, sdz, mask=cmask)
            tl.store(sdzx_ptr + cols, sdzx, mask=cmask)


@triton.jit
def _bn_bwd_apply_kernel(
    dy_ptr,  # [M, C] upstream gradient (dz itself when ACT == 0)
    x_ptr,  # [M, C] saved input
    mean_ptr,  # [C] fp32
    rstd_ptr,  # [C] fp32
    w_ptr,  # [C] fp32 (if HAS_W)
    b_ptr,  # [C] fp32 (if HAS_B)
    sdz_ptr,  # [C] fp32 sum(dz)        (= dbias)
    sdzx_ptr,  # [C] fp32 sum(dz*xhat)  (= dweight)
    idx_ptr,  # [M, C] uint8 argmax of the fused pool that made x (if POOL)
    dx_ptr,  # [M, C] out, x's dtype; POOL: the pool's input gradient [MF, C], MF = NB*H*W
    M, C, inv_m, slope,
    NB, H, W, OH, OW,  # POOL: dx's extent [NB, H, W, C]; x is [NB, OH, OW, C] (OH = H // POOL)
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,  # POOL: pixels of an image row a tile
):
    cols, cmask = channel_block(tl.program_id(1), C, BLOCK_C)  # [BLOCK_C] each
    mean, rstd, w, b = bn_channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, cols, cmask, HAS_W, HAS_B, BLOCK_C)
    mdz = tl.load(sdz_ptr + cols, mask=cmask, other=0.0) * inv_m  # [BLOCK_C] mean(dz)
    mdzx = tl.load(sdzx_ptr + cols, mask=cmask, other=0.0) * inv_m  # [BLOCK_C] mean(dz*xhat)
    if POOL > 0:
        # a program per [BLOCK_M, BLOCK_C] tile of BLOCK_M // BLOCK_W whole image rows (or of one row's
        # BLOCK_W pixels), each pixel gathering the pooled element whose window holds it (re-read from
        # cache by the POOL*POOL pixels of a window). The rows' coordinates step from one scalar division
        # (per-pixel 64-bit div/mod by W and H made this kernel issue-bound: 1,097 instructions a
        # program, 66 us against 54 us of HBM for airbench94's widest)
        WB = (W + BLOCK_W - 1) // BLOCK_W  # pixel blocks per image row
        line0 = (tl.program_id(0) // WB) * (BLOCK_M // BLOCK_W)  # scalar: the tile's first image row n*H + hi
        r = tl.arange(0, BLOCK_M)  # [BLOCK_M]
        wi = (tl.program_id(0) % WB) * BLOCK_W + r % BLOCK_W  # [BLOCK_M] pixel column
        hi = line0 % H + r // BLOCK_W  # [BLOCK_M] image row, past H at most once (BLOCK_M // BLOCK_W <= H)
        n = line0 // H + (hi >= H).to(tl.int32)  # [BLOCK_M]
        hi = tl.where(hi >= H, hi - H, hi)
        oh = hi // POOL  # [BLOCK_M] the window's pooled row
        ow = wi // POOL
        real = (wi < W) & (n < NB)  # [BLOCK_M]
        kept = real & (ow < OW) & (oh < OH)  # [BLOCK_M] pixels a window read (not dropped)
        out_mask = real[:, None] & cmask[None, :]  # [BLOCK_M, BLOCK_C]
        out_offs = (((n.to(tl.int64) * H + hi) * W + wi) * C)[:, None] + cols[None, :]  # [BLOCK_M, BLOCK_C]
        mask = kept[:, None] & cmask[None, :]  # [BLOCK_M, BLOCK_C]
        pooled = (n * OH + oh) * OW + ow  # [BLOCK_M] pooled pixel
        offs = (pooled.to(tl.int64) * C)[:, None] + cols[None, :]  # [BLOCK_M, BLOCK_C]
        code = (hi % POOL) * POOL + wi % POOL  # [BLOCK_M] this pixel's place in its window
        won = mask & (tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int32) == code[:, None])
    else:
        mask, offs = row_tile(tl.program_id(0), M, C, cols, cmask, BLOCK_M)  # [BLOCK_M, BLOCK_C] each
        out_mask, out_offs = mask, offs
        won = mask
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
    dz, xhat = bn_dz(dy, x, mean, rstd, w, b, slope, HAS_W, HAS_B, ACT)
    k = w * rstd  # [BLOCK_C]
    dx = k[None, :] * (dz - mdz[None, :] - xhat * mdzx[None, :])  # [BLOCK_M, BLOCK_C] fp32
    dx = tl.where(won, dx, 0.0)
    tl.store(dx_ptr + out_offs, dx.to(dx_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------- #
# Hand-offs between the batch norm's Function and its neighbours'
# --------------------------------------------------------------------------- #
@dataclass(eq=False)
class BnGradLink:
    """Between a training batch norm (+ act) and the one node reading its output whose backward makes
    its gradient (a conv's dgrad, a max pool's backward gather): the batch norm's forward leaves what
    `bn_grad_epilogue` needs (`saved`); that backward then makes dz and the sums (`sums`), and the
    batch norm's backward takes dz as its incoming gradient."""

    saved: tuple | None = None  # (x, mean, rstd, weight, bias, act code, slope)
    sums: tuple | None = None  # (sdz, sdzx) [C] fp32, set by the conv's backward, taken by the bn's

    def take_sums(self):
        sums, self.sums = self.sums, None
        return sums


@dataclass(eq=False)
class PoolGradLink:
    """Between a conv with a fused max pool (and the pooled output's statistics) and the batch norm
    that reads it: the conv's forward leaves `pool` = (argmax, K, full-resolution shape: the output
    rows and columns the pool read, without any it dropped); the batch norm's backward writes the
    conv's full-resolution gradient (`grad`) over them, which the conv's backward takes instead of
    expanding the pooled one (its dgrad and wgrad take the dropped rows as zeros: no bytes for them)."""

    pool: tuple | None = None
    grad: torch.Tensor | None = None

    def take_grad(self) -> torch.Tensor:
        g, self.grad = self.grad, None
        if g is None:
            raise RuntimeError("PoolGradLink: the batch norm's backward left no full-resolution gradient "
                               "(its output's gradient was taken by something other than its backward)")
        return g


@dataclass(eq=False)
class BnApplyLink:
    """Between a conv whose input takes no gradient (a network's stem) and the training batch norm alone
    reading its output, whose dx then has one reader, the conv's wgrad: the batch norm's backward leaves
    the apply's operands (`apply` = (dz, x, mean, rstd, weight, (sdz, sdzx)), when its dz and sums came
    from the kernel after it) instead of launching `_bn_bwd_apply_kernel`, and the conv's wgrad takes
    the weight gradient of dx = weight*rstd*(dz - sdz/M - xhat*sdzx/M) from dz, x being the conv's
    own output (engine.kernels.conv.wgrad_folded's BN_APPLY; `bn_apply_dx` where it cannot)."""

    apply: tuple | None = None

    def take(self) -> tuple | None:
        a, self.apply = self.apply, None
        return a


def bn_apply_dx(dz: torch.Tensor, apply: tuple) -> torch.Tensor:
    """dx of a batch norm from BnApplyLink.apply's operands (dz is apply[0]): one apply launch."""
    _, x, mean, rstd, weight, sums = apply
    return bn_train_backward(dz, x, mean, rstd, weight, None, sums=sums)[0]


def bn_grad_args(bn_grad, dx: torch.Tensor, T: int, block_c: int) -> tuple[tuple, dict, tuple | None]:
    """The BN_GRAD arguments of a kernel that makes dx in [T row blocks] x [channel blocks of block_c]
    programs and runs `bn_grad_epilogue` (the conv dgrad, the max pool's backward gather): (fourteen
    arguments in the kernels' order -- bnx, mean, rstd, weight, bias, pdz, pdzx, fdz, fdzx, sdz, sdzx,
    tickets, R, slope --, the constexprs BN_GRAD, BN_ACT, BN_HAS_W, BN_HAS_B, BN_BLOCK_T, the sums
    (sdz, sdzx) the launch fills). bn_grad: BnGradLink.saved, whose x must be dx's shape and dtype;
    None: placeholders and BN_GRAD off (sums None)."""
    if bn_grad is None:
        return (dx,) * 12 + (1, 0.0), dict(BN_GRAD=False, BN_ACT=0, BN_HAS_W=False, BN_HAS_B=False,
                                           BN_BLOCK_T=1), None
    x, mean, rstd, w, b, code, slope = bn_grad
    if x.shape != dx.shape or x.dtype != dx.dtype:
        raise ValueError(f"the batch norm's input {tuple(x.shape)} {x.dtype} is not the shape and dtype of the "
                         f"gradient its reader makes, {tuple(dx.shape)} {dx.dtype}")
    C = dx.shape[-1]
    f32 = dict(device=dx.device, dtype=torch.float32)
    sums = (torch.empty(C, **f32), torch.empty(C, **f32))
    fdz, fdzx, tickets, R, bt = fold_tail_buffers(T, C, block_c, dx.device)
    args = (x.contiguous(), mean, rstd, w if w is not None else mean, b if b is not None else mean,
            torch.empty((T, C), **f32), torch.empty((T, C), **f32), fdz, fdzx, *sums, tickets, R, float(slope))
    return args, dict(BN_GRAD=True, BN_ACT=code, BN_HAS_W=w is not None, BN_HAS_B=b is not None, BN_BLOCK_T=bt), sums


# --------------------------------------------------------------------------- #
# Host launcher
# --------------------------------------------------------------------------- #
def bn_train_backward(dy, x, mean, rstd, weight, bias, act="none", slope=0.01, need_dx=True, *, sums=None,
                      pool=None):
    """Backward of bn_train_forward. Returns (dx or None, dweight [C] fp32, dbias [C] fp32);
    dweight = sum(dz*xhat), dbias = sum(dz), dz = act'(z)*dy.

    sums=(sdz, sdzx): made by the kernel that made dy (bn_grad_epilogue), and dy is then dz itself:
    no reduce pass. pool=(idx, K, full_shape): x is the pooled output of a fused K x K max pool with
    argmax idx; dx is then the pool's input gradient, full_shape [N, H, W, C] (H // K = x's height; rows
    past the last whole window, if H has any, get zeros)."""
    check_activation(x)
    M, C = rows_of(x)
    if dy.shape != x.shape:
        raise ValueError(f"dy shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")
    check_param(mean, C, x, "mean")
    check_param(rstd, C, x, "rstd")
    check_param(weight, C, x, "weight", optional=True)
    check_param(bias, C, x, "bias", optional=True)
    code = act_code_checked(act)
    dy, x = contiguous(dy), contiguous(x)
    dev = x.device
    has_w, has_b = weight is not None, bias is not None
    wp = weight if has_w else mean
    bp = bias if has_b else mean

    if sums is not None:  # dy is dz; the sums came with it
        dbias, dweight = sums
        code = 0
    else:
        bm, bc, n_iter, T, nw = reduce_plan(M, C)
        pdz = torch.empty((T, C), device=dev, dtype=torch.float32)
        pdzx = torch.empty((T, C), device=dev, dtype=torch.float32)
        dbias = torch.empty(C, device=dev, dtype=torch.float32)
        dweight = torch.empty(C, device=dev, dtype=torch.float32)
        nb = triton.cdiv(C, bc)
        tail = T <= FOLD_ROWS  # taller partials are folded in parallel by sum_partials (no long serial sum)
        launch(_bn_bwd_reduce_kernel, (T, nb),
               dy, x, mean, rstd, wp, bp, pdz, pdzx, dbias, dweight, ticket_counters(dev, nb), M, C, float(slope),
               HAS_W=has_w, HAS_B=has_b, ACT=code, BLOCK_M=bm, BLOCK_C=bc, N_ITER=n_iter, TAIL=tail,
               BLOCK_T=rows_block(T, bc, TAIL_ELEMS), num_warps=nw)
        if not tail:
            dbias, dweight = sum_partials(pdz, pdzx)
    dx = None
    if need_dx:
        if pool is not None:
            idx, k, full_shape = pool
            NB, H, W, _ = full_shape
            if tuple(idx.shape) != tuple(x.shape) or idx.dtype != torch.uint8 or x.shape[1:3] != (H // k, W // k):
                raise ValueError(f"pool: argmax {tuple(idx.shape)} {idx.dtype} and full shape {tuple(full_shape)} "
                                 f"do not match x {tuple(x.shape)} under a {k}x{k} pool")
            dx = torch.empty(tuple(full_shape), device=dev, dtype=x.dtype)
            geo = (NB, H, W, H // k, W // k)
        else:
            idx, k, dx = x, 0, torch.empty_like(x)
            geo = (1, 1, 1, 1, 1)
        bm, bc, nw = tile_2d(M if not k else NB * H * W, C)
        bw = 1
        if k:  # tiles of whole image rows (at most H of them) or of one row's pixels
            bw = min(next_pow2(W), bm)
            bm = bw * min(bm // bw, prev_pow2(H))
            tiles = triton.cdiv(NB * H, bm // bw) * triton.cdiv(W, bw)
        else:
            tiles = triton.cdiv(M, bm)
        launch(_bn_bwd_apply_kernel, (tiles, triton.cdiv(C, bc)),
               dy, x, mean, rstd, wp, bp, dbias, dweight, idx, dx, M, C, 1.0 / M, float(slope), *geo,
               HAS_W=has_w, HAS_B=has_b, ACT=code, POOL=k, BLOCK_M=bm, BLOCK_C=bc, BLOCK_W=bw, num_warps=nw)
    return dx, dweight, dbias


__all__ = ["BnApplyLink", "BnGradLink", "PoolGradLink", "bn_apply_dx", "bn_channel_params", "bn_dz", "bn_grad_args",
           "bn_grad_epilogue", "bn_train_backward"]
