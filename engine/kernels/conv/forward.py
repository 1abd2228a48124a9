"""2-D convolution forward on NHWC tensors as a Triton implicit GEMM.

Layouts (see docs/KERNELS.md):
    x   [N, H, W, Cin]           NHWC contiguous activation (fp32 / fp16 / bf16)
    w   [Cout, Cin/G, KH, KW]    PyTorch layout, fp32 parameter
    y   [N, Ho, Wo, Cout]        NHWC output (any strides: may be a channel slice)

Forward (per group g, G = groups):  y[m, co] = sum_k A[m, k] * B[k, co] with
    m = (n, ho, wo)   M = N*Ho*Wo           rows: output pixels
    k = (r, s, ci)    K = KH*KW*Cin/G       gathered from x on the fly (no im2col)
    B = w repacked to [KH, KW, Cin/G, Cout] viewed as [K, Cout] (the fused
        optimizer's packed copy, engine.kernels.conv.weights)
followed by a fused epilogue: z = acc (+ bias) (* scale + shift) (+ residual);
y = act(z). Depthwise convolutions (Cin/G == 1) use a direct, non-dot kernel
since their per-group GEMM would be [M, KH*KW] x [KH*KW, Cout/G], far below the
16x16 minimum tile of tl.dot.

Public API: ConvOutput, conv2d_forward.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

import engine.kernels.conv.geometry as geometry
from engine.kernels import autotune
from engine.kernels.activations import act_code, apply_act
from engine.kernels.batchnorm.training import BatchStats, StatsTail, bn_stats_tail
from engine.kernels.common import FLOAT_DTYPES, check_activation, idx64, precision, upcast
from engine.kernels.conv.geometry import check_channels, check_vec, conv_geometry, conv_key, dw_tiles
from engine.kernels.conv.mainloop import tap_gemm
from engine.kernels.conv.pooling import check_pool, pool_epilogue, pool_row_order, window_rows
from engine.kernels.conv.weights import depthwise_weight, forward_weight, use_tma, weight_descriptor
from engine.kernels.dropout import dropout_mask_scale
from engine.kernels.launch import launch
from engine.kernels.layout import channel_multiple, operand_align, pad_channels, padded_channels
from engine.kernels.tune_config import Config, conv_candidates, epilogue_key, smem_limit


# --------------------------------------------------------------------------- #
# Device helpers shared by the kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _epilogue(acc, pid_m, offs_m, n, ho, wo, mask_m, offs_c, mask_c,
              y_ptr, z_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, psum_ptr, psumsq_ptr,
              Cout, sy_n, sy_h, sy_w, sy_c, sr_n, sr_h, sr_w, sr_c, slope, drop_p, seed,
              HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
              HAS_RES: tl.constexpr, SAVE_PRE: tl.constexpr, STATS: tl.constexpr, ACT: tl.constexpr,
              DROPOUT: tl.constexpr, FLAT: tl.constexpr):
    """z = acc (+bias) (*scale) (+shift) (+residual); store dropout(act(z)) [and z, stats].

    FLAT: y and the residual are flat over pixels (row m at m * s_w: contiguous, or a
    channel slice of a concat buffer), so their offsets need no (n, ho, wo): computed
    from those in the accumulator's layout, the compiler would redo the div/mod per element.
    """
    # acc: [BLOCK_M, BLOCK_N] fp32; offs_m/n/ho/wo/mask_m: [BLOCK_M]; offs_c/mask_c: [BLOCK_N]
    mask = mask_m[:, None] & mask_c[None, :]  # [BLOCK_M, BLOCK_N]
    z = acc
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_N]
    if HAS_SCALE:
        z *= tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        z += tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        if FLAT:
            r_off = (offs_m * sr_w)[:, None] + (offs_c * sr_c)[None, :]  # [BLOCK_M, BLOCK_N]
        else:
            r_off = (n * sr_n + ho * sr_h + wo * sr_w)[:, None] + (offs_c * sr_c)[None, :]
        z += tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
    if SAVE_PRE:
        # z is our own contiguous [M, Cout] buffer
        tl.store(z_ptr + offs_m[:, None] * Cout + offs_c[None, :], z.to(z_ptr.dtype.element_ty), mask=mask)
    if STATS:
        # per-tile column sums; padded rows/cols must not count. Without bias, shift or
        # residual they are exact zeros already (their operand rows/columns loaded as
        # 0), and skipping the select saves a second [BLOCK_M, BLOCK_N] tile of registers
        if HAS_BIAS or HAS_SHIFT or HAS_RES:
            zm = tl.where(mask, z, 0.0)  # [BLOCK_M, BLOCK_N]
        else:
            zm = z
        tl.store(psum_ptr + pid_m * Cout + offs_c, tl.sum(zm, axis=0), mask=mask_c)  # [BLOCK_N]
        tl.store(psumsq_ptr + pid_m * Cout + offs_c, tl.sum(zm * zm, axis=0), mask=mask_c)
    y = apply_act(z, ACT, slope)  # [BLOCK_M, BLOCK_N] fp32
    if DROPOUT:
        # the mask of engine.kernels.dropout: offsets are flat indices of the
        # contiguous [M, Cout] output, so the backward regenerates it there
        flat = (offs_m[:, None] * Cout + offs_c[None, :]).to(tl.int32)  # [BLOCK_M, BLOCK_N]
        y = dropout_mask_scale(y, seed, flat, drop_p)
    if FLAT:
        y_off = (offs_m * sy_w)[:, None] + (offs_c * sy_c)[None, :]  # [BLOCK_M, BLOCK_N]
    else:
        y_off = (n * sy_n + ho * sy_h + wo * sy_w)[:, None] + (offs_c * sy_c)[None, :]
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #
@triton.jit(do_not_specialize=["K_ITERS"])  # a one-trip reduction keeps its loop (and its SASS reading)
def _conv_fwd_kernel(
    x_ptr, w_op, y_ptr, z_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, psum_ptr, psumsq_ptr, idx_ptr,
    fsum_ptr, fsumsq_ptr, st_ctr_ptr, mean_ptr, rstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr,  # FINALIZE: the bn's
    M, H, W, Ho, Wo, XC_A, CIN_A, COUT_A, COUT_G_A, CIN_W,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, K_ITERS,
    sy_n, sy_h, sy_w, sy_c, sr_n, sr_h, sr_w, sr_c, slope, drop_p, seed,
    ST_T, ST_R, inv_m, unbias, bn_eps, bn_momentum,
    KH: tl.constexpr, KW: tl.constexpr, CHUNKS: tl.constexpr, TPC: tl.constexpr, ALIGN: tl.constexpr,
    NALIGN: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, W_TMA: tl.constexpr, W_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    SAVE_PRE: tl.constexpr, STATS: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr, FLAT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr, POOL: tl.constexpr,
    TAP_S1: tl.constexpr, TAP_S0: tl.constexpr,
    FINALIZE: tl.constexpr, HAS_RUNNING: tl.constexpr, CMA: tl.constexpr, COUNT: tl.constexpr,
    ST_BLOCK_T: tl.constexpr, IN_BOUNDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Implicit-GEMM conv forward. Grid: (M tiles, Cout/G tiles, G).

    The main loop (engine.kernels.conv.mainloop.tap_gemm) runs K_ITERS =
    KH*KW*CHUNKS trips over (tap, channel chunk), or ceil(KH*KW / TPC) when a
    chunk holds TPC whole taps (fewer than 16 stored channels: a padded RGB
    stem). Channel counts come in units of ALIGN / NALIGN (8 for 16-bit types when they are multiples of 8), so the
    compiler can prove every row 16-byte aligned and issue 16-byte async copies
    (Triton only knows divisibility by 16 of an integer argument). W_TMA: w_op is
    a TMA descriptor of the packed weights [KH*KW*Cs, Cout] (block [BLOCK_K,
    BLOCK_N]), else their base pointer. The weights hold CIN_W channels per tap
    (PyTorch's Cin/G: [KH*KW*CIN_W, Cout]); W_PAD: the input stores more (zero
    channels appended for 16-byte rows), and the weight rows of channels >= CIN_W
    are masked instead of stored as zeros, so the optimizer's plain permuted copy
    serves. IDX64: 64-bit offsets (a tensor of 2**31 or more elements). IN_BOUNDS (TPC > 1, no
    padding): every tap of a real output pixel reads a real input pixel (tap_gemm's mask is the
    row's).
    POOL > 0: a fused POOL x POOL / stride POOL max pool (no padding, floor mode; POOL**2
    divides BLOCK_M): M = N*PH*PW*POOL**2 rows in window-major order (rows a floor-mode pool
    drops are not computed; window_rows orders a tile's rows), stored by pool_epilogue into
    y [N, PH, PW, Cout] and idx.
    """
    XC = XC_A * ALIGN  # x's channels as stored (pixel stride): G * Cs
    CIN_G = CIN_A * ALIGN  # input channels per group as stored, Cs (>= the weight's; zero weights beyond)
    Cout = COUT_A * NALIGN  # output channels, in units of NALIGN likewise
    Cout_g = COUT_G_A * NALIGN
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    if IDX64:
        pid_m = pid_m.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] output pixel index
    mask_m = offs_m < M
    if POOL > 0:
        # window-major rows, so a tile holds whole windows (constexpr divisors for the tap)
        PWo = Wo // POOL
        PHo = Ho // POOL
        win, tap = window_rows(pid_m, POOL, TAP_S1, TAP_S0, BLOCK_M)  # [BLOCK_M] each
        mask_m = win < M // (POOL * POOL)
        pw = win % PWo
        t = win // PWo
        ho = (t % PHo) * POOL + tap // POOL  # [BLOCK_M]
        wo = pw * POOL + tap % POOL  # [BLOCK_M]
        n = t // PHo  # [BLOCK_M]
    else:
        wo = offs_m % Wo  # [BLOCK_M]
        t = offs_m // Wo  # [BLOCK_M]
        ho = t % Ho  # [BLOCK_M]
        n = t // Ho  # [BLOCK_M]
    hi0 = ho * stride_h - pad_h  # [BLOCK_M] input row of tap (0, 0)
    wi0 = wo * stride_w - pad_w  # [BLOCK_M]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K] channel within a chunk
    # [BLOCK_M] offsets of tap (0, 0), channel 0 (outside the image where padded: masked)
    a_rows = ((n * H + hi0) * W + wi0) * XC + g * CIN_G
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] channel within group
    mask_c = offs_cn < Cout_g
    offs_c = g * Cout_g + offs_cn  # [BLOCK_N] global output channel
    if W_PAD:
        CIN_B = CIN_W  # weight rows per tap
    else:
        CIN_B = CIN_G
    if W_TMA:
        b_op = w_op
    elif W_PAD and TPC > 1:
        # lane k of a chunk of TPC taps reads weight row (k // CIN_G) * CIN_W + k % CIN_G
        b_lane = (offs_k // (BLOCK_K // TPC)) * CIN_W + offs_k % (BLOCK_K // TPC)  # [BLOCK_K]
        b_op = w_op + b_lane[:, None] * Cout + offs_c[None, :]  # [BLOCK_K, BLOCK_N] pointers of row 0
    else:
        b_op = w_op + offs_k[:, None] * Cout + offs_c[None, :]  # [BLOCK_K, BLOCK_N] pointers of row 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N] fp32 accumulator
    acc = tap_gemm(acc, x_ptr, a_rows, hi0, wi0, dil_h, dil_w, H, W, mask_m, b_op, offs_k, mask_c, K_ITERS, KH, KW,
                   CIN_G, dil_h * W * XC, dil_w * XC, 0, KW * CIN_B, CIN_B, Cout, g * Cout_g + pid_n * BLOCK_N,
                   x_ptr, x_ptr, 0, 0.0,
                   KH, KW, CHUNKS, TPC, EVEN_K, EVEN_N, W_TMA, 0, False, PRECISION, UPCAST, BLOCK_K, W_PAD,
                   x_ptr, 0, 0, 0, IN_BOUNDS)
    if POOL > 0:
        pool_epilogue(acc, pid_m, offs_c, mask_c, y_ptr, idx_ptr, bias_ptr, scale_ptr, shift_ptr, psum_ptr,
                       psumsq_ptr, M // (POOL * POOL), Cout, slope, HAS_BIAS, HAS_SCALE, HAS_SHIFT, STATS, ACT,
                       POOL, TAP_S1, TAP_S0, BLOCK_M, BLOCK_N)
    else:
        _epilogue(acc, pid_m, offs_m, n, ho, wo, mask_m, offs_c, mask_c,
                  y_ptr, z_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, psum_ptr, psumsq_ptr,
                  Cout, sy_n, sy_h, sy_w, sy_c, sr_n, sr_h, sr_w, sr_c, slope, drop_p, seed,
                  HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RES, SAVE_PRE, STATS, ACT, DROPOUT, FLAT)
    if FINALIZE:  # (groups 1) every program, after its statistics row: the last ones finish the bn's statistics
        bn_stats_tail(psum_ptr, psumsq_ptr, fsum_ptr, fsumsq_ptr, st_ctr_ptr, tl.program_id(0), ST_T, ST_R, Cout,
                      pid_n, tl.num_programs(1), offs_c, mask_c, mean_ptr, rstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
                      inv_m, unbias, bn_eps, bn_momentum, HAS_RUNNING, CMA, COUNT, ST_BLOCK_T, BLOCK_N)


@triton.jit
def _dwconv_fwd_kernel(
    x_ptr, w_ptr, y_ptr, z_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, psum_ptr, psumsq_ptr,
    M, H, W, Cin, Ho, Wo, Cout, MULT, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sy_n, sy_h, sy_w, sy_c, sr_n, sr_h, sr_w, sr_c, slope, drop_p, seed,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    SAVE_PRE: tl.constexpr, STATS: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr, FLAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Depthwise conv (one input channel per group): direct FMA over taps. Grid: (M tiles, Cout tiles)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] output pixel
    mask_m = offs_m < M
    wo = offs_m % Wo  # [BLOCK_M]
    ho = (offs_m // Wo) % Ho  # [BLOCK_M]
    n = offs_m // (Wo * Ho)  # [BLOCK_M]
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output channel
    mask_c = offs_c < Cout
    ci = offs_c // MULT  # [BLOCK_N] its input channel (group index)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N] fp32 accumulator
    for r in range(0, KH):
        hi = ho * stride_h - pad_h + r * dil_h  # [BLOCK_M]
        for s in range(0, KW):
            wi = wo * stride_w - pad_w + s * dil_w  # [BLOCK_M]
            pix_ok = mask_m & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)  # [BLOCK_M]
            base = n * (H * W * Cin) + (hi * W + wi) * Cin  # [BLOCK_M]
            xv = tl.load(x_ptr + base[:, None] + ci[None, :], mask=pix_ok[:, None] & mask_c[None, :],
                         other=0.0)  # [BLOCK_M, BLOCK_N] input taps
            wv = tl.load(w_ptr + (r * KW + s) * Cout + offs_c, mask=mask_c, other=0.0)  # [BLOCK_N] weights
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    _epilogue(acc, pid_m, offs_m, n, ho, wo, mask_m, offs_c, mask_c,
              y_ptr, z_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, psum_ptr, psumsq_ptr,
              Cout, sy_n, sy_h, sy_w, sy_c, sr_n, sr_h, sr_w, sr_c, slope, drop_p, seed,
              HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RES, SAVE_PRE, STATS, ACT, DROPOUT, FLAT)


# --------------------------------------------------------------------------- #
# Host side
# --------------------------------------------------------------------------- #
def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class ConvOutput(NamedTuple):
    """conv2d_forward's result. Fields not requested are None.

    y:      [N, Ho, Wo, Cout] act(z) (the `out` tensor if one was given)
    z:      [N, Ho, Wo, Cout] pre-activation, when save_pre=True (x's dtype)
    psum:   [T, Cout] fp32 per-M-tile sums of z, when stats=True (T = M tiles)
    psumsq: [T, Cout] fp32 per-M-tile sums of z*z, when stats=True
    idx:    [N, Ho//K, Wo//K, Cout] uint8 winning window tap of a fused K x K max pool (pool=K);
            then y is the pooled output and the sums are those of y
    stats:  the batch norm's finished BatchStats, when stats_tail was given and the GEMM kernel ran
            (its last programs folded the sums: batchnorm.training.bn_stats_tail)
    """

    y: torch.Tensor
    z: Optional[torch.Tensor] = None
    psum: Optional[torch.Tensor] = None
    psumsq: Optional[torch.Tensor] = None
    idx: Optional[torch.Tensor] = None
    stats: Optional[BatchStats] = None


def conv2d_forward(x, w, bias=None, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                   scale=None, shift=None, residual=None, act="none", slope=0.01, save_pre=False,
                   stats=False, allow_tf32=False, out=None, dropout_p=0.0, dropout_seed=0,
                   channels=None, pool=0, stats_tail: StatsTail | None = None) -> ConvOutput:
    """y = dropout(act(((conv(x, w) + bias) * scale + shift) + residual)) on NHWC x; see ConvOutput.

    x [N,H,W,Cin] contiguous fp32/fp16/bf16; w [Cout,Cin/groups,kh,kw] (cast to
    x's dtype); bias/scale/shift optional fp32 [Cout]; residual optional
    [N,Ho,Wo,Cout] (any strides); out optional [N,Ho,Wo,Cout] with any strides
    (e.g. a channel slice of a concat buffer). dropout_p > 0 applies training-mode
    dropout with the mask of engine.kernels.dropout for `dropout_seed` (its
    backward regenerates the mask).
    channels: x's real channel count when x carries zero channels beyond it
    (groups=1; engine.kernels.layout.pad_channels); by default all of x's
    channels are real, and a count that is not a multiple of 16 bytes is padded
    here (a copy) so the kernel's loads stay 16-byte aligned.
    pool=K (a power of two, K*K <= 16): a fused K x K / stride K max pool (no padding, floor
    mode) after act: y is [N, Ho//K, Wo//K, Cout] and ConvOutput.idx its winning taps (the
    statistics are the pooled y's); no residual, out, dropout or save_pre, and not depthwise.
    stats_tail (with stats, groups 1): the training batch norm that reads the output; the kernel's
    last programs finish its statistics (ConvOutput.stats; running statistics updated), so the
    batch norm launches no finalize. Depthwise and grouped convs return the partial sums instead.
    """
    check_activation(x, "conv2d: x")
    if x.dim() != 4 or not x.is_contiguous():
        raise ValueError(f"conv2d: x must be a contiguous NHWC [N,H,W,C] tensor, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    if w.dim() != 4 or not w.is_floating_point() or w.device != x.device:
        raise ValueError(f"conv2d: w must be a float [Cout,Cin/g,kh,kw] tensor on {x.device}")
    Cin = x.shape[3] if channels is None else check_channels(x, channels, groups)
    N, H, W = x.shape[:3]
    stride, padding, dilation, Ho, Wo = conv_geometry((N, H, W, Cin), w.shape, stride, padding, dilation, groups)
    Cout, Cin_g, KH, KW = w.shape
    for v, name in ((bias, "bias"), (scale, "scale"), (shift, "shift")):
        check_vec(v, Cout, x.device, name)
    for t, name in ((residual, "residual"), (out, "out")):
        if t is not None and (t.shape != (N, Ho, Wo, Cout) or t.device != x.device or t.dtype not in FLOAT_DTYPES):
            raise ValueError(f"conv2d: {name} must be a float [{N},{Ho},{Wo},{Cout}] tensor on {x.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    code = act_code(act)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"conv2d: dropout_p must be in [0, 1), got {dropout_p}")
    M, G, Cout_g = N * Ho * Wo, groups, Cout // groups
    idx = None
    if pool:
        check_pool(pool, Ho, Wo, Cin_g, G, residual, out, dropout_p, save_pre)
        PH, PW = Ho // pool, Wo // pool
        M = N * PH * PW * pool * pool  # the rows a floor-mode pool reads; the dropped ones are not computed
        idx = torch.empty((N, PH, PW, Cout), device=x.device, dtype=torch.uint8)
        out = torch.empty((N, PH, PW, Cout), device=x.device, dtype=x.dtype)
    y = torch.empty((N, Ho, Wo, Cout), device=x.device, dtype=x.dtype) if out is None else out
    z = torch.empty((N, Ho, Wo, Cout), device=x.device, dtype=x.dtype) if save_pre else None
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)

    tail = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    tail2 = (*y.stride(), *res_strides, float(slope), float(dropout_p), int(dropout_seed))
    flags = dict(HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
                 HAS_RES=residual is not None, SAVE_PRE=save_pre, STATS=stats, ACT=code, DROPOUT=dropout_p > 0)
    flat = pool > 0 or all(t is None or (t.stride(0) == Ho * Wo * t.stride(2) and t.stride(1) == Wo * t.stride(2))
                           for t in (y, residual))
    big = idx64(x, y, *(t for t in (z, residual) if t is not None))

    def stats_buffers(bm: int):
        """psum, psumsq [M tiles, Cout] fp32 (None without stats): their row count follows BLOCK_M."""
        if not stats:
            return None, None
        T = triton.cdiv(M, bm)
        return (torch.empty((T, Cout), device=x.device, dtype=torch.float32),
                torch.empty((T, Cout), device=x.device, dtype=torch.float32))

    if Cin_g == 1 and G > 1:  # depthwise: direct kernel
        bm, bn, meta = dw_tiles(M, Cout)
        wk = depthwise_weight(w, x.dtype)  # [KH*KW, Cout]: the optimizer's copy, or packed now
        psum, psumsq = stats_buffers(bm)
        launch(_dwconv_fwd_kernel, (triton.cdiv(M, bm), triton.cdiv(Cout, bn)),
               x, wk, y, z, bias, scale, shift, residual, psum, psumsq,
               M, H, W, Cin, Ho, Wo, Cout, Cout // Cin, KH, KW, *tail, *tail2,
               **flags, FLAT=flat, BLOCK_M=bm, BLOCK_N=bn, **meta)
        return ConvOutput(y, z, psum, psumsq)

    if channels is None and G == 1 and Cin % channel_multiple(x.dtype):
        x = pad_channels(x, padded_channels(Cin, x.dtype))  # [N, H, W, Cs]: 16-byte pixel rows
    Cs = x.shape[3] // G  # stored input channels per group
    wk = forward_weight(w, x.dtype)  # [KH*KW*Cin_g, Cout]: the optimizer's copy, or packed now
    wpad = Cs != Cin_g  # the input's zero channels meet masked weight rows
    xa, na = operand_align(x.shape[3], Cs, x.dtype), operand_align(Cout, Cout_g, x.dtype)

    def run(cfg: Config, final: bool = False):
        """Launch with tile config `cfg`; writes y (z, stats) afresh, so it can run repeatedly; `final`:
        the one launch that also finishes the batch norm's statistics (it updates the running ones)."""
        psum, psumsq = stats_buffers(cfg.block_m)
        # a chunk of several whole taps when a tap has fewer channels than the chunk (a power
        # of two, 16 bytes or more: 8 or 16 bf16 channels, 4 fp32): the padded RGB stem
        tpc = cfg.block_k // Cs if Cs < cfg.block_k and Cs & (Cs - 1) == 0 and xa > 1 else 1
        iters = triton.cdiv(KH * KW, tpc) if tpc > 1 else KH * KW * triton.cdiv(Cs, cfg.block_k)
        grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(Cout_g, cfg.block_n), G)
        tma = use_tma(wk, na, cfg.block_n) and not (wpad and tpc > 1)  # TMA reads whole rows
        wop = weight_descriptor(wk, cfg.block_k, cfg.block_n) if tma else wk
        if cfg.block_m % (pool * pool or 1):
            raise ValueError(f"conv2d: BLOCK_M {cfg.block_m} must hold whole {pool}x{pool} pool windows")
        finished = None
        if final and stats and stats_tail is not None and G == 1:
            st_tensors, st_scalars, st_flags, finished = stats_tail.launch_args(
                grid[0], M // (pool * pool or 1), Cout, cfg.block_n, x.device)
        else:
            st_tensors, st_scalars = (y,) * 8, (1, 1, 0.0, 0.0, 0.0, 0.0)
            st_flags = dict(HAS_RUNNING=False, CMA=False, COUNT=False, ST_BLOCK_T=1)
        launch(_conv_fwd_kernel, grid, x, wop, y, z, bias, scale, shift, residual, psum, psumsq, idx, *st_tensors,
               M, H, W, Ho, Wo, x.shape[3] // xa, Cs // xa, Cout // na, Cout_g // na, Cin_g, *tail,
               iters, *tail2, *st_scalars, FINALIZE=finished is not None, **st_flags,
               KH=KH, KW=KW, CHUNKS=1 if tpc > 1 else triton.cdiv(Cs, cfg.block_k), TPC=tpc, ALIGN=xa,
               NALIGN=na, EVEN_K=tpc > 1 or Cs % cfg.block_k == 0, W_PAD=wpad,
               EVEN_N=Cout_g % cfg.block_n == 0,
               **flags, FLAT=flat, PRECISION=precision(allow_tf32), UPCAST=upcast(x.dtype), IDX64=big, W_TMA=tma,
               POOL=pool, **dict(zip(("TAP_S1", "TAP_S0"), pool_row_order(pool, cfg.block_m, cfg.num_warps))),
               IN_BOUNDS=tpc > 1 and tuple(padding) == (0, 0), BLOCK_M=cfg.block_m,
               BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **cfg.meta())
        return psum, psumsq, finished

    default = geometry.gemm_tiles(M, Cout_g, Cs, KH * KW)  # through the module: tests patch it
    shape = dict(M=M, N=Cout_g, K=KH * KW * Cs, **conv_key(KH, KW, stride, padding, dilation, G),
                 epilogue=epilogue_key(flags), tf32=bool(allow_tf32), **({"pool": pool} if pool else {}))
    cfg = autotune.pick(
        "conv2d_fwd", shape, dtype=x.dtype, device=x.device, default=default, run=run,
        candidates=lambda: [c for c in conv_candidates(M, Cout_g, Cs, KH * KW, x.dtype, smem_limit(x.device),
                                                       default) if c.block_m % (pool * pool or 1) == 0],
        # re-running is only harmless when the output does not overwrite an input
        tunable=not any(t is not None and _same_memory(y, t) for t in (x, residual)))
    psum, psumsq, finished = run(cfg, final=True)
    return ConvOutput(y, z, psum, psumsq, idx, finished)
