"""Depthwise convolution wgrad (Cin/G == 1): a direct kernel, no GEMM.

A depthwise conv's per-group GEMM would be [KH*KW, P] x [P, Cout/G], far below
tl.dot's 16x16 minimum, so each program owns one tap and a tile of output channels
and accumulates x * dz products elementwise over its split of the P = N*Ho*Wo output
pixels, reducing them once at the end (fixed order: deterministic). The split partials
are summed by engine.kernels.conv.wgrad, which sizes the splits and owns the outputs.

Public API: depthwise_wgrad_partials.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.conv.mainloop import load_dz
from engine.kernels.launch import launch


@triton.jit
def _dwconv_wgrad_kernel(
    x_ptr, dy_ptr, z_ptr, scale_ptr, part_ptr, bpart_ptr,
    P, P_PER_SPLIT, H, W, Cin, Ho, Wo, Cout, MULT, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, slope,
    ACT: tl.constexpr, HAS_SCALE: tl.constexpr, NEED_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Depthwise dw partials in PyTorch's layout: part[split, co, tap] = sum_p x[p + tap, co // MULT] * dz[p, co].

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
        dz = load_dz(dy_ptr, z_ptr, scale_ptr, offs_p[:, None] * Cout + offs_c[None, :],
                     mask_p[:, None] & mask_c[None, :], offs_c, mask_c, slope,
                     ACT, HAS_SCALE)  # [BLOCK_P, BLOCK_N] fp32
        acc += xv.to(tl.float32) * dz
        if NEED_BIAS:
            bacc += dz
    tl.store(part_ptr + (split * Cout + offs_c) * tl.num_programs(0) + tap, tl.sum(acc, axis=0), mask=mask_c)
    if NEED_BIAS:
        if tap == 0:
            tl.store(bpart_ptr + split * Cout + offs_c, tl.sum(bacc, axis=0), mask=mask_c)


def depthwise_wgrad_partials(x: torch.Tensor, dy: torch.Tensor, z, grad_scale, part: torch.Tensor, bpart,
                             kernel_hw, geo, pixels_per_split: int, flags: dict, **tiles) -> None:
    """Write the depthwise dw partials part [S, Cout * KH * KW] (PyTorch's layout per split) and,
    with flags["NEED_BIAS"], the bias partials bpart [S, Cout], from x [N, H, W, Cin] and
    dy [N, Ho, Wo, Cout]; geo = (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, slope);
    tiles: BLOCK_P, BLOCK_N and launch meta (engine.kernels.conv.geometry.dw_tiles)."""
    N, H, W, Cin = x.shape
    _, Ho, Wo, Cout = dy.shape
    KH, KW = kernel_hw
    S = part.shape[0]
    grid = (KH * KW, triton.cdiv(Cout, tiles["BLOCK_N"]), S)
    launch(_dwconv_wgrad_kernel, grid, x, dy, z, grad_scale, part, bpart, N * Ho * Wo, pixels_per_split,
           H, W, Cin, Ho, Wo, Cout, Cout // Cin, KW, *geo, **flags, **tiles)


__all__ = ["depthwise_wgrad_partials"]
