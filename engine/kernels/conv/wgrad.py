"""Convolution wgrad (dw) on NHWC tensors: a deterministic split-K implicit GEMM, and the direct
depthwise variant.

dw is the GEMM [K_g, P] x [P, Cout/G] with K_g = KH*KW*Cs rows (tap, channel) and P = N*Ho*Wo output
pixels. A program owns BLOCK_K channels of ONE tap, so the tap is a scalar and a pixel's validity a
1-D mask: its A tile is x^T [BLOCK_K channels, BLOCK_P pixels] (16-byte loads along the channels),
its B tile dz [BLOCK_P, BLOCK_N] (dz = act'(z) * dy (* scale) when the forward fused an activation
or a folded scale). The pixels' (n, ho, wo) are decomposed once per program and stepped per trip
with carries (no per-element div/mod in the loop).

P is cut into S fixed splits that write fp32 partials [S, K_g, Cout] (rows (tap, ci), stores
coalesced along Cout), added in a fixed order (bit-identical run to run; no float atomics) into
PyTorch's [Cout, Cin/G, KH, KW] layout, into the parameter's slot of the fused optimizer's flat
gradient buffer when the forward claimed it (no layout copy): by the last split of each output tile
to finish (TAIL: an int32 ticket, reduction.last_to_arrive; no second launch) when a tile's S
partials are small (WGRAD_TAIL_BYTES: one program reads them all, at one SM's bandwidth), else by
_sum_to_torch_kernel over the whole GPU. One split: the kernel stores dw in PyTorch's layout itself
(TORCH_LAYOUT; every split's partials in PyTorch's layout from the GEMM cost the 24->64 wgrad's
loop 23 instructions on sm_90, the permuting sum after the loop none). S is sized from the work
(geometry.wgrad_splits): a few waves of programs, each a long reduction, and at most
WGRAD_MAX_SPLITS partial rows for the second pass. The bias gradient (column sums of dz) comes from
the same pass. A conv with few channels and no padding (an RGB stem) takes wgrad_folded's kernel:
every tap in one tile's rows (with bn_apply, a following batch norm's dx taken from dz: no dx).

Public API: conv2d_wgrad.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine import device as _device
from engine.kernels import autotune
from engine.kernels.batchnorm.backward import bn_apply_dx
from engine.kernels.common import check_activation, dot, idx64, next_pow2, precision, upcast
from engine.kernels.reduction import last_to_arrive, sum_partials, sum_slices, ticket_counters
import engine.kernels.conv.geometry as geometry
from engine.kernels.conv.geometry import (check_channels, check_grad_inputs, check_pool_grad, conv_geometry,
                                          conv_key, dw_tiles, dy_extent, flat_grad_out, split_plan)
from engine.kernels.conv.depthwise_wgrad import depthwise_wgrad_partials
from engine.kernels.conv.wgrad_folded import conv2d_wgrad_folded, fold_config
from engine.kernels.conv.mainloop import load_dz
from engine.kernels.launch import launch
from engine.kernels.layout import channel_multiple, operand_align, pad_channels, padded_channels
from engine.kernels.tune_config import Config, epilogue_key, smem_limit, split_variants, wgrad_candidates


# The most bytes of split partials the last split of an output tile sums itself (TAIL). It reads
# them from L2 at one SM's bandwidth (~100-200 GB/s) where _sum_to_torch_kernel reads every tile's
# over the whole GPU, so for large partials the tail is the slower of the two; at airbench94's
# 256-channel wgrads (7 x 128 x 256 x 4 B = 0.9 MB per tile: ~5-9 us of tail against ~4-6 us of
# sum kernel plus its launch gap) they are within this estimate's error, and the tail saves a
# launch per wgrad. Above 1 MiB the second launch wins. A GPU timing should settle the bound.
WGRAD_TAIL_BYTES = 1024 * 1024


@triton.jit
def _conv_wgrad_kernel(
    x_ptr, dy_ptr, z_ptr, scale_ptr, part_ptr, bpart_ptr, idx_ptr,
    dw_ptr,  # [Cout*Cin_g*KH*KW] fp32 out, PyTorch's layout (if TAIL)
    db_ptr,  # [Cout] fp32 out (if TAIL and NEED_BIAS)
    ctr_ptr,  # [G * tiles] int32 ticket counters, 0 between launches (if TAIL)
    P, P_PER_SPLIT, NB, H, W, Ho, Wo, XC_A, CS_A, DYC_A, COUT_G_A, CIN_W, N_TILES,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, slope,
    KW: tl.constexpr, CCHUNKS: tl.constexpr, ALIGN: tl.constexpr, NALIGN: tl.constexpr,
    TB: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, FULL_W: tl.constexpr, FULL_H: tl.constexpr,
    EVEN_B: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_P: tl.constexpr, TORCH_LAYOUT: tl.constexpr,
    ACT: tl.constexpr, HAS_SCALE: tl.constexpr, NEED_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, IDX64: tl.constexpr, POOL: tl.constexpr, TAIL: tl.constexpr, TAIL_K: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dw partial of one P-split: part[split, tap*Cs + ci, co] = sum_p x[p @ tap, ci] * dz[p, co], or
    with TORCH_LAYOUT (one split) dw itself, part[co, ci, tap], for the CIN_W (= Cin/G) channels of
    the weight (x may store Cs >= CIN_W, zeros beyond).

    Grid: (KH*KW * CCHUNKS * N_TILES, S, G). x [N, H, W, XC] (XC = G*Cs), dy [N, Ho,
    Wo, DYC] (DYC = G*Cout_g), channel counts in units of ALIGN (x) and NALIGN (dy).
    The tap-0 programs also write bias partials (column sums of dz). EVEN_K / EVEN_N /
    EVEN_P: Cs, Cout_g and every split's pixel count are multiples of the block (no masks). TAIL: the
    last of the S splits of an output tile to finish sums the tile's S partials (split order, TAIL_K
    rows at a time) into dw (and the bias partials into db) in PyTorch's layout.
    POOL > 0 (a fused POOL x POOL max pool): dy is the pooled gradient [NB, Ho/POOL, Wo/POOL, DYC]
    with the argmax idx_ptr, expanded in the B load; Ho, Wo are the pooled extent times POOL (the
    dropped rows are no pixels of P). Boxes then have TH and TW multiples of POOL; flat chunks
    take the pixels window-major (the forward's row order; BLOCK_P a multiple of POOL**2).
    """
    XC = XC_A * ALIGN
    CS = CS_A * ALIGN  # x channels per group as stored
    DYC = DYC_A * NALIGN
    COUT_G = COUT_G_A * NALIGN
    pid = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2)
    pid_n = pid % N_TILES
    pid_k = pid // N_TILES
    tap = pid_k // CCHUNKS  # scalar: this program's kernel tap
    c0 = (pid_k - tap * CCHUNKS) * BLOCK_K
    r = tap // KW
    s = tap - r * KW
    ci = c0 + tl.arange(0, BLOCK_K)  # [BLOCK_K] input channel within group
    mask_k = ci < CS
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output channel within group
    mask_c = offs_cn < COUT_G
    offs_c = g * COUT_G + offs_cn  # [BLOCK_N] global output channel
    h_off = r * dil_h - pad_h  # scalar: input row of output row 0 at this tap
    w_off = s * dil_w - pad_w
    x_ch = g * CS + ci  # [BLOCK_K] x channel
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # [BLOCK_K, BLOCK_N] fp32 dw accumulator
    bacc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # [BLOCK_N] fp32 bias-grad accumulator
    if TH > 0:
        # a trip is a TB x TH x TW box of output pixels: its pixels' offsets are a
        # scalar plus loop-invariant vectors (no per-pixel arithmetic but adds and
        # compares); P_PER_SPLIT counts boxes here
        jj = tl.arange(0, BLOCK_P)  # [BLOCK_P] pixel of the box (the A tile's columns)
        dn = jj // (TH * TW)
        dh = (jj // TW) % TH
        dw = jj % TW
        a_rel = ((dn * H + dh * stride_h) * W + dw * stride_w) * XC  # [BLOCK_P] offset from the box's first pixel
        h_rel = dh * stride_h  # [BLOCK_P]
        w_rel = dw * stride_w
        jb = tl.arange(0, BLOCK_P)  # [BLOCK_P] the same pixels as the B tile's rows
        dnb = jb // (TH * TW)
        dhb = (jb // TW) % TH
        dwb = jb % TW
        if POOL > 0:
            # the box holds whole windows: pixel jb reads pooled pixel (dhb, dwb) // POOL of the box
            # if the argmax is its tap
            b_rel = ((dnb * (Ho // POOL) + dhb // POOL) * (Wo // POOL) + dwb // POOL) * DYC  # [BLOCK_P]
            b_tap = ((dhb % POOL) * POOL + dwb % POOL).to(tl.uint8)  # [BLOCK_P] compared as bytes
        else:
            b_rel = ((dnb * Ho + dhb) * Wo + dwb) * DYC  # [BLOCK_P]
        boxes_w = (Wo + TW - 1) // TW
        boxes_h = (Ho + TH - 1) // TH
        # the masks' loop-invariant parts: a box as wide (FULL_W) or as tall (FULL_H) as the output
        # never moves along that axis, so its column (row) checks are the same every trip, and
        # whole boxes of images (EVEN_B) need no image check; measured on the sm_90 SASS, the
        # per-trip checks were most of a narrow wgrad's loop (a select per check and load)
        a_inv = jj < BLOCK_P  # [BLOCK_P] all true
        b_inv = jb < BLOCK_P
        if FULL_W:
            a_inv = a_inv & (dw < Wo) & ((w_off + w_rel).to(tl.uint32) < W)
            b_inv = b_inv & (dwb < Wo)
        if FULL_H:
            a_inv = a_inv & (dh < Ho) & ((h_off + h_rel).to(tl.uint32) < H)
            b_inv = b_inv & (dhb < Ho)
        t_lo = split * P_PER_SPLIT
        t_hi = tl.minimum(P, t_lo + P_PER_SPLIT)
        bw = t_lo % boxes_w  # scalar box coordinates, stepped per trip
        bh = (t_lo // boxes_w) % boxes_h
        bn = t_lo // (boxes_w * boxes_h)
        for _ in range(t_lo, t_hi):
            n0 = bn * TB
            ho0 = bh * TH
            wo0 = bw * TW
            if IDX64:
                n0 = n0.to(tl.int64)
            hi0 = ho0 * stride_h + h_off  # scalar
            wi0 = wo0 * stride_w + w_off
            ok = a_inv  # [BLOCK_P] real output pixel, real input pixel
            b_ok = b_inv  # [BLOCK_P]
            if not EVEN_B:
                ok = ok & (dn < NB - n0)
                b_ok = b_ok & (dnb < NB - n0)
            if not FULL_H:
                ok = ok & (dh < Ho - ho0) & ((hi0 + h_rel).to(tl.uint32) < H)
                b_ok = b_ok & (dhb < Ho - ho0)
            if not FULL_W:
                ok = ok & (dw < Wo - wo0) & ((wi0 + w_rel).to(tl.uint32) < W)
                b_ok = b_ok & (dwb < Wo - wo0)
            a_base = ((n0 * H + hi0) * W + wi0) * XC  # scalar
            if EVEN_K:
                a_mask = ok[None, :]  # [1, BLOCK_P]
            else:
                a_mask = mask_k[:, None] & ok[None, :]  # [BLOCK_K, BLOCK_P]
            a = tl.load(x_ptr + a_base + a_rel[None, :] + x_ch[:, None], mask=a_mask,
                        other=0.0)  # [BLOCK_K, BLOCK_P] x^T tile
            if POOL > 0:
                b_base = ((n0 * (Ho // POOL) + bh * (TH // POOL)) * (Wo // POOL) + bw * (TW // POOL)) * DYC  # scalar
            else:
                b_base = ((n0 * Ho + ho0) * Wo + wo0) * DYC  # scalar
            b_off = b_base + b_rel[:, None] + offs_c[None, :]  # [BLOCK_P, BLOCK_N]
            if POOL > 0:
                b_m = b_ok[:, None] & mask_c[None, :]  # [BLOCK_P, BLOCK_N]
                b = tl.load(dy_ptr + b_off, mask=b_m, other=0.0)  # [BLOCK_P, BLOCK_N] pooled gradient
                b_win = tl.load(idx_ptr + b_off, mask=b_m, other=0)  # [BLOCK_P, BLOCK_N] uint8 winning tap
                b = tl.where(b_win == b_tap[:, None], b, tl.zeros_like(b))  # expanded dy
            elif ACT != 0 or HAS_SCALE:
                b = load_dz(dy_ptr, z_ptr, scale_ptr, b_off, b_ok[:, None] & mask_c[None, :], offs_c, mask_c, slope,
                            ACT, HAS_SCALE)  # [BLOCK_P, BLOCK_N] fp32 dz tile
            else:
                b = tl.load(dy_ptr + b_off, mask=b_ok[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_P, BLOCK_N]
            if NEED_BIAS:
                bacc += tl.sum(b.to(tl.float32), axis=0)
            acc = dot(a, b.to(a.dtype), acc, PRECISION, UPCAST)
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
    else:
        p_lo = split * P_PER_SPLIT
        p_hi = tl.minimum(P, p_lo + P_PER_SPLIT)
        if IDX64:
            p_lo = p_lo.to(tl.int64)
        offs_p = p_lo + tl.arange(0, BLOCK_P)  # [BLOCK_P] output pixels of the first trip
        offs_pb = tl.arange(0, BLOCK_P)  # [BLOCK_P] pixel within a trip (the B tile's rows)
        if POOL > 0:
            # window-major pixels p = window*POOL**2 + dy*POOL + dx (a trip holds whole windows): the
            # stepped (n, ho, wo) are the window's, the tap (dy, dx) is loop-invariant
            Wc = Wo // POOL
            Hc = Ho // POOL
            steps = BLOCK_P // (POOL * POOL)  # windows per trip
            p_tap = offs_pb % (POOL * POOL)  # [BLOCK_P] the pixel's window tap
            p_dy = p_tap // POOL  # [BLOCK_P]
            p_dx = p_tap % POOL
            p_tap8 = p_tap.to(tl.uint8)  # compared as bytes
            cell = offs_p // (POOL * POOL)  # [BLOCK_P] window
            b_off = ((p_lo + offs_pb) // (POOL * POOL))[:, None] * DYC + offs_c[None, :]  # [BLOCK_P, BLOCK_N]
        else:
            Wc = Wo
            Hc = Ho
            steps = BLOCK_P
            cell = offs_p
            b_off = (p_lo + offs_pb)[:, None] * DYC + offs_c[None, :]  # [BLOCK_P, BLOCK_N] dz offsets of the first trip
        wo = cell % Wc  # [BLOCK_P] decomposed once, then stepped with carries
        t = cell // Wc
        ho = t % Hc
        n = t // Hc
        d_wo = steps % Wc  # scalar steps of (n, ho, wo) per trip of BLOCK_P pixels
        d_ho = (steps // Wc) % Hc
        d_n = steps // (Wc * Hc)
        for p0 in range(p_lo, p_hi, BLOCK_P):
            if POOL > 0:
                hi = (ho * POOL + p_dy) * stride_h + h_off  # [BLOCK_P]
                wi = (wo * POOL + p_dx) * stride_w + w_off  # [BLOCK_P]
            else:
                hi = ho * stride_h + h_off  # [BLOCK_P]
                wi = wo * stride_w + w_off  # [BLOCK_P]
            # one unsigned compare per bound pair: a negative coordinate wraps to a huge one
            ok = (hi.to(tl.uint32) < H) & (wi.to(tl.uint32) < W)  # [BLOCK_P] pixel valid at this tap
            if not EVEN_P:
                ok = ok & (offs_p < p_hi)
            a_off = ((n * H + hi) * W + wi) * XC  # [BLOCK_P]
            if EVEN_K:
                a_mask = ok[None, :]  # [1, BLOCK_P]
            else:
                a_mask = mask_k[:, None] & ok[None, :]  # [BLOCK_K, BLOCK_P]
            a = tl.load(x_ptr + a_off[None, :] + x_ch[:, None], mask=a_mask, other=0.0)  # [BLOCK_K, BLOCK_P] x^T tile
            if EVEN_P:
                b_mask = mask_c[None, :]  # [1, BLOCK_N]
            else:
                b_mask = ((p0 + offs_pb) < p_hi)[:, None] & mask_c[None, :]  # [BLOCK_P, BLOCK_N]
            if POOL > 0:
                if EVEN_N and EVEN_P:
                    b = tl.load(dy_ptr + b_off)  # [BLOCK_P, BLOCK_N] pooled gradient
                    b_win = tl.load(idx_ptr + b_off)  # [BLOCK_P, BLOCK_N] uint8 winning tap
                else:
                    b = tl.load(dy_ptr + b_off, mask=b_mask, other=0.0)
                    b_win = tl.load(idx_ptr + b_off, mask=b_mask, other=0)
                b = tl.where(b_win == p_tap8[:, None], b, tl.zeros_like(b))  # [BLOCK_P, BLOCK_N] expanded dy
            elif ACT != 0 or HAS_SCALE:
                b = load_dz(dy_ptr, z_ptr, scale_ptr, b_off, b_mask, offs_c, mask_c, slope,
                            ACT, HAS_SCALE)  # [BLOCK_P, BLOCK_N] fp32 dz tile
            elif EVEN_N and EVEN_P:
                b = tl.load(dy_ptr + b_off)  # [BLOCK_P, BLOCK_N]
            else:
                b = tl.load(dy_ptr + b_off, mask=b_mask, other=0.0)  # [BLOCK_P, BLOCK_N]
            if NEED_BIAS:
                bacc += tl.sum(b.to(tl.float32), axis=0)
            acc = dot(a, b.to(a.dtype), acc, PRECISION, UPCAST)
            # next trip: pointers advance, (n, ho, wo) step with one carry each
            b_off += steps * DYC
            offs_p += BLOCK_P
            wo += d_wo
            carry = wo >= Wc
            wo = tl.where(carry, wo - Wc, wo)
            ho += d_ho + carry.to(ho.dtype)
            carry = ho >= Hc
            ho = tl.where(carry, ho - Hc, ho)
            n += d_n + carry.to(n.dtype)
    if TORCH_LAYOUT:
        # one split: dw itself in PyTorch's [Cout, Cin_g, KH, KW] (the optimizer's gradient slot as
        # it is); a weight has < 2**31 elements: 32-bit offsets
        KK = tl.num_programs(0) // N_TILES // CCHUNKS  # KH*KW taps
        dw_off = (ci * KK + tap)[:, None] + (offs_c * (CIN_W * KK))[None, :]  # [BLOCK_K, BLOCK_N] int32
        tl.store(part_ptr + dw_off, acc, mask=(ci < CIN_W)[:, None] & mask_c[None, :])
    else:
        # split partials [S, KH*KW*Cs, Cout], rows (tap, ci): coalesced along the output channels (the
        # permutation to PyTorch's layout is _sum_to_torch_kernel's, off this kernel's registers)
        rows = tap * CS + ci  # [BLOCK_K] dw row (tap, ci)
        K_ROWS = tl.num_programs(0) // N_TILES // CCHUNKS * CS  # KH*KW*Cs rows per split
        part_off = (split * K_ROWS + rows).to(tl.int64)[:, None] * DYC + offs_c[None, :]  # [BLOCK_K, BLOCK_N]
        tl.store(part_ptr + part_off, acc, mask=mask_k[:, None] & mask_c[None, :])
    if NEED_BIAS:
        if pid_k == 0:  # every row tile computed the same column sums; one writes them
            tl.store(bpart_ptr + split * DYC + offs_c, bacc, mask=mask_c)
    if TAIL:
        S = tl.num_programs(1)
        if last_to_arrive(ctr_ptr + g * tl.num_programs(0) + pid, S):
            KK = tl.num_programs(0) // N_TILES // CCHUNKS  # KH*KW taps
            split_stride = KK * CS * DYC  # elements per split's partials
            for k0 in range(0, BLOCK_K, TAIL_K):
                ct = c0 + k0 + tl.arange(0, TAIL_K)  # [TAIL_K] input channels of this slice of the tile
                m = (ct < CIN_W)[:, None] & mask_c[None, :]  # [TAIL_K, BLOCK_N] the weight's real rows
                src = (tap * CS + ct).to(tl.int64)[:, None] * DYC + offs_c[None, :]  # [TAIL_K, BLOCK_N] split 0
                dst = (ct * KK + tap)[:, None] + (offs_c * (CIN_W * KK))[None, :]  # [TAIL_K, BLOCK_N] int32
                tl.store(dw_ptr + dst, sum_slices(part_ptr, src, m, S, split_stride), mask=m)
            if NEED_BIAS:
                if pid_k == 0:
                    tl.store(db_ptr + offs_c, sum_slices(bpart_ptr, offs_c, mask_c, S, DYC), mask=mask_c)


@triton.jit
def _sum_to_torch_kernel(part_ptr, out_ptr, S, R, COUT, CIN_W, CS, KK,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[co, ci, tap] = sum over s in order of part[s, tap*CS + ci, co], for ci < CIN_W: the split
    partials [S, R = KK*CS, COUT] summed into PyTorch's [Cout, Cin_g, KH, KW]. Grid: (R tiles, COUT tiles)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] partial row (tap, ci)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] output channel
    tap = offs_r // CS  # [BLOCK_R]
    ci = offs_r - tap * CS
    mask = ((offs_r < R) & (ci < CIN_W))[:, None] & (offs_c < COUT)[None, :]  # [BLOCK_R, BLOCK_C]
    src = part_ptr + offs_r[:, None] * COUT + offs_c[None, :]  # [BLOCK_R, BLOCK_C] pointers of split 0
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)  # [BLOCK_R, BLOCK_C] fp32 sums
    for _ in range(0, S):
        acc += tl.load(src, mask=mask, other=0.0)
        src += R * COUT
    dst = (ci * KK + tap)[:, None] + (offs_c * (CIN_W * KK))[None, :]  # [BLOCK_R, BLOCK_C]
    tl.store(out_ptr + dst, acc, mask=mask)


def _sum_to_torch(part: torch.Tensor, out: torch.Tensor | None, w_shape, Cs: int) -> torch.Tensor:
    """[S, KK*Cs, Cout] split partials -> dw [Cout, Cin_g, KH, KW] (into `out` if given), fixed order."""
    Cout, Cin_g, KH, KW = w_shape
    S, R = part.shape[0], KH * KW * Cs
    dw = out if out is not None else torch.empty((Cout * Cin_g * KH * KW,), device=part.device, dtype=torch.float32)
    br, bc = (next_pow2(R, 16, 256), next_pow2(Cout, 16, 256)) if _device.INTERPRETED else (32, 64)
    launch(_sum_to_torch_kernel, (triton.cdiv(R, br), triton.cdiv(Cout, bc)), part, dw, S, R, Cout, Cin_g, Cs,
           KH * KW, BLOCK_R=br, BLOCK_C=bc, num_warps=4)
    return dw.view(Cout, Cin_g, KH, KW)


def _sum_splits(part: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Sum fp32 partials [S, L] over S in a fixed order -> [L] (into `out` if given); one split is the sum."""
    S, L = part.shape
    if S == 1:
        return part.view(L)
    block = next_pow2(L, 16, 1 << 16) if _device.INTERPRETED else 1024
    return sum_partials(part, block=block, out=out)


def conv2d_wgrad(x, dy, w_shape, *, stride, padding, dilation, groups, need_bias=False, allow_tf32=False,
                 z=None, act="none", slope=0.01, grad_scale=None, splits=None, channels=None, out=None,
                 bias_out=None, pool=0, pool_idx=None, extent=None, bn_apply=None, weight=None):
    """(dw fp32 [Cout,Cin/g,kh,kw], dbias fp32 [Cout] or None) from x [N,H,W,Cin] and dy [N,Ho,Wo,Cout].

    The N*Ho*Wo reduction is cut into S splits (`splits` overrides the automatic choice) whose fp32
    partials are summed in a fixed order: deterministic. act/z/grad_scale as in conv2d_dgrad. channels:
    x's real channel count when x carries zero channels beyond it (groups=1), as in conv2d_forward.
    out / bias_out: contiguous fp32 tensors to write dw / dbias into (the parameters' slots in the fused
    optimizer's flat gradient buffer): dw is produced in PyTorch's layout, by the sum of the split
    partials or, with one split, by the kernel itself. pool=K: the forward fused a K x K max pool; dy is
    the pooled gradient [N,Ho//K,Wo//K,Cout] and pool_idx its argmax (ConvOutput.idx), expanded inside the
    kernel's dy loads; the pixels of the reduction are those the pool read. extent=(Hd, Wd): dy holds
    only the output's first Hd rows and Wd columns, the gradient past them zero (geometry.dy_extent).
    bn_apply: BnApplyLink.apply of the training bn alone reading the conv's output; dy is its dz, and the
    folded kernel takes its dx from X^T dz and X^T X with the conv's `weight` (else one apply launch first).
    """
    check_activation(x, "conv2d: x")
    if x.dim() != 4 or not x.is_contiguous() or x.device != dy.device:
        raise ValueError("conv2d_wgrad: x must be a contiguous NHWC tensor on dy's device")
    Cin = x.shape[3] if channels is None else check_channels(x, channels, groups)
    if channels is None and groups == 1 and Cin % channel_multiple(x.dtype):
        x = pad_channels(x, padded_channels(Cin, x.dtype))  # [N, H, W, Cs]: 16-byte pixel rows
    N, H, W = x.shape[:3]
    stride, padding, dilation, Ho, Wo = conv_geometry((N, H, W, Cin), w_shape, stride, padding, dilation, groups)
    Cout, Cin_g, KH, KW = w_shape
    if pool:
        check_pool_grad(dy, pool_idx, pool, act, grad_scale, (N, Ho // pool, Wo // pool, Cout),
                        Cin_g == 1 and groups > 1)
        Ho, Wo = Ho // pool * pool, Wo // pool * pool  # the pixels the pool read
    Ho, Wo = dy_extent(extent, Ho, Wo, pool, act, grad_scale, Cin_g == 1 and groups > 1)  # dy's pixels
    code = check_grad_inputs(dy, z, act, grad_scale, (N, Ho // (pool or 1), Wo // (pool or 1), Cout))
    if (dy := dy.contiguous()).dtype != x.dtype:
        raise ValueError(f"conv2d_wgrad: x is {x.dtype} but dy is {dy.dtype}")
    z = z.contiguous() if code != 0 else None
    G, Cout_g, P = groups, Cout // groups, N * Ho * Wo
    Cs = x.shape[3] // G  # stored channels per group (>= Cin_g)
    L = Cout * Cin_g * KH * KW
    out, bias_out = flat_grad_out(out, L, "out"), flat_grad_out(bias_out, Cout, "bias_out") if need_bias else None
    flags = dict(ACT=code, HAS_SCALE=grad_scale is not None, NEED_BIAS=need_bias)
    geo = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], float(slope))

    def finish(part: torch.Tensor, bpart):
        """(dw [Cout, Cin_g, KH, KW], dbias [Cout] or None) from the [S, L] and [S, Cout] partials."""
        dw = _sum_splits(part, out).view(Cout, Cin_g, KH, KW)
        return dw, (_sum_splits(bpart, bias_out) if need_bias else None)

    def partials(S: int):
        """[S, L] and [S, Cout] fp32 partials (PyTorch's layout); one split writes the outputs themselves."""
        def buf(n: int, dst):
            return dst.view(1, n) if S == 1 and dst is not None else torch.empty((S, n), device=x.device,
                                                                                dtype=torch.float32)
        return buf(L, out), (buf(Cout, bias_out) if need_bias else None)

    xa, na = operand_align(x.shape[3], Cs, x.dtype), operand_align(Cout, Cout_g, x.dtype)
    fold = None if pool or extent else fold_config(Cs, Cout, KH, KW, padding, G, code == 0 and grad_scale is None,
                                                   min(xa, na) == channel_multiple(x.dtype), x.element_size())
    if bn_apply is not None and (fold is None or need_bias or weight is None):  # no folded kernel for it
        dy, bn_apply = bn_apply_dx(dy, bn_apply), None
    if Cin_g == 1 and G > 1:  # depthwise: direct kernel, one program per (tap, channel tile, split)
        bp, bn, meta = dw_tiles(P, Cout)
        c_tiles = triton.cdiv(Cout, bn)
        S, per_split = split_plan(triton.cdiv(P, bp), KH * KW * c_tiles, splits)
        part, bpart = partials(S)
        depthwise_wgrad_partials(x, dy, z, grad_scale, part, bpart, (KH, KW), geo, per_split * bp, flags,
                                 BLOCK_P=bp, BLOCK_N=bn, **meta)
        return finish(part, bpart)

    if fold is not None:  # few channels, no padding (an RGB stem): every tap in one tile's rows
        return conv2d_wgrad_folded(x, dy, w_shape, fold, stride=stride, dilation=dilation, cin=Cin_g,
                                   splits=splits, need_bias=need_bias, allow_tf32=allow_tf32, out=out,
                                   bias_out=bias_out, aligns=(xa, na), bn_apply=bn_apply, w=weight)
    big = idx64(x, dy, *(t for t in (z, pool_idx) if t is not None))

    # GEMM view [K_g, P] x [P, Cout_g]: config block_m -> BLOCK_K (channels of one tap), block_n ->
    # BLOCK_N (output channels), block_k -> BLOCK_P (the reduction over output pixels), split -> S
    def plan(cfg: Config):
        """(channel chunks per tap, Cout tiles, programs per split, S, chunks per split, the pixel box
        (TB, TH, TW) or (0, 0, 0), chunks) for a config: a chunk is a box of pixels, or BLOCK_P of them."""
        cchunks = triton.cdiv(Cs, cfg.block_m)
        n_tiles = triton.cdiv(Cout_g, cfg.block_n)
        tiles = KH * KW * cchunks * n_tiles
        box = geometry.wgrad_box(N, Ho, Wo, cfg.block_k, cfg.block_n, pool)
        chunks = (triton.cdiv(N, box[0]) * triton.cdiv(Ho, box[1]) * triton.cdiv(Wo, box[2]) if box[1]
                  else triton.cdiv(P, cfg.block_k))
        S, per_split = split_plan(chunks, tiles * G, splits if splits is not None else cfg.split)
        return cchunks, n_tiles, tiles, S, per_split, box, chunks

    def run(cfg: Config):
        """dw, dbias with config `cfg`; partials are allocated per config (S follows it) and written, not added."""
        cchunks, n_tiles, tiles, S, per_split, box, chunks = plan(cfg)
        part, bpart = partials(S)
        tail = S > 1 and S * cfg.block_m * cfg.block_n * 4 <= WGRAD_TAIL_BYTES
        dw = db = ctr = None
        if S > 1:  # tap-major partials, summed into PyTorch's layout by the kernel's tail or _sum_to_torch
            part = torch.empty((S, KH * KW * Cs * Cout), device=x.device, dtype=torch.float32)
        if tail:
            dw = out if out is not None else torch.empty((L,), device=x.device, dtype=torch.float32)
            db = (bias_out if bias_out is not None else torch.empty((Cout,), device=x.device,
                                                                    dtype=torch.float32)) if need_bias else None
            ctr = ticket_counters(x.device, tiles * G)
        extent, per = (chunks, per_split) if box[1] else (P, per_split * cfg.block_k)
        launch(_conv_wgrad_kernel, (tiles, S, G), x, dy, z, grad_scale, part, bpart, pool_idx, dw, db, ctr,
               extent, per,
               N, H, W, Ho, Wo, x.shape[3] // xa, Cs // xa, Cout // na, Cout_g // na, Cin_g, n_tiles, *geo,
               KW=KW, CCHUNKS=cchunks, ALIGN=xa, NALIGN=na, TB=box[0], TH=box[1], TW=box[2],
               FULL_W=bool(box[1]) and box[2] >= Wo, FULL_H=bool(box[1]) and box[2] >= Wo and box[1] >= Ho,
               EVEN_B=bool(box[1]) and N % box[0] == 0,
               EVEN_K=Cs % cfg.block_m == 0, TORCH_LAYOUT=S == 1,
               EVEN_N=Cout_g % cfg.block_n == 0, EVEN_P=P % cfg.block_k == 0, **flags, PRECISION=precision(allow_tf32),
               UPCAST=upcast(x.dtype), IDX64=big, POOL=pool,
               TAIL=tail, TAIL_K=max(1, min(cfg.block_m, 2048 // cfg.block_n)) if tail else 0,
               BLOCK_K=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_P=cfg.block_k, **cfg.meta())
        if S == 1:
            return finish(part, bpart)
        if tail:
            return dw.view(Cout, Cin_g, KH, KW), db
        return _sum_to_torch(part, out, w_shape, Cs), (_sum_splits(bpart, bias_out) if need_bias else None)

    default = geometry.wgrad_tiles(Cs, Cout_g, P, KH * KW * G, x.element_size(),  # via the module: tests patch it
                                   fused_dz=code != 0 or grad_scale is not None or pool > 0)

    def candidates() -> list[Config]:
        tiles = wgrad_candidates(Cs, Cout_g, P, x.dtype, smem_limit(x.device), default)
        # and the default tiles with half / double the heuristic's split count
        _, _, _, S, _, _, chunks = plan(default)
        return tiles + [default.with_split(s) for s in split_variants(S, chunks) if s != S]

    shape = dict(M=KH * KW * Cs, N=Cout_g, K=P, **conv_key(KH, KW, stride, padding, dilation, G),
                 epilogue=epilogue_key(flags), tf32=bool(allow_tf32), **({"pool": pool} if pool else {}))
    cfg = autotune.pick("conv2d_wgrad", shape, dtype=x.dtype, device=x.device, default=default, run=run,
                        candidates=candidates, tunable=splits is None)  # an explicit split count is not tuned
    return run(cfg)


__all__ = ["conv2d_wgrad"]
