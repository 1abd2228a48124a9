"""Convolution backward (NHWC): dgrad by stride phase, split-K wgrad, depthwise variants.

Layouts as in engine.kernels.conv.forward; the shared geometry (stride phases,
split plans, tiles) is in engine.kernels.conv.geometry.

dgrad (dx) is an implicit GEMM over dy, split by stride phase: dx pixels with
the same (hi mod sh, wi mod sw) are hit by the same subset of taps, so each
phase is a dense GEMM over only those taps (no zero-insertion of dy, no masking
of taps that can never contribute). Stride 1 is the single-phase case: a conv
with flipped, transposed weights.

wgrad (dw) is an implicit GEMM [K, P] x [P, Cout/G] with P = N*Ho*Wo cut into S
fixed splits that write fp32 partials; common.sum_partials adds them in a fixed
order, so results are bit-identical run to run (no atomics). The bias gradient
(a column sum of dz) comes from the same pass.

Both load dz = act_grad(dy, z) (* scale) while loading dy (ACT / HAS_SCALE
constexprs), so the activation backward costs no extra pass unless a residual
needs dz materialised as its own gradient (act_backward).

Depthwise convolutions (Cin/G == 1) get direct, non-dot kernels: their
per-group GEMMs would be far below tl.dot's 16x16 minimum.

Public API: conv2d_dgrad, conv2d_wgrad, act_backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import engine.kernels.conv.geometry as geometry
from engine import device as _device
from engine.kernels import autotune
from engine.kernels.activations import act_grad
from engine.kernels.common import check_activation, dot, next_pow2, precision, sum_partials, upcast
from engine.kernels.conv.geometry import (check_grad_inputs, conv_geometry, conv_key, dgrad_phases, dw_tiles,
                                          split_plan)
from engine.kernels.launch import launch
from engine.kernels.tune_config import Config, epilogue_key, gemm_candidates, smem_limit, split_variants


@triton.jit
def _load_dz(dy_ptr, z_ptr, scale_ptr, off, mask, ch, mask_ch, slope,
             ACT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Load dy at `off` and turn it into the GEMM operand dz = act'(z) * dy (* scale[ch]).

    `ch` ([BLOCK]) are output channels along axis 1 of the tile. Returns fp32.
    Masked lanes give 0 since every act_grad is linear in dy.
    """
    g = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)  # [R, C] upstream grad
    if ACT != 0:
        z = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)  # [R, C] pre-activation
        g = act_grad(g, z, ACT, slope)
    if HAS_SCALE:
        # z = acc*scale + ..., so d acc = dz * scale
        g = g * tl.load(scale_ptr + ch, mask=mask_ch, other=0.0)[None, :]
    return g


