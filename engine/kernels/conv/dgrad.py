"""Convolution dgrad (dx) on NHWC tensors: one implicit-GEMM launch for every stride
phase, and the direct depthwise variant.

dx pixels with the same (hi mod sh, wi mod sw) -- a stride phase -- are reached
by the same subset of kernel taps, so each phase is a dense GEMM over only
those taps (no zero-insertion of dy, no masking of taps that can never
contribute). The phase is the third grid axis (with the group): one launch,
each program working out its phase's taps from the phase index (a few scalar
operations, once). Stride 1 is the single-phase case, a conv of dy with the
flipped, transposed weights, and its tap counts are compile-time constants.

Within phase (ra, rb) the taps are r = r0 + jr*step_r (jr < nr; step_r =
sh / gcd(sh, dh)), and the dx pixel hi = qh*sh + ra reads dy row
ho = qh + c_r - jr*dstep_h: a forward-shaped loop (engine.kernels.conv.mainloop)
over dy with "dilation" -dstep_h.

The operand is dz = act'(z) * dy (* scale) when the forward fused an
activation (ACT) or a folded batch-norm scale (HAS_SCALE); plain dy loads go
through 16-byte async copies.

Public API: conv2d_dgrad.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import engine.kernels.conv.geometry as geometry
from engine.kernels import autotune
from engine.kernels.batchnorm.backward import bn_grad_args, bn_grad_epilogue
from engine.kernels.common import idx64, precision, upcast
from engine.kernels.conv.geometry import (check_grad_inputs, check_pool_grad, conv_geometry, conv_key,
                                          dgrad_phases, dw_tiles, dy_extent)
from engine.kernels.conv.mainloop import load_dz, tap_gemm
from engine.kernels.conv.weights import depthwise_weight, dgrad_weight, use_tma, weight_descriptor
from engine.kernels.launch import launch
from engine.kernels.layout import operand_align
from engine.kernels.tune_config import Config, conv_candidates, epilogue_key, smem_limit


@triton.jit
def _phase_axis(ra, pad, dil, ST: tl.constexpr, K: tl.constexpr):
    """Taps t < K of stride phase `ra` along one axis: those with (ra + pad - t*dil) % ST == 0.

    Returns (t0 first tap, n taps, step between taps, c = (ra + pad - t0*dil) / ST,
    dstep = step*dil / ST), scalars; n = 0 when no tap reaches the phase."""
    n = ra * 0
    t0 = ra * 0
    t1 = ra * 0
    for t in tl.static_range(K):
        hit = ((ra + pad - t * dil) % ST) == 0
        t0 = tl.where(hit & (n == 0), t, t0)
        t1 = tl.where(hit & (n == 1), t, t1)
        n += hit.to(tl.int32)
    step = tl.where(n >= 2, t1 - t0, 1)
    return t0, n, step, (ra + pad - t0 * dil) // ST, step * dil // ST


@triton.jit
def _conv_dgrad_kernel(
    dy_ptr, z_ptr, scale_ptr, w_op, dx_ptr, idx_ptr,
    bnx_ptr, bn_mean_ptr, bn_rstd_ptr, bn_w_ptr, bn_b_ptr,  # BN_GRAD: the batch norm that made x, and
    pdz_ptr, pdzx_ptr, fdz_ptr, fdzx_ptr, sdz_ptr, sdzx_ptr, bn_ctr_ptr,  # its sums' scratch and output
    NB, H, W, Ho, Wo, DYC_A, COUT_G_A, DXC_A, CIN_G_A, pad_h, pad_w, dil_h, dil_w, slope,
    BN_R, bn_slope,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, CHUNKS: tl.constexpr,
    ALIGN: tl.constexpr, NALIGN: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, W_TMA: tl.constexpr,
    ACT: tl.constexpr, HAS_SCALE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    IDX64: tl.constexpr, POOL: tl.constexpr, BN_GRAD: tl.constexpr, BN_ACT: tl.constexpr,
    BN_HAS_W: tl.constexpr, BN_HAS_B: tl.constexpr, BN_BLOCK_T: tl.constexpr, BN_HALVES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx of every stride phase. Grid: (M tiles of the largest phase, Cin/G tiles, G * SH*SW [* POOL**2]).

    dy [NB, Ho, Wo, DYC] (DYC = G*Cout_g), dx [NB, H, W, DXC] (DXC = G*Cin_g); channel
    counts in units of ALIGN (dy) and NALIGN (dx). w_op: a TMA descriptor of the
    packed weights [KH*KW*Cout, Cin_g] (W_TMA), else their base pointer.
    POOL > 0 (a fused POOL x POOL max pool): dy is the pooled gradient [NB, Ho/POOL, Wo/POOL,
    DYC] with the argmax idx_ptr, expanded in the A load (mainloop.tap_gemm's A_POOL); Ho, Wo
    are then the pooled extent times POOL (the rows the pool read: the dropped ones get no
    gradient). Each stride phase splits into POOL**2 pool phases (its rows and columns mod
    POOL), so every tap reads its pooled rows at a scalar offset with a scalar argmax code.
    BN_GRAD (groups 1): x = act(bn(bnx)) of a training batch norm whose output only this conv reads;
    the epilogue stores dz = act'(z) * dx instead of dx and emits the batch norm's gradient sums
    (batchnorm.backward.bn_grad_epilogue; a partial row per program row: (M tile, phase)).
    """
    DYC = DYC_A * ALIGN
    COUT_G = COUT_G_A * ALIGN
    DXC = DXC_A * NALIGN
    CIN_G = CIN_G_A * NALIGN
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    if POOL > 0:  # pool phase (bh, bw) = (the stride phase's row, column) mod POOL
        sub = pid_z % (POOL * POOL)
        pid_z = pid_z // (POOL * POOL)
        bh = sub // POOL
        bw = sub % POOL
    g = pid_z // (SH * SW)
    phase = pid_z % (SH * SW)
    ra = phase // SW
    rb = phase % SW
    if SH == 1 and SW == 1:  # one phase: every tap, compile-time counts
        r0, nr, step_r, c_r, dstep_h = 0, KH, 1, pad_h, dil_h
        s0, ns, step_s, c_s, dstep_w = 0, KW, 1, pad_w, dil_w
    else:
        r0, nr, step_r, c_r, dstep_h = _phase_axis(ra, pad_h, dil_h, SH, KH)
        s0, ns, step_s, c_s, dstep_w = _phase_axis(rb, pad_w, dil_w, SW, KW)
    Hq = (H - ra + SH - 1) // SH  # dx rows of this phase (0 when ra >= H)
    Wq = (W - rb + SW - 1) // SW
    if POOL > 0:
        # the phase's rows qh = POOL*qq + bh: tap jr reads dy row qh + c_r - jr*dstep_h =
        # POOL*qq + (bh + c_r - jr*dstep_h), a pooled row qq + scalar and a scalar argmax code
        Hs = tl.maximum(Hq - bh + POOL - 1, 0) // POOL
        Ws = tl.maximum(Wq - bw + POOL - 1, 0) // POOL
    else:
        Hs = Hq
        Ws = Wq
    Mq = NB * Hs * Ws
    if IDX64:
        pid_m = pid_m.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] dx pixel within this phase
    mask_m = offs_m < Mq
    Ws1 = tl.maximum(Ws, 1)
    Hs1 = tl.maximum(Hs, 1)
    qw = offs_m % Ws1  # [BLOCK_M]
    t = offs_m // Ws1  # [BLOCK_M]
    qh = t % Hs1  # [BLOCK_M]
    n = t // Hs1  # [BLOCK_M]
    ho0 = qh + c_r  # [BLOCK_M] dy row read by tap jr = 0 (without a pool)
    wo0 = qw + c_s  # [BLOCK_M]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K] output channel within a chunk
    if POOL > 0:
        PHo = Ho // POOL
        PWo = Wo // POOL
        a_rows = ((n * PHo + qh) * PWo + qw) * DYC + g * COUT_G  # [BLOCK_M] pooled dy offsets, channel 0
    else:
        a_rows = ((n * Ho + ho0) * Wo + wo0) * DYC + g * COUT_G  # [BLOCK_M] dy offsets of tap 0, channel 0
    offs_ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] input channel within group
    mask_ci = offs_ci < CIN_G
    Cout = DYC
    if W_TMA:
        b_op = w_op
    else:
        b_op = w_op + offs_k[:, None] * CIN_G + offs_ci[None, :]  # [BLOCK_K, BLOCK_N] pointers of row 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N] fp32 accumulator
    if POOL > 0:
        acc = tap_gemm(acc, dy_ptr, a_rows, qh, qw, -dstep_h, -dstep_w, PHo, PWo, mask_m, b_op, offs_k, mask_ci,
                       nr * ns * CHUNKS, nr, ns, COUT_G, PWo * DYC, DYC,
                       (r0 * KW + s0) * Cout + g * COUT_G, step_r * KW * Cout, step_s * Cout, CIN_G,
                       pid_n * BLOCK_N, z_ptr, scale_ptr, g * COUT_G, slope,
                       KH, KW, CHUNKS, 1, EVEN_K, EVEN_N, W_TMA, 0, False, PRECISION, UPCAST, BLOCK_K, False,
                       idx_ptr, bh + c_r, bw + c_s, POOL, False)
        qh = qh * POOL + bh  # [BLOCK_M] the stride phase's row (for the store)
        qw = qw * POOL + bw
    else:
        acc = tap_gemm(acc, dy_ptr, a_rows, ho0, wo0, -dstep_h, -dstep_w, Ho, Wo, mask_m, b_op, offs_k, mask_ci,
                       nr * ns * CHUNKS, nr, ns, COUT_G, -dstep_h * Wo * DYC, -dstep_w * DYC,
                       (r0 * KW + s0) * Cout + g * COUT_G, step_r * KW * Cout, step_s * Cout, CIN_G,
                       pid_n * BLOCK_N, z_ptr, scale_ptr, g * COUT_G, slope,
                       KH, KW, CHUNKS, 1, EVEN_K, EVEN_N, W_TMA, ACT, HAS_SCALE, PRECISION, UPCAST, BLOCK_K, False,
                       dy_ptr, 0, 0, 0, False)
    if SH == 1 and SW == 1 and POOL == 0:
        pix = offs_m  # [BLOCK_M] the dx pixel: no (n, hi, wi), which the compiler would redo per element here
    else:
        pix = (n * H + qh * SH + ra) * W + qw * SW + rb  # [BLOCK_M]
    if BN_GRAD:  # every program, empty tiles too: each must write its partial row and draw its tickets
        row = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)  # (one group: g * CIN_G = 0)
        bn_grad_epilogue(acc, dx_ptr, pix, mask_m, row, tl.program_id(1), tl.num_programs(1), offs_ci, mask_ci,
                         bnx_ptr, bn_mean_ptr, bn_rstd_ptr, bn_w_ptr, bn_b_ptr, pdz_ptr, pdzx_ptr, fdz_ptr,
                         fdzx_ptr, sdz_ptr, sdzx_ptr, bn_ctr_ptr, tl.num_programs(2) * tl.num_programs(0), BN_R,
                         DXC, bn_slope,
                         BN_ACT, BN_HAS_W, BN_HAS_B, BN_BLOCK_T, BLOCK_M, BLOCK_N, BN_HALVES)  # dz in dx's place
    else:
        dx_off = (pix * DXC + g * CIN_G)[:, None] + offs_ci[None, :]  # [BLOCK_M, BLOCK_N]
        out_mask = mask_m[:, None] & mask_ci[None, :]  # [BLOCK_M, BLOCK_N]
        tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dwconv_dgrad_kernel(
    dy_ptr, z_ptr, scale_ptr, w_ptr, dx_ptr,
    Mq, H, W, Cin, Ho, Wo, Cout, MULT, KW, stride_h, stride_w,
    ra, rb, Hq, Wq, r0, nr, step_r, c_r, dstep_h, s0, ns, step_s, c_s, dstep_w, slope,
    ACT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Depthwise dx for one stride phase, direct FMAs. Grid: (Mq tiles, Cin tiles).

    Input channel ci gets dz from output channels ci*MULT .. ci*MULT + MULT-1.
    Phase arguments as in geometry.dgrad_phases; w is [KH*KW, Cout].
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] dx pixel within this phase
    mask_m = offs_m < Mq
    qw = offs_m % Wq  # [BLOCK_M]
    qh = (offs_m // Wq) % Hq  # [BLOCK_M]
    n = offs_m // (Wq * Hq)  # [BLOCK_M]
    offs_ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] input channel
    mask_ci = offs_ci < Cin
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N] fp32 accumulator
    for jr in range(0, nr):
        ho = qh + c_r - jr * dstep_h  # [BLOCK_M] dy row read by tap r0 + jr*step_r
        for js in range(0, ns):
            wo = qw + c_s - js * dstep_w  # [BLOCK_M]
            ok = mask_m & (ho >= 0) & (ho < Ho) & (wo >= 0) & (wo < Wo)  # [BLOCK_M]
            row = n * (Ho * Wo * Cout) + (ho * Wo + wo) * Cout  # [BLOCK_M]
            tap = (r0 + jr * step_r) * KW + (s0 + js * step_s)  # scalar flattened (r, s)
            for m in range(0, MULT):
                co = offs_ci * MULT + m  # [BLOCK_N] output channel
                dz = load_dz(dy_ptr, z_ptr, scale_ptr, row[:, None] + co[None, :],
                             ok[:, None] & mask_ci[None, :], co, mask_ci, slope,
                             ACT, HAS_SCALE)  # [BLOCK_M, BLOCK_N] fp32
                wv = tl.load(w_ptr + tap * Cout + co, mask=mask_ci, other=0.0)  # [BLOCK_N]
                acc += dz * wv.to(tl.float32)[None, :]
    hi = qh * stride_h + ra  # [BLOCK_M]
    wi = qw * stride_w + rb  # [BLOCK_M]
    dx_off = (n * (H * W * Cin) + (hi * W + wi) * Cin)[:, None] + offs_ci[None, :]  # [BLOCK_M, BLOCK_N]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_ci[None, :])


