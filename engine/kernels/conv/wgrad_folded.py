"""Convolution wgrad (dw) of a conv with few input channels and no padding (an RGB stem): the
kernel taps folded into the GEMM rows, and several images stacked along the wgmma's diagonal.

conv2d_wgrad's GEMM gives a program BLOCK_K channels of ONE tap; with 8 stored channels (RGB
padded to 16 bytes) 56 of a 64-row wgmma's rows are zeros, and each of the KH*KW taps is
another program reading the same pixels. Here the rows are (tap, channel) for every tap at once,
R = next_pow2(KH*KW*Cs) of them, and the wgmma's other 64 - R rows are not wasted on zeros:
SLICES = 64 // R image slabs are stacked, slab h in rows [h*R, (h+1)*R) and in columns
[h*CB, (h+1)*CB) of a [64, SLICES*CB] accumulator (CB = next_pow2(Cout)). A K index of the GEMM
is one pixel of a box (TB images x TH rows x TW columns) in every slab at once: row (h, tap, ci)
reads x at that pixel of slab h shifted by the tap, column (h, co) reads dy at that pixel of slab
h. The diagonal blocks (h, h) are dw over each slab; the rest is discarded. For airbench94's stem
(2x2, 8 stored channels, 24 outputs: R = 32, two slabs, a 64x64 tile) that is 2,048
multiply-adds a pixel, a quarter of the per-tap GEMM's 4 x 64 x 32, and 128 bytes of operands
staged a pixel where the per-tap GEMM staged 4 x 192 (the sm_90 SASS: see folded_tiles).

Without padding every tap of a real output pixel reads a real input pixel, so an element's offset
is a loop-invariant row vector (slab, tap, channel) plus a per-trip column vector (the box's
pixels) and its mask the pixel's alone: no per-element tap arithmetic or bounds checks.

P is cut into S splits (deterministic: no float atomics); each split stores its dw partial in
PyTorch's [Cout, Cin, KH, KW] layout (a few KB) and the last split to finish sums them in split
order (reduction.last_to_arrive); one split stores dw itself.

Public API: fold_config (None when the conv does not qualify), conv2d_wgrad_folded.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine import device as _device
from engine.kernels import autotune
from engine.kernels.common import dot, idx64, next_pow2, precision, upcast
from engine.kernels.conv.geometry import GPU_SMS, WGRAD_MIN_TRIPS, conv_key
from engine.kernels.launch import launch
from engine.kernels.reduction import last_to_arrive, sum_slices, ticket_counters
from engine.kernels.tune_config import Config, gemm_smem_bytes, smem_limit

FOLD_ROWS = 64  # the wgmma's rows: (slab, tap, channel)
# SLICES * CB: the widest tile whose fp32 accumulator (128 registers a thread at 64x256) does not
# spill on sm_80 (64x256: 32-72 B for 24-256 output channels; 64x128: 167 registers)
FOLD_MAX_COLS = 128


@triton.jit
def _slab_diag(t, same, SLICES: tl.constexpr, R: tl.constexpr, CB: tl.constexpr):
    """[R, CB]: the diagonal blocks of a [SLICES*R, SLICES*CB] tile (slab h's rows against slab h's
    columns; `same` marks them), summed over the slabs."""
    diag = tl.where(same, t, tl.zeros_like(t))
    return tl.sum(tl.sum(tl.reshape(diag, (SLICES, R, SLICES, CB)), axis=2), axis=0)


@triton.jit
def _bn_dx_gemm(dwt, gram, psum, same, w_ptr, mean_ptr, rstd_ptr, bnw_ptr, sdz_ptr, sdzx_ptr, inv_m, tap, ci, row_ok,
                co, co_ok, CIN_W, DYC, KK: tl.constexpr, HAS_W: tl.constexpr, SLICES: tl.constexpr,
                R: tl.constexpr, CB: tl.constexpr):
    """[R, CB] X^T dx of the batch norm after the conv (the kernel's BN_APPLY) from dwt = X^T dz (summed
    over the slabs), gram = X^T X and psum = X^T 1 (column 0) of a split's pixels:
    k*(X^T dz) - v*(X^T X) W - (k*mdz - v*mean)*(X^T 1) per output channel (W's rows of the same slab
    only; rows (slab, tap, ci) of gram and psum, co ([SLICES*CB]) the columns'). X^T dz is taken summed,
    so its accumulator is free before the product with W (no spills)."""
    cn = tl.arange(0, CB)  # [CB] output channel
    cn_ok = cn < DYC
    mean = tl.load(mean_ptr + cn, mask=cn_ok, other=0.0)  # [CB] fp32
    rstd = tl.load(rstd_ptr + cn, mask=cn_ok, other=0.0)
    k = rstd * tl.load(bnw_ptr + cn, mask=cn_ok, other=0.0) if HAS_W else rstd
    v = k * rstd * tl.load(sdzx_ptr + cn, mask=cn_ok, other=0.0) * inv_m
    u = k * tl.load(sdz_ptr + cn, mask=cn_ok, other=0.0) * inv_m - v * mean
    # W as [rows (slab, tap, ci), columns (slab, co)], zero off the slab diagonal and past the real taps
    wf_m = same & (row_ok & (ci < CIN_W))[:, None] & co_ok[None, :]
    wf = tl.load(w_ptr + (ci * KK + tap)[:, None] + (co * (CIN_W * KK))[None, :], mask=wf_m, other=0.0)
    xw = tl.dot(gram, wf.to(tl.float32), input_precision="tf32x3")  # [SLICES*R, SLICES*CB] X^T X W
    s1 = tl.sum(tl.reshape(tl.sum(psum, axis=1), (SLICES, R)), axis=0)  # [R] X^T 1 (other columns are 0)
    return k[None, :] * dwt - v[None, :] * _slab_diag(xw, same, SLICES, R, CB) - u[None, :] * s1[:, None]


@triton.jit
def _conv_wgrad_folded_kernel(
    x_ptr,  # [NB, H, W, XC] activations
    dy_ptr,  # [NB, Ho, Wo, DYC] incoming gradient
    part_ptr,  # [S, L] fp32 split partials in PyTorch's layout, or dw itself [L] (not TAIL)
    bpart_ptr,  # [S, DYC] fp32 bias partials, or db itself (NEED_BIAS)
    dw_ptr,  # [L] fp32 out (TAIL)
    db_ptr,  # [DYC] fp32 out (TAIL and NEED_BIAS)
    ctr_ptr,  # [1] int32 ticket counter, 0 between launches (TAIL)
    w_ptr, bn_mean_ptr, bn_rstd_ptr, bn_w_ptr, sdz_ptr, sdzx_ptr,  # BN_APPLY: the conv's weights, the bn after
    PER_SPLIT, BOXES, NB, H, W, Ho, Wo, XC_A, DYC_A, CIN_W, bn_inv_m,
    stride_h, stride_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, ALIGN: tl.constexpr, NALIGN: tl.constexpr,
    SLICES: tl.constexpr, EVEN_R: tl.constexpr,
    TB: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, FULL_W: tl.constexpr, FULL_H: tl.constexpr,
    EVEN_B: tl.constexpr, NEED_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    IDX64: tl.constexpr, TAIL: tl.constexpr, BN_APPLY: tl.constexpr, BN_HAS_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, TAIL_L: tl.constexpr,
):
    """dw partial of one split of the pixel boxes: part[split, co, ci, tap] = sum over the split's
    pixels p of x[p @ tap, ci] * dy[p, co], for ci < CIN_W (x stores XC >= CIN_W channels).

    Grid: (S,). The tile: BLOCK_M rows, R = BLOCK_M // SLICES a slab (tap, channel), and BLOCK_N
    columns, CB = BLOCK_N // SLICES a slab (output channel); a trip is one box of SLICES*TB images
    x TH x TW output pixels (BLOCK_P = TB*TH*TW), PER_SPLIT boxes a split, BOXES in all. Channel
    counts in units of ALIGN (x) and NALIGN (dy). EVEN_R: R == KH*KW*XC (no padding rows).
    FULL_W / FULL_H: a box spans the output's width / height (that check is loop-invariant).
    EVEN_B: the boxes' images divide NB. TAIL (S > 1): the last split to finish sums the S
    partials in order into dw (and db). BN_APPLY (no bias): the conv's output u = X W (X: a pixel's
    patch, W: w_ptr, PyTorch's layout) feeds a training batch norm alone, and dy_ptr holds that batch
    norm's dz. Its dx = k*(dz - mdz) - v*(u - mean) (k = weight*rstd, v = k*rstd*mdzx, mdz = sdz/M,
    mdzx = sdzx/M) is linear in dz and u, so X^T dx = k*(X^T dz) - v*(X^T X) W - (k*mdz - v*mean) X^T 1:
    the loop adds the Gram matrix X^T X and the patch sums X^T 1 to its matrix instructions, and the
    split's partial is combined from the three (batchnorm.backward.BnApplyLink: no apply launch, no
    dx in HBM, and no arithmetic on the loaded tiles)."""
    XC = XC_A * ALIGN
    DYC = DYC_A * NALIGN
    KK: tl.constexpr = KH * KW
    R: tl.constexpr = BLOCK_M // SLICES
    CB: tl.constexpr = BLOCK_N // SLICES
    split = tl.program_id(0)
    # rows m = (slab h, tap, channel), built from 16-byte groups of ALIGN channels (the
    # offsets' low part is then provably contiguous: 16-byte asynchronous copies)
    m = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    grp = (m % R) // ALIGN  # [BLOCK_M] channel group within the slab's rows
    tap = (grp * ALIGN) // XC
    ci0 = grp * ALIGN - tap * XC  # first channel of the group
    r = tap // KW
    s = tap - r * KW
    slab = (m // R) * TB  # [BLOCK_M] the slab's first image, from the box's
    if IDX64:
        slab = slab.to(tl.int64)
    row_off = ((slab * H + r * dil_h) * W + s * dil_w) * XC + ci0 + m % ALIGN  # [BLOCK_M]
    # runs of ALIGN contiguous offsets from a multiple of ALIGN (the division by XC hides it)
    row_off = tl.max_contiguous(tl.multiple_of(row_off, ALIGN), ALIGN)
    row_ok = m % R < KK * XC  # [BLOCK_M] a real (tap, channel) (all true if EVEN_R), in runs of ALIGN
    # columns c = (slab h, output channel)
    c = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    co = c % CB
    cslab = (c // CB) * TB  # [BLOCK_N]
    if IDX64:
        cslab = cslab.to(tl.int64)
    col_off = cslab * (Ho * Wo * DYC) + co  # [BLOCK_N]
    co_ok = co < DYC
    if BN_APPLY:
        gram = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)  # [BLOCK_M, BLOCK_M] X^T X of every slab pair
        psum = tl.zeros((BLOCK_M, 16), dtype=tl.float32)  # [BLOCK_M, 16] X^T 1 in column 0
        ones = (tl.zeros((BLOCK_P, 16), dtype=tl.int32) + (tl.arange(0, 16) == 0)[None, :]).to(
            x_ptr.dtype.element_ty)  # [BLOCK_P, 16] a column of ones
    # the box's pixels j = (dn, dh, dw): a GEMM K index, the same pixel in every slab
    j = tl.arange(0, BLOCK_P)  # [BLOCK_P]
    dn = j // (TH * TW)
    dh = (j // TW) % TH
    dw = j % TW
    a_rel = ((dn * H + dh * stride_h) * W + dw * stride_w) * XC  # [BLOCK_P] x offset from the box's first pixel
    b_rel = ((dn * Ho + dh) * Wo + dw) * DYC  # [BLOCK_P] dy offset
    inv = j < BLOCK_P  # [BLOCK_P] the loop-invariant part of a pixel's check
    if FULL_W:
        inv = inv & (dw < Wo)
    if FULL_H:
        inv = inv & (dh < Ho)
    boxes_w = (Wo + TW - 1) // TW
    boxes_h = (Ho + TH - 1) // TH
    t_lo = split * PER_SPLIT
    t_hi = tl.minimum(BOXES, t_lo + PER_SPLIT)
    bw = t_lo % boxes_w  # scalar box coordinates, stepped per trip
    bh = (t_lo // boxes_w) % boxes_h
    bn = t_lo // (boxes_w * boxes_h)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N] fp32
    bacc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # [BLOCK_N] fp32 column sums of dy
    for _ in range(t_lo, t_hi):
        n0 = bn * (SLICES * TB)
        if IDX64:
            n0 = n0.to(tl.int64)
        ho0 = bh * TH
        wo0 = bw * TW
        ok = inv  # [BLOCK_P] a real output pixel (then all its taps read real input pixels)
        if not FULL_H:
            ok = ok & (dh < Ho - ho0)
        if not FULL_W:
            ok = ok & (dw < Wo - wo0)
        a_m = ok[None, :]  # [1, BLOCK_P]
        b_m = ok[:, None] & co_ok[None, :]  # [BLOCK_P, BLOCK_N]
        if not EVEN_R:
            a_m = a_m & row_ok[:, None]
        if not EVEN_B:  # the image of (slab h, dn) is n0 + h*TB + dn
            left = NB - n0
            a_m = a_m & ((m // R * TB)[:, None] + dn[None, :] < left)
            b_m = b_m & (dn[:, None] + (c // CB * TB)[None, :] < left)
        a_base = ((n0 * H + ho0 * stride_h) * W + wo0 * stride_w) * XC  # scalar
        b_base = ((n0 * Ho + ho0) * Wo + wo0) * DYC
        a = tl.load(x_ptr + a_base + row_off[:, None] + a_rel[None, :], mask=a_m,
                    other=0.0)  # [BLOCK_M, BLOCK_P] x^T of every slab, tap and channel
        b_off = b_base + b_rel[:, None] + col_off[None, :]  # [BLOCK_P, BLOCK_N]
        b = tl.load(dy_ptr + b_off, mask=b_m, other=0.0)  # [BLOCK_P, BLOCK_N] dy of every slab
        if NEED_BIAS:
            bacc += tl.sum(b.to(tl.float32), axis=0)
        acc = dot(a, b, acc, PRECISION, UPCAST)
        if BN_APPLY:
            gram = dot(a, tl.trans(a), gram, PRECISION, UPCAST)
            psum = dot(a, ones, psum, PRECISION, UPCAST)
        # next box: (bn, bh, bw) step with carries (a full axis never moves)
        if FULL_W and FULL_H:
            bn += 1
        elif FULL_W:
            bh += 1
            carry = bh >= boxes_h
            bh = tl.where(carry, 0, bh)
            bn = tl.where(carry, bn + 1, bn)
        else:
            bw += 1
            carry = bw >= boxes_w
            bw = tl.where(carry, 0, bw)
            bh = tl.where(carry, bh + 1, bh)
            carry = bh >= boxes_h
            bh = tl.where(carry, 0, bh)
            bn = tl.where(carry, bn + 1, bn)
    # the diagonal blocks (slab h's rows against slab h's columns), summed over the slabs
    same = (m // R)[:, None] == (c // CB)[None, :]  # [BLOCK_M, BLOCK_N]
    dwt = _slab_diag(acc, same, SLICES, R, CB)  # [R, CB] rows (tap, ci)
    if BN_APPLY:
        dwt = _bn_dx_gemm(dwt, gram, psum, same, w_ptr, bn_mean_ptr, bn_rstd_ptr, bn_w_ptr, sdz_ptr, sdzx_ptr,
                          bn_inv_m, tap, ci0 + m % ALIGN, row_ok, co, co_ok, CIN_W, DYC, KK, BN_HAS_W, SLICES, R,
                          CB)
    k = tl.arange(0, R)  # [R] row (tap, ci) of dwt
    ktap = k // XC
    kci = k - ktap * XC
    cn = tl.arange(0, CB)  # [CB] output channel
    L = DYC * CIN_W * KK  # dw's elements
    # PyTorch's [Cout, Cin, KH, KW]: a weight has < 2**31 elements, 32-bit offsets
    dw_off = (kci * KK + ktap)[:, None] + (cn * (CIN_W * KK))[None, :]  # [R, CB]
    dw_m = ((kci < CIN_W) & (ktap < KK))[:, None] & (cn < DYC)[None, :]
    tl.store(part_ptr + split.to(tl.int64) * L + dw_off, dwt, mask=dw_m)
    if NEED_BIAS:
        db = tl.sum(tl.reshape(bacc, (SLICES, CB)), axis=0)  # [CB]
        tl.store(bpart_ptr + split * DYC + cn, db, mask=cn < DYC)
    if TAIL:
        S = tl.num_programs(0)
        if last_to_arrive(ctr_ptr, S):
            offs = tl.arange(0, TAIL_L)  # [TAIL_L] flat dw
            lm = offs < L
            tl.store(dw_ptr + offs, sum_slices(part_ptr, offs, lm, S, L), mask=lm)
            if NEED_BIAS:
                tl.store(db_ptr + cn, sum_slices(bpart_ptr, cn, cn < DYC, S, DYC), mask=cn < DYC)


def fold_config(Cs: int, Cout: int, KH: int, KW: int, padding, groups: int, plain_dy: bool, aligned: bool = True,
                elem_bytes: int = 2):
    """(R, SLICES, CB) of the folded wgrad: rows and columns a slab, and slabs (as many as the 64
    rows hold, fewer if their columns would pass 128: the slab's rows then end in padding). None
    when the conv does not qualify: one group, no padding, dy as it comes (no fused activation,
    scale or pool), x and dy in 16-byte pixel rows (`aligned`: else the loads are scalar and the
    tile spills), fewer than 64 stored input channels, all their taps within 64 rows, and at most
    128 output channels; 16-bit operands (`elem_bytes` 2: fp32's FMA or tf32 dots on this tile
    spilled on sm_80, 9.7 KB for airbench94's stem at 64x64x64, where conv2d_wgrad's spilled 5.5)."""
    taps = KH * KW
    if (groups != 1 or tuple(padding) != (0, 0) or not plain_dy or not aligned or Cs >= FOLD_ROWS
            or taps * Cs > FOLD_ROWS):
        return None
    cb = max(16, next_pow2(Cout))
    if cb > FOLD_MAX_COLS or elem_bytes != 2:
        return None
    slices = min(FOLD_ROWS // next_pow2(taps * Cs, 16), FOLD_MAX_COLS // cb)
    return FOLD_ROWS // slices, slices, cb


def _box(N: int, Ho: int, Wo: int, block_p: int, slices: int) -> tuple[int, int, int]:
    """(TB, TH, TW), TB*TH*TW = block_p: a box of TB images per slab (fewer if the slabs' images
    cannot fill it: block_p shrinks to what one slab's images hold)."""
    tw = min(next_pow2(Wo), block_p)
    th = min(next_pow2(Ho), block_p // tw)
    tb = min(block_p // (tw * th), next_pow2(triton.cdiv(N, slices)))
    return tb, th, tw


def _chunks(N: int, Ho: int, Wo: int, block_p: int, slices: int) -> int:
    """Boxes of block_p pixels a slab over the whole output."""
    tb, th, tw = _box(N, Ho, Wo, block_p, slices)
    return triton.cdiv(N, slices * tb) * triton.cdiv(Ho, th) * triton.cdiv(Wo, tw)


def folded_tiles(N: int, Ho: int, Wo: int, slices: int, cols: int, elem_bytes: int, warps: int = 4) -> Config:
    """The untuned tile: block_m = the 64 rows, block_n = SLICES*CB, block_k = the pixels of a
    box (BLOCK_P): the longest of 256, 128, 64 whose 3 stages fit in 192 KB, shorter while the
    boxes are too few for a split per SM (at least WGRAD_MIN_TRIPS each; one program a split), 4
    stages where they fit in 160 KB. Read from the sm_90 SASS for airbench94's stem (64x64, 4
    warps): 256 pixels a trip read 353 instructions, 0.69 issue/tensor (128: 209, 0.82; 64: 127,
    0.99). `warps` 8 for BN_APPLY: its three accumulators (X^T dz, X^T X, X^T 1) at 4 warps spilled
    16-24 B on sm_80; at 8, none, and 0.83 issue/tensor on sm_90 (4 warps: 0.49)."""
    if _device.INTERPRETED:
        bp = next_pow2(N * Ho * Wo // slices, 16, 4096)  # each trip is a round of numpy calls
        return Config(FOLD_ROWS, cols, bp)

    def smem(bp: int, stages: int) -> int:
        return gemm_smem_bytes(FOLD_ROWS, cols, bp, stages, elem_bytes, elem_bytes)

    bp = next((p for p in (256, 128) if smem(p, 3) <= 192 * 1024), 64)
    while bp > 64 and _chunks(N, Ho, Wo, bp, slices) < GPU_SMS * WGRAD_MIN_TRIPS:
        bp //= 2
    stages = 4 if smem(bp, 4) <= 160 * 1024 else 3
    return Config(FOLD_ROWS, cols, bp, num_warps=warps, num_stages=stages)


def _splits(chunks: int, splits) -> tuple[int, int]:
    """(S, boxes per split): one program per split, so the GPU takes up to a split per SM, each
    at least WGRAD_MIN_TRIPS boxes (the partials are a few KB each); the interpreter one."""
    if splits is None:
        splits = 1 if _device.INTERPRETED else max(1, min(GPU_SMS, chunks // WGRAD_MIN_TRIPS))
    per = triton.cdiv(chunks, max(1, min(splits, chunks)))
    return triton.cdiv(chunks, per), per


def conv2d_wgrad_folded(x, dy, w_shape, fold, *, stride, dilation, cin, need_bias, allow_tf32, splits, out,
                        bias_out, aligns, bn_apply=None, w=None):
    """(dw fp32 [Cout, cin, KH, KW], dbias fp32 [Cout] or None) of a conv that fold_config accepted
    (its (R, SLICES, CB) in `fold`): x [N, H, W, Cs] (Cs >= cin stored channels, zeros beyond),
    dy [N, Ho, Wo, Cout], both contiguous; out / bias_out as in conv2d_wgrad (flat or None); aligns:
    the ALIGN constexprs of x's and dy's channels (16-byte rows: fold_config's `aligned`). bn_apply:
    BnApplyLink.apply of the batch norm reading the conv's output (no bias), whose dz dy then is, with
    the conv's weights w (fp32 [Cout, cin, KH, KW]): dw of the batch norm's dx (BN_APPLY)."""
    R, slices, bn = fold
    align, nalign = aligns
    N, H, W, Cs = x.shape
    _, Ho, Wo, Cout = dy.shape
    KH, KW = w_shape[2], w_shape[3]
    L = Cout * cin * KH * KW
    big = idx64(x, dy)
    if bn_apply is not None:  # the conv's weights and the bn's statistics, weight and gradient sums
        _, _, mean, rstd, weight, (sdz, sdzx) = bn_apply
        if need_bias or w is None:
            raise ValueError("conv2d_wgrad: a batch norm's dx from the folded wgrad needs the conv's weights "
                             "and no conv bias")
        bn_args = (w, mean, rstd, weight if weight is not None else rstd, sdz, sdzx)
    else:
        bn_args = (dy,) * 6

    def plan(cfg: Config):
        chunks = _chunks(N, Ho, Wo, cfg.block_k, slices)
        return _box(N, Ho, Wo, cfg.block_k, slices), chunks, *_splits(chunks, splits if splits is not None else cfg.split)

    def run(cfg: Config):
        box, chunks, S, per = plan(cfg)
        tb, th, tw = box
        dw = out if out is not None else torch.empty((L,), device=x.device, dtype=torch.float32)
        db = None
        if need_bias:
            db = bias_out if bias_out is not None else torch.empty((Cout,), device=x.device, dtype=torch.float32)
        part, bpart, ctr = dw, db, None
        if S > 1:
            part = torch.empty((S, L), device=x.device, dtype=torch.float32)
            bpart = torch.empty((S, Cout), device=x.device, dtype=torch.float32) if need_bias else None
            ctr = ticket_counters(x.device, 1)
        launch(_conv_wgrad_folded_kernel, (S,), x, dy, part, bpart, dw, db, ctr, *bn_args,
               per, chunks, N, H, W, Ho, Wo, Cs // align, Cout // nalign, cin, 1.0 / (N * Ho * Wo),
               stride[0], stride[1], dilation[0], dilation[1],
               KH=KH, KW=KW, ALIGN=align, NALIGN=nalign, SLICES=slices, EVEN_R=R == KH * KW * Cs,
               TB=tb, TH=th, TW=tw, FULL_W=tw >= Wo, FULL_H=tw >= Wo and th >= Ho,
               EVEN_B=N % (slices * tb) == 0, NEED_BIAS=need_bias, PRECISION=precision(allow_tf32),
               UPCAST=upcast(x.dtype), IDX64=big, TAIL=S > 1, BN_APPLY=bn_apply is not None,
               BN_HAS_W=bn_apply is not None and bn_apply[4] is not None,
               BLOCK_M=FOLD_ROWS, BLOCK_N=slices * bn, BLOCK_P=cfg.block_k, TAIL_L=next_pow2(L), **cfg.meta())
        return dw.view(Cout, cin, KH, KW), db

    warps = 8 if bn_apply is not None else 4
    default = folded_tiles(N, Ho, Wo, slices, slices * bn, x.element_size(), warps)

    def candidates() -> list[Config]:
        limit = smem_limit(x.device)
        out_ = [default]
        for bp in (128, 256, 64):
            for stages in (4, 3, 2):
                cfg = Config(FOLD_ROWS, slices * bn, bp, num_warps=warps, num_stages=stages)
                if gemm_smem_bytes(FOLD_ROWS, slices * bn, bp, stages, x.element_size(), x.element_size()) <= limit:
                    if cfg not in out_:
                        out_.append(cfg)
                    break
        _, chunks, S, _ = plan(default)
        return out_ + [default.with_split(s) for s in sorted({max(1, S // 2), min(chunks, 2 * S)}) if s != S]

    shape = dict(M=KH * KW * Cs, N=Cout, K=N * Ho * Wo, **conv_key(KH, KW, stride, (0, 0), dilation, 1),
                 need_bias=bool(need_bias), tf32=bool(allow_tf32), **({"bn_apply": True} if bn_apply else {}))
    cfg = autotune.pick("conv2d_wgrad_folded", shape, dtype=x.dtype, device=x.device, default=default, run=run,
                        candidates=candidates, tunable=splits is None)
    return run(cfg)


__all__ = ["fold_config", "conv2d_wgrad_folded"]