@triton.jit
def _conv_dgrad_kernel(
    dy_ptr, z_ptr, scale_ptr, w_ptr, dx_ptr,
    Mq, H, W, Cin, Ho, Wo, Cout, Cin_g, Cout_g, KW, stride_h, stride_w,
    ra, rb, Hq, Wq, r0, nr, step_r, c_r, dstep_h, s0, ns, step_s, c_s, dstep_w, slope,
    ACT: tl.constexpr, HAS_SCALE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx for one stride phase (hi % sh == ra, wi % sw == rb). Grid: (Mq tiles, Cin/G tiles, G).

    Taps hitting this phase are r = r0 + jr*step_r (jr < nr), s likewise, and for
    dx pixel hi = qh*sh + ra the dy row they read is ho = qh + c_r - jr*dstep_h:
    no division, no dead taps.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] dx pixel within this phase
    mask_m = offs_m < Mq
    qw = offs_m % Wq  # [BLOCK_M]
    qh = (offs_m // Wq) % Hq  # [BLOCK_M]
    n = offs_m // (Wq * Hq)  # [BLOCK_M]
    dy_img = n * (Ho * Wo * Cout) + g * Cout_g  # [BLOCK_M]
    offs_ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] input channel within group
    mask_ci = offs_ci < Cin_g
    K = nr * ns * Cout_g
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N] fp32 accumulator
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K] reduction index (jr, js, co)
        mask_k = offs_k < K
        co = offs_k % Cout_g  # [BLOCK_K]
        jr = offs_k // (Cout_g * ns)  # [BLOCK_K]
        js = (offs_k // Cout_g) % ns  # [BLOCK_K]
        ho = qh[:, None] + (c_r - jr * dstep_h)[None, :]  # [BLOCK_M, BLOCK_K]
        wo = qw[:, None] + (c_s - js * dstep_w)[None, :]  # [BLOCK_M, BLOCK_K]
        a_mask = mask_m[:, None] & mask_k[None, :] & (ho >= 0) & (ho < Ho) & (wo >= 0) & (wo < Wo)
        a_off = dy_img[:, None] + (ho * Wo + wo) * Cout + co[None, :]  # [BLOCK_M, BLOCK_K]
        a = _load_dz(dy_ptr, z_ptr, scale_ptr, a_off, a_mask, g * Cout_g + co, mask_k, slope,
                     ACT, HAS_SCALE)  # [BLOCK_M, BLOCK_K] fp32 dz tile
        tap = (r0 + jr * step_r) * KW + (s0 + js * step_s)  # [BLOCK_K] flattened (r, s)
        b = tl.load(w_ptr + ((tap * Cout + g * Cout_g + co) * Cin_g)[:, None] + offs_ci[None, :],
                    mask=mask_k[:, None] & mask_ci[None, :], other=0.0)  # [BLOCK_K, BLOCK_N] w^T tile
        acc = dot(a.to(b.dtype), b, acc, PRECISION, UPCAST)
    hi = qh * stride_h + ra  # [BLOCK_M]
    wi = qw * stride_w + rb  # [BLOCK_M]
    dx_off = (n * (H * W * Cin) + (hi * W + wi) * Cin + g * Cin_g)[:, None] + offs_ci[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_ci[None, :])


@triton.jit
def _conv_wgrad_kernel(
    x_ptr, dy_ptr, z_ptr, scale_ptr, part_ptr, bpart_ptr,
    P, P_PER_SPLIT, H, W, Cin, Ho, Wo, Cout, Cin_g, Cout_g, K_g, KW, N_TILES,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, slope,
    ACT: tl.constexpr, HAS_SCALE: tl.constexpr, NEED_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dw partial for one P-split: part[split, k, co] = sum_p x[p, k] * dz[p, co].

    Grid: (K tiles * Cout/G tiles, S, G). Also writes bias partials (column sums
    of dz) from the K-tile-0 programs.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2)
    pid_k = pid // N_TILES
    pid_n = pid % N_TILES
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K] weight row (r, s, ci)
    mask_k = offs_k < K_g
    ci = offs_k % Cin_g  # [BLOCK_K]
    r = (offs_k // Cin_g) // KW  # [BLOCK_K]
    s = (offs_k // Cin_g) % KW  # [BLOCK_K]
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output channel within group
    mask_c = offs_cn < Cout_g
    offs_c = g * Cout_g + offs_cn  # [BLOCK_N] global output channel
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # [BLOCK_K, BLOCK_N] fp32 dw accumulator
    bacc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # [BLOCK_N] fp32 bias-grad accumulator
    p_lo = split * P_PER_SPLIT
    p_hi = tl.minimum(P, p_lo + P_PER_SPLIT)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)  # [BLOCK_P] output pixel
        mask_p = offs_p < p_hi
        wo = offs_p % Wo  # [BLOCK_P]
        ho = (offs_p // Wo) % Ho  # [BLOCK_P]
        n = offs_p // (Wo * Ho)  # [BLOCK_P]
        hi = (r * dil_h)[:, None] + (ho * stride_h - pad_h)[None, :]  # [BLOCK_K, BLOCK_P]
        wi = (s * dil_w)[:, None] + (wo * stride_w - pad_w)[None, :]  # [BLOCK_K, BLOCK_P]
        a_mask = mask_k[:, None] & mask_p[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        a = tl.load(x_ptr + (n * (H * W * Cin))[None, :] + (hi * W + wi) * Cin + (g * Cin_g + ci)[:, None],
                    mask=a_mask, other=0.0)  # [BLOCK_K, BLOCK_P] gathered x^T tile
        b_off = offs_p[:, None] * Cout + offs_c[None, :]  # [BLOCK_P, BLOCK_N] dy is [P, Cout]
        b = _load_dz(dy_ptr, z_ptr, scale_ptr, b_off, mask_p[:, None] & mask_c[None, :], offs_c, mask_c,
                     slope, ACT, HAS_SCALE)  # [BLOCK_P, BLOCK_N] fp32 dz tile
        if NEED_BIAS:
            bacc += tl.sum(b, axis=0)
        acc = dot(a, b.to(a.dtype), acc, PRECISION, UPCAST)
    part_off = (split * K_g + offs_k)[:, None] * Cout + offs_c[None, :]  # [BLOCK_K, BLOCK_N]
    tl.store(part_ptr + part_off, acc, mask=mask_k[:, None] & mask_c[None, :])
    if NEED_BIAS:
        if pid_k == 0:  # every K tile computed the same column sums; one writes them
            tl.store(bpart_ptr + split * Cout + offs_c, bacc, mask=mask_c)


@triton.jit
def _dwconv_dgrad_kernel(
    dy_ptr, z_ptr, scale_ptr, w_ptr, dx_ptr,
    Mq, H, W, Cin, Ho, Wo, Cout, MULT, KW, stride_h, stride_w,
    ra, rb, Hq, Wq, r0, nr, step_r, c_r, dstep_h, s0, ns, step_s, c_s, dstep_w, slope,
    ACT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Depthwise dx for one stride phase, direct FMAs. Grid: (Mq tiles, Cin tiles).

    Input channel ci gets dz from output channels ci*MULT .. ci*MULT + MULT-1.
    Phase arguments as in _conv_dgrad_kernel; w is [KH*KW, Cout].
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
                dz = _load_dz(dy_ptr, z_ptr, scale_ptr, row[:, None] + co[None, :],
                              ok[:, None] & mask_ci[None, :], co, mask_ci, slope,
                              ACT, HAS_SCALE)  # [BLOCK_M, BLOCK_N] fp32
                wv = tl.load(w_ptr + tap * Cout + co, mask=mask_ci, other=0.0)  # [BLOCK_N]
                acc += dz * wv.to(tl.float32)[None, :]
    hi = qh * stride_h + ra  # [BLOCK_M]
    wi = qw * stride_w + rb  # [BLOCK_M]
    dx_off = (n * (H * W * Cin) + (hi * W + wi) * Cin)[:, None] + offs_ci[None, :]  # [BLOCK_M, BLOCK_N]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_ci[None, :])


@triton.jit
def _dwconv_wgrad_kernel(
    x_ptr, dy_ptr, z_ptr, scale_ptr, part_ptr, bpart_ptr,
    P, P_PER_SPLIT, H, W, Cin, Ho, Wo, Cout, MULT, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, slope,
    ACT: tl.constexpr, HAS_SCALE: tl.constexpr, NEED_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Depthwise dw partials: part[split, tap, co] = sum_p x[p + tap, co // MULT] * dz[p, co].

    Grid: (KH*KW taps, Cout tiles, S). Products accumulate elementwise in a 2-D
    tile and are reduced once at the end (fixed order). Tap-0 programs also write
    the bias partials.
    """
    tap = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    r = tap // KW
    s = tap % KW
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output channel
    mask_c = offs_c < Cout
    ci = offs_c // MULT  # [BLOCK_N] its input channel
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)  # [BLOCK_P, BLOCK_N] fp32 products
    bacc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)  # [BLOCK_P, BLOCK_N] fp32 dz (bias grad)
    p_lo = split * P_PER_SPLIT
    p_hi = tl.minimum(P, p_lo + P_PER_SPLIT)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)  # [BLOCK_P] output pixel
        mask_p = offs_p < p_hi
        wo = offs_p % Wo  # [BLOCK_P]
        ho = (offs_p // Wo) % Ho  # [BLOCK_P]
        n = offs_p // (Wo * Ho)  # [BLOCK_P]
        hi = ho * stride_h - pad_h + r * dil_h  # [BLOCK_P]
        wi = wo * stride_w - pad_w + s * dil_w  # [BLOCK_P]
        ok = mask_p & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)  # [BLOCK_P]
        xv = tl.load(x_ptr + (n * (H * W * Cin) + (hi * W + wi) * Cin)[:, None] + ci[None, :],
                     mask=ok[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_P, BLOCK_N] x taps
        dz = _load_dz(dy_ptr, z_ptr, scale_ptr, offs_p[:, None] * Cout + offs_c[None, :],
                      mask_p[:, None] & mask_c[None, :], offs_c, mask_c, slope,
                      ACT, HAS_SCALE)  # [BLOCK_P, BLOCK_N] fp32
        acc += xv.to(tl.float32) * dz
        if NEED_BIAS:
            bacc += dz
    tl.store(part_ptr + (split * tl.num_programs(0) + tap) * Cout + offs_c, tl.sum(acc, axis=0), mask=mask_c)
    if NEED_BIAS:
        if tap == 0:
            tl.store(bpart_ptr + split * Cout + offs_c, tl.sum(bacc, axis=0), mask=mask_c)


@triton.jit
def _act_grad_kernel(dy_ptr, z_ptr, dz_ptr, numel, slope, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """dz = act_grad(dy, z), elementwise over contiguous tensors."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    tl.store(dz_ptr + offs, act_grad(dy, z, ACT, slope).to(dz_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- #
# Host launchers
# --------------------------------------------------------------------------- #
def conv2d_dgrad(dy, w, x_shape, *, stride, padding, dilation, groups, allow_tf32=False,
                 z=None, act="none", slope=0.01, grad_scale=None) -> torch.Tensor:
    """dx [N,H,W,Cin] (dy's dtype) of a conv with weights w, from dy [N,Ho,Wo,Cout].

    With act != "none", dy is the gradient of act(z) and the kernel uses
    act_grad(dy, z); grad_scale [Cout] (the forward's folded-BN scale) multiplies it.
    """
    stride, padding, dilation, Ho, Wo = conv_geometry(x_shape, w.shape, stride, padding, dilation, groups)
    N, H, W, Cin = x_shape
    Cout, Cin_g, KH, KW = w.shape
    code = check_grad_inputs(dy, z, act, grad_scale, (N, Ho, Wo, Cout))
    if w.device != dy.device:
        raise ValueError(f"conv2d_dgrad: w on {w.device}, dy on {dy.device}")
    dy = dy.contiguous()
    z = z.contiguous() if code != 0 else None
    G, Cout_g = groups, Cout // groups
    sh, sw = stride
    dx = torch.empty((N, H, W, Cin), device=dy.device, dtype=dy.dtype)
    phases = dgrad_phases(N, H, W, KH, KW, stride, padding, dilation)
    flags = dict(ACT=code, HAS_SCALE=grad_scale is not None)
    step_r, step_s = phases[0][7], phases[0][12]
    m_max = max(p[0] for p in phases)
    if Cin_g == 1 and G > 1:  # depthwise: direct kernel over channels
        wk = w.detach().to(dy.dtype).permute(2, 3, 0, 1).reshape(KH * KW, Cout).contiguous()  # [KH*KW, Cout]
        bm, bn, meta = dw_tiles(m_max, Cin)
        for ph_args in phases:
            grid = (triton.cdiv(ph_args[0], bm), triton.cdiv(Cin, bn))
            launch(_dwconv_dgrad_kernel, grid, dy, z, grad_scale, wk, dx,
                   ph_args[0], H, W, Cin, Ho, Wo, Cout, Cout // Cin, KW, sh, sw, *ph_args[1:], float(slope),
                   **flags, BLOCK_M=bm, BLOCK_N=bn, **meta)
        return dx
    wt = w.detach().to(dy.dtype).permute(2, 3, 0, 1).contiguous()  # [KH, KW, Cout, Cin_g]
    k_max = triton.cdiv(KH, step_r) * triton.cdiv(KW, step_s) * Cout_g

    def run(cfg: Config) -> None:
        """Every phase with tile config `cfg` (one config for all phases); each writes its dx pixels afresh."""
        for ph_args in phases:
            grid = (triton.cdiv(ph_args[0], cfg.block_m), triton.cdiv(Cin_g, cfg.block_n), G)
            launch(_conv_dgrad_kernel, grid, dy, z, grad_scale, wt, dx,
                   ph_args[0], H, W, Cin, Ho, Wo, Cout, Cin_g, Cout_g, KW, sh, sw, *ph_args[1:], float(slope),
                   **flags, PRECISION=precision(allow_tf32), UPCAST=upcast(dy.dtype),
                   BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **cfg.meta())

    bm, bn, bk, meta = geometry.gemm_tiles(m_max, Cin_g, k_max)  # through the module: tests patch it
    if meta and bm >= 128:
        # dgrad carries more live registers than the forward (the act-grad operand
        # loads): with Triton 3.6, 128-row tiles at 4 warps, or 128x128 at 3
        # stages, spilled 12-24 B on sm_80; 8 warps and 2 stages for 128x128 do not
        meta = {**meta, "num_warps": 8, "num_stages": 2 if bm * bn >= 128 * 128 else meta["num_stages"]}
    default = Config(bm, bn, bk, **meta)
    shape = dict(M=m_max, N=Cin_g, K=k_max, phases=len(phases), **conv_key(KH, KW, stride, padding, dilation, G),
                 epilogue=epilogue_key(flags), tf32=bool(allow_tf32))
    cfg = autotune.pick(
        "conv2d_dgrad", shape, dtype=dy.dtype, device=dy.device, default=default, run=run,
        candidates=lambda: gemm_candidates(m_max, Cin_g, k_max, dy.dtype, smem_limit(dy.device),
                                                    default))
    run(cfg)
    return dx


def _sum_splits(part: torch.Tensor) -> torch.Tensor:
    """Sum fp32 partials [S, ...] over S in a fixed order -> [...]."""
    S, L = part.shape[0], part[0].numel()
    block = next_pow2(L, 16, 1 << 16) if _device.INTERPRETED else 1024
    return sum_partials(part.view(S, L), block=block).view(part.shape[1:])


def conv2d_wgrad(x, dy, w_shape, *, stride, padding, dilation, groups, need_bias=False, allow_tf32=False,
                 z=None, act="none", slope=0.01, grad_scale=None, splits=None):
    """(dw fp32 [Cout,Cin/g,kh,kw], dbias fp32 [Cout] or None) from x [N,H,W,Cin] and dy [N,Ho,Wo,Cout].

    The N*Ho*Wo reduction is cut into S splits (`splits` overrides the automatic
    choice) whose fp32 partials are summed in a fixed order: deterministic.
    act/z/grad_scale as in conv2d_dgrad.
    """
    check_activation(x, "conv2d: x")
    if x.dim() != 4 or not x.is_contiguous() or x.device != dy.device:
        raise ValueError("conv2d_wgrad: x must be a contiguous NHWC tensor on dy's device")
    stride, padding, dilation, Ho, Wo = conv_geometry(x.shape, w_shape, stride, padding, dilation, groups)
    N, H, W, Cin = x.shape
    Cout, Cin_g, KH, KW = w_shape
    code = check_grad_inputs(dy, z, act, grad_scale, (N, Ho, Wo, Cout))
    dy = dy.contiguous()
    if dy.dtype != x.dtype:
        raise ValueError(f"conv2d_wgrad: x is {x.dtype} but dy is {dy.dtype}")
    z = z.contiguous() if code != 0 else None
    G, Cout_g, K_g, P = groups, Cout // groups, KH * KW * Cin_g, N * Ho * Wo
    flags = dict(ACT=code, HAS_SCALE=grad_scale is not None, NEED_BIAS=need_bias)
    geo = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], float(slope))

    def finish(part: torch.Tensor, bpart):
        """(dw [Cout, Cin_g, KH, KW], dbias [Cout] or None) from the [S, K_g, Cout] and [S, Cout] partials."""
        # [K_g, Cout] rows (r, s, ci) -> PyTorch's [Cout, Cin_g, KH, KW]
        dw = _sum_splits(part).view(KH, KW, Cin_g, Cout).permute(3, 2, 0, 1).contiguous()
        return dw, (_sum_splits(bpart) if need_bias else None)

    def partials(S: int):
        part = torch.empty((S, K_g, Cout), device=x.device, dtype=torch.float32)  # [S, K_g, Cout] partials
        bpart = torch.empty((S, Cout), device=x.device, dtype=torch.float32) if need_bias else None  # [S, Cout]
        return part, bpart

    if Cin_g == 1 and G > 1:  # depthwise: direct kernel, one program per (tap, channel tile, split)
        bp, bn, meta = dw_tiles(P, Cout)
        c_tiles = triton.cdiv(Cout, bn)
        S, per_split = split_plan(triton.cdiv(P, bp), KH * KW * c_tiles, splits)
        part, bpart = partials(S)
        launch(_dwconv_wgrad_kernel, (KH * KW, c_tiles, S), x, dy, z, grad_scale, part, bpart, P, per_split * bp,
               H, W, Cin, Ho, Wo, Cout, Cout // Cin, KW, *geo, **flags, BLOCK_P=bp, BLOCK_N=bn, **meta)
        return finish(part, bpart)

    # GEMM view [K_g, P] x [P, Cout_g]: config block_m -> BLOCK_K (weight rows), block_n -> BLOCK_N
    # (output channels), block_k -> BLOCK_P (the reduction over output pixels), split -> S
    def plan(cfg: Config) -> tuple[int, int, int, int]:
        """(Cout tiles, K tiles * Cout tiles, S, P-chunks per split) for a config."""
        n_tiles = triton.cdiv(Cout_g, cfg.block_n)
        tiles = triton.cdiv(K_g, cfg.block_m) * n_tiles
        S, per_split = split_plan(triton.cdiv(P, cfg.block_k), tiles * G, splits if splits is not None else cfg.split)
        return n_tiles, tiles, S, per_split

    def run(cfg: Config):
        """dw, dbias with config `cfg`; partials are allocated per config (S follows it) and written, not added."""
        n_tiles, tiles, S, per_split = plan(cfg)
        part, bpart = partials(S)
        launch(_conv_wgrad_kernel, (tiles, S, G), x, dy, z, grad_scale, part, bpart, P, per_split * cfg.block_k,
               H, W, Cin, Ho, Wo, Cout, Cin_g, Cout_g, K_g, KW, n_tiles, *geo, **flags,
               PRECISION=precision(allow_tf32), UPCAST=upcast(x.dtype),
               BLOCK_K=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_P=cfg.block_k, **cfg.meta())
        return finish(part, bpart)

    if _device.INTERPRETED:
        # long reduction chunks: each loop trip costs a round of numpy calls
        # (BLOCK_P 4096 ran 1.5-3x faster than 512 on digits' convs)
        bk, bn, bp, meta = next_pow2(K_g, 16, 256), next_pow2(Cout_g, 16, 256), next_pow2(P, 16, 4096), {}
        while bp > 512 and bp * max(bk, bn) > (1 << 20):  # Triton's largest tile
            bp //= 2
    else:
        bk, bn, bp, meta = 64, next_pow2(Cout_g, 16, 64), 32, {"num_warps": 4, "num_stages": 3}
    default = Config(bk, bn, bp, **meta)

    def candidates() -> list[Config]:
        tiles = gemm_candidates(K_g, Cout_g, P, x.dtype, smem_limit(x.device), default)
        # and the default tiles with half / double the heuristic's split count
        S = plan(default)[2]
        return tiles + [default.with_split(s) for s in split_variants(S, triton.cdiv(P, bp)) if s != S]

    shape = dict(M=K_g, N=Cout_g, K=P, **conv_key(KH, KW, stride, padding, dilation, G),
                 epilogue=epilogue_key(flags), tf32=bool(allow_tf32))
    cfg = autotune.pick("conv2d_wgrad", shape, dtype=x.dtype, device=x.device, default=default, run=run,
                        candidates=candidates, tunable=splits is None)  # an explicit split count is not tuned
    return run(cfg)


def act_backward(dy: torch.Tensor, z: torch.Tensor, code: int, slope: float) -> torch.Tensor:
    """dz = act_grad(dy, z) materialised (contiguous, dy's dtype)."""
    dz = torch.empty_like(dy)
    numel = dy.numel()
    block = next_pow2(numel, 16, 1 << 16) if _device.INTERPRETED else 1024
    launch(_act_grad_kernel, (triton.cdiv(numel, block),), dy, z, dz, numel, float(slope), ACT=code, BLOCK=block)
    return dz