def conv2d_dgrad(dy, w, x_shape, *, stride, padding, dilation, groups, allow_tf32=False,
                 z=None, act="none", slope=0.01, grad_scale=None, pool=0, pool_idx=None, bn_grad=None, extent=None):
    """dx [N,H,W,Cin] (dy's dtype) of a conv with weights w, from dy [N,Ho,Wo,Cout].

    With act != "none", dy is the gradient of act(z) and the kernel uses
    act_grad(dy, z); grad_scale [Cout] (the forward's folded-BN scale) multiplies it.
    pool=K: the forward fused a K x K max pool; dy is the pooled gradient [N,Ho//K,Wo//K,Cout]
    and pool_idx its argmax (ConvOutput.idx), expanded inside the kernel's dy loads.
    bn_grad=(x, mean, rstd, weight, bias, act code, slope) (BnGradLink.saved): the conv's input is
    act(bn(x)) of a training batch norm only this conv reads; returns (dz, (sdz, sdzx)) instead:
    dz = act'(z) * dx in dx's place and that batch norm's per-channel gradient sums ([Cin] fp32).
    extent=(Hd, Wd): dy [N, Hd, Wd, Cout] holds only the output's first Hd rows and Wd columns, the
    gradient past them being zero (geometry.dy_extent).
    """
    stride, padding, dilation, Ho, Wo = conv_geometry(x_shape, w.shape, stride, padding, dilation, groups)
    N, H, W, Cin = x_shape
    Cout, Cin_g, KH, KW = w.shape
    if pool:
        check_pool_grad(dy, pool_idx, pool, act, grad_scale, (N, Ho // pool, Wo // pool, Cout),
                        Cin_g == 1 and groups > 1)
        Ho, Wo = Ho // pool * pool, Wo // pool * pool  # the rows the pool read
    Ho, Wo = dy_extent(extent, Ho, Wo, pool, act, grad_scale, Cin_g == 1 and groups > 1)  # dy's rows
    code = check_grad_inputs(dy, z, act, grad_scale, (N, Ho // (pool or 1), Wo // (pool or 1), Cout))
    if w.device != dy.device:
        raise ValueError(f"conv2d_dgrad: w on {w.device}, dy on {dy.device}")
    dy = dy.contiguous()
    z = z.contiguous() if code != 0 else None
    G, Cout_g = groups, Cout // groups
    sh, sw = stride
    dx = torch.empty((N, H, W, Cin), device=dy.device, dtype=dy.dtype)
    flags = dict(ACT=code, HAS_SCALE=grad_scale is not None)
    if bn_grad is not None:
        if G != 1:
            raise ValueError(f"conv2d_dgrad: a batch norm's gradient sums need one group, got {G}")
        flags.update(BN_GRAD=True, BN_ACT=bn_grad[5])  # the autotune key's epilogue
    if Cin_g == 1 and G > 1:  # depthwise: direct kernel over channels, one launch per phase
        phases = dgrad_phases(N, H, W, KH, KW, stride, padding, dilation)
        wk = depthwise_weight(w, dy.dtype)  # [KH*KW, Cout]: the optimizer's copy, or packed now
        bm, bn, meta = dw_tiles(max(p[0] for p in phases), Cin)
        for ph_args in phases:
            grid = (triton.cdiv(ph_args[0], bm), triton.cdiv(Cin, bn))
            launch(_dwconv_dgrad_kernel, grid, dy, z, grad_scale, wk, dx,
                   ph_args[0], H, W, Cin, Ho, Wo, Cout, Cout // Cin, KW, sh, sw, *ph_args[1:], float(slope),
                   **flags, BLOCK_M=bm, BLOCK_N=bn, **meta)
        return dx
    wt = dgrad_weight(w, dy.dtype)  # [KH*KW*Cout, Cin_g]: the optimizer's copy, or packed now
    kp = pool or 1  # a fused pool splits every stride phase into kp*kp pool phases
    m_max = N * triton.cdiv(triton.cdiv(H, sh), kp) * triton.cdiv(triton.cdiv(W, sw), kp)  # the largest phase
    taps = triton.cdiv(KH, sh) * triton.cdiv(KW, sw)  # taps of the largest phase (at most)
    ya, xa = operand_align(Cout, Cout_g, dy.dtype), operand_align(Cin, Cin_g, dy.dtype)
    big = idx64(dy, dx, *(t for t in (z, pool_idx) if t is not None))

    def run(cfg: Config):
        """All phases with tile config `cfg`, one launch; it writes every dx pixel afresh. Returns the batch
        norm's sums it made (bn_grad), else None."""
        tma = use_tma(wt, xa, cfg.block_n)
        wop = weight_descriptor(wt, cfg.block_k, cfg.block_n) if tma else wt
        grid = (triton.cdiv(m_max, cfg.block_m), triton.cdiv(Cin_g, cfg.block_n), G * sh * sw * kp * kp)
        # bn_grad: a partial row per (M tile, phase) program row, folded and summed by the last arrivals
        bn_args, bn_flags, sums = bn_grad_args(bn_grad, dx, grid[0] * grid[2], cfg.block_n)
        # more than 32 fp32 of the tile per thread: the bn epilogue works it in halves (registers)
        bn_flags["BN_HALVES"] = (bn_grad is not None and cfg.block_m >= 32
                                 and cfg.block_m * cfg.block_n > 32 * 32 * (cfg.num_warps or 4))
        launch(_conv_dgrad_kernel, grid, dy, z, grad_scale, wop, dx, pool_idx, *bn_args[:12],
               N, H, W, Ho, Wo, Cout // ya, Cout_g // ya, Cin // xa, Cin_g // xa, padding[0], padding[1],
               dilation[0], dilation[1], float(slope), *bn_args[12:],
               KH=KH, KW=KW, SH=sh, SW=sw, CHUNKS=triton.cdiv(Cout_g, cfg.block_k), ALIGN=ya, NALIGN=xa,
               EVEN_K=Cout_g % cfg.block_k == 0, EVEN_N=Cin_g % cfg.block_n == 0, W_TMA=tma,
               ACT=code, HAS_SCALE=grad_scale is not None, **bn_flags, PRECISION=precision(allow_tf32),
               UPCAST=upcast(dy.dtype), IDX64=big, POOL=pool,  # bnx is dx's shape: `big` covers it
               BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **cfg.meta())
        return sums

    default = geometry.gemm_tiles(m_max, Cin_g, Cout_g, taps)  # through the module: tests patch it
    shape = dict(M=m_max, N=Cin_g, K=taps * Cout_g, phases=sh * sw * kp * kp,
                 **conv_key(KH, KW, stride, padding, dilation, G), epilogue=epilogue_key(flags),
                 tf32=bool(allow_tf32), **({"pool": pool} if pool else {}))
    cfg = autotune.pick(
        "conv2d_dgrad", shape, dtype=dy.dtype, device=dy.device, default=default, run=run,
        candidates=lambda: conv_candidates(m_max, Cin_g, Cout_g, taps, dy.dtype, smem_limit(dy.device), default))
    sums = run(cfg)
    return dx if bn_grad is None else (dx, sums)


__all__ = ["conv2d_dgrad"]
