"""Convolution geometry shared by the forward and backward launchers: argument
checks, output size, the stride phases of dgrad, split-K plans, tile choices
and autotune keys.

`gemm_tiles` is the one place the implicit-GEMM tiles are chosen; launchers call
it through this module (`geometry.gemm_tiles(...)`), so tests can monkeypatch
it here to force small tiles.
"""
from __future__ import annotations

import math

import torch
import triton

from engine import device as _device
from engine.kernels.activations import act_code
from engine.kernels.common import check_activation, next_pow2, pair
from engine.kernels.tune_config import Config, conv_heuristic, wgrad_heuristic


def out_hw(H, W, kh, kw, stride, padding, dilation):
    """(Ho, Wo) of a conv; ValueError when the output would be empty."""
    ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv2d: output would be {ho}x{wo} for input {H}x{W}, kernel {kh}x{kw}, "
                         f"stride {stride}, padding {padding}, dilation {dilation}")
    return ho, wo


def conv_geometry(x_shape, w_shape, stride, padding, dilation, groups):
    """Validate conv hyper-parameters; return (stride, padding, dilation, Ho, Wo)."""
    stride = pair(stride, "conv2d: stride")
    padding, dilation = pair(padding, "conv2d: padding"), pair(dilation, "conv2d: dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"conv2d: need stride >= 1, dilation >= 1, padding >= 0; got {stride}, {dilation}, {padding}")
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise ValueError("conv2d: x must be [N,H,W,Cin] and w [Cout,Cin/groups,kh,kw]; "
                         f"got {tuple(x_shape)}, {tuple(w_shape)}")
    N, H, W, Cin = x_shape
    Cout, Cin_g, kh, kw = w_shape
    if not isinstance(groups, int) or groups < 1 or Cin % groups or Cout % groups or Cin_g * groups != Cin:
        raise ValueError(f"conv2d: x has {Cin} channels, w is {tuple(w_shape)}, groups={groups}: "
                         "need Cin == w.shape[1]*groups and Cout divisible by groups")
    return (stride, padding, dilation) + out_hw(H, W, kh, kw, stride, padding, dilation)


def check_vec(v, C, device, name):
    """An optional per-channel float [C] vector (bias, scale, shift) on `device`."""
    if v is None:
        return
    if v.shape != (C,) or not v.is_floating_point() or v.device != device or not v.is_contiguous():
        raise ValueError(f"conv2d: {name} must be a contiguous float [{C}] tensor on {device}, "
                         f"got {tuple(v.shape)} {v.dtype} on {v.device}")


def flat_grad_out(t, numel: int, name: str):
    """`t` (a parameter's slot in the fused optimizer's flat fp32 gradient buffer) viewed flat, or None."""
    if t is None:
        return None
    if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != numel:
        raise ValueError(f"conv2d_wgrad: {name} must be a contiguous fp32 tensor of {numel} elements, "
                         f"got {t.dtype} {tuple(t.shape)}")
    return t.view(numel)


def check_grad_inputs(dy, z, act, grad_scale, shape):
    """The incoming gradient dy (and z, grad_scale) of a conv backward; returns act's code."""
    check_activation(dy, "conv2d: dy")
    if tuple(dy.shape) != tuple(shape):
        raise ValueError(f"conv2d backward: dy has shape {tuple(dy.shape)}, expected {tuple(shape)}")
    code = act_code(act)
    if code != 0 and (z is None or tuple(z.shape) != tuple(shape)):
        raise ValueError(f"conv2d backward: act={act!r} needs the pre-activation z of shape {tuple(shape)}")
    check_vec(grad_scale, shape[3], dy.device, "grad_scale")
    return code


def dy_extent(extent, Ho, Wo, pool, act, grad_scale, depthwise) -> tuple[int, int]:
    """The output rows and columns a conv backward's dy holds: (Ho, Wo), or `extent` = (Hd, Wd) <= (Ho, Wo)
    when dy stops there and the gradient past it is zero (the rows a floor-mode max pool after the
    conv dropped: its full-resolution gradient is stored without them)."""
    if extent is None:
        return Ho, Wo
    Hd, Wd = (int(e) for e in extent)
    if not (0 < Hd <= Ho and 0 < Wd <= Wo):
        raise ValueError(f"conv2d backward: dy extent {Hd}x{Wd} must be within the output's {Ho}x{Wo}")
    if pool or act_code(act) != 0 or grad_scale is not None or depthwise:
        raise ValueError("conv2d backward: a cropped dy takes no pool, activation, scale or depthwise conv")
    return Hd, Wd


def check_pool_grad(dy, idx, pool, act, grad_scale, shape, depthwise) -> None:
    """The pooled gradient dy and argmax idx of a conv with a fused pool x pool max pool (dgrad, wgrad)."""
    if not isinstance(pool, int) or pool < 2 or pool & (pool - 1) or depthwise:
        raise ValueError(f"conv2d backward: pool={pool!r} must be a power of two >= 2, and not on a depthwise conv")
    if idx is None or idx.dtype != torch.uint8 or tuple(idx.shape) != tuple(shape) or not idx.is_contiguous():
        raise ValueError(f"conv2d backward: a fused pool needs its contiguous uint8 argmax of shape {tuple(shape)}")
    if act_code(act) != 0 or grad_scale is not None:
        raise ValueError("conv2d backward: no activation or scale between a conv and its fused pool has a backward")
    if idx.device != dy.device:
        raise ValueError(f"conv2d backward: the pool's argmax is on {idx.device}, dy on {dy.device}")


def gemm_tiles(M: int, N: int, C: int, taps: int) -> Config:
    """The tile config of an implicit-GEMM conv (forward or dgrad): [M pixels, N channels]
    outputs, a reduction over `taps` kernel taps of `C` channels each (BLOCK_K = the
    channel chunk)."""
    if _device.INTERPRETED:
        # Interpreter cost is per tile op (a numpy call each) plus per element, so:
        # as many rows per program as fit (measured on a 64x8x8 3x3 conv, BLOCK_M
        # 4096 ran 1.5-2x faster than 1024) and one chunk per tap
        bn = next_pow2(N, 16, 256)
        bk = next_pow2(C, 16, 256)
        bm = next_pow2(M, 16, 8192)
        while bm > 256 and bm * max(bk, bn) > (1 << 19):
            bm //= 2
        return Config(bm, bn, bk)
    return conv_heuristic(M, N, C, taps)


def check_channels(x, channels, groups) -> int:
    """The real channel count of an x that carries zero channels beyond it (conv `channels=`)."""
    if groups != 1 or not isinstance(channels, int) or not 1 <= channels <= x.shape[3]:
        raise ValueError(f"conv2d: channels={channels!r} must be an int in [1, {x.shape[3]}] (x's channels) "
                         f"and needs groups=1 (got {groups})")
    return channels


def dw_tiles(M: int, C: int):
    """(BLOCK_M, BLOCK_N, meta) for the direct depthwise kernels."""
    if _device.INTERPRETED:
        return next_pow2(M, 16, 1024), next_pow2(C, 16, 256), {}
    return 64, next_pow2(C, 16, 64), {"num_warps": 4}


def conv_key(KH, KW, stride, padding, dilation, groups) -> dict:
    """The conv hyper-parameters of an autotune key (besides the GEMM sizes and flags)."""
    return dict(kernel=f"{KH}x{KW}", stride=f"{stride[0]}x{stride[1]}", pad=f"{padding[0]}x{padding[1]}",
                dilation=f"{dilation[0]}x{dilation[1]}", groups=groups)


def dgrad_phases(N, H, W, KH, KW, stride, padding, dilation):
    """Stride phases of dx: one tuple of kernel arguments per (ra, rb) = (hi % sh, wi % sw).

    (Mq, ra, rb, Hq, Wq, r0, nr, step_r, c_r, dstep_h, s0, ns, step_s, c_s, dstep_w):
    the phase has Mq = N*Hq*Wq pixels hi = qh*sh + ra; the taps that reach it are
    r = r0 + j*step_r (j < nr; step_r = sh / gcd(sh, dh)); tap j reads dy row
    ho = qh + c_r - j*dstep_h. A phase no tap reaches has nr = 0 (dx = 0 there).
    """
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation

    def axis(ra, size, k, st, pad, dil):
        taps = [t for t in range(k) if (ra + pad - t * dil) % st == 0]
        t0 = taps[0] if taps else 0
        step = st // math.gcd(st, dil)
        # c: exact division, since (ra + pad - t0*dil) is a multiple of st
        return triton.cdiv(size - ra, st), t0, len(taps), step, (ra + pad - t0 * dil) // st, step * dil // st

    out = []
    for ra in range(min(sh, H)):
        Hq, *rest_h = axis(ra, H, KH, sh, ph, dh)
        for rb in range(min(sw, W)):
            Wq, *rest_w = axis(rb, W, KW, sw, pw, dw)
            out.append((N * Hq * Wq, ra, rb, Hq, Wq, *rest_h, *rest_w))
    return out


# Split-K of the wgrad: at most this many partial rows (the second pass reads them all), and
# at least this many BLOCK_P trips per split (a long reduction per program)
WGRAD_MAX_SPLITS = 64
WGRAD_MIN_TRIPS = 8
GPU_SMS = 132  # an H100 SXM's SMs: the grid the GPU split aims to fill about twice


def split_plan(chunks: int, programs: int, splits):
    """(S, chunks per split) for a split-K over `chunks` P-chunks with `programs` programs
    per split; depends only on shapes. The interpreter takes one split. The GPU takes the
    fewest splits whose grid keeps the SMs within 10% of as busy as any split count could
    (waves(S) / S: the busiest SM's share of the work), at most WGRAD_MAX_SPLITS and with
    at least WGRAD_MIN_TRIPS chunks each: every extra split is another fp32 copy of dw
    written and read back (2.4 MB for a 256->256 3x3 conv)."""
    if splits is None:
        if _device.INTERPRETED:
            splits = 1
        else:
            top = max(1, min(WGRAD_MAX_SPLITS, chunks // WGRAD_MIN_TRIPS))
            load = {s: triton.cdiv(programs * s, GPU_SMS) / s for s in range(1, top + 1)}
            best = min(load.values())
            splits = min(s for s, v in load.items() if v <= 1.1 * best)
    per = triton.cdiv(chunks, max(1, min(splits, chunks)))
    return triton.cdiv(chunks, per), per


# A wgrad reduction chunk may be a box of TB images x TH rows x TW columns of output pixels
# (offsets: a scalar plus loop-invariant vectors; ~3x fewer instructions per pixel than
# stepping flat pixel indices) when the box grid wastes little: at least WGRAD_BOX_MIN of the
# box's pixels are real, or WGRAD_BOX_MIN_NARROW for B tiles of at most 128 columns (whose
# loops are issue-bound, so a few wasted MMAs cost less than the saved instructions).
WGRAD_BOX_MIN = 0.97
WGRAD_BOX_MIN_NARROW = 0.85


def wgrad_box(N: int, Ho: int, Wo: int, block_p: int, block_n: int, pool: int = 0) -> tuple[int, int, int]:
    """(TB, TH, TW) with TB*TH*TW = block_p for the wgrad's pixel boxes, or (0, 0, 0): flat chunks.
    pool=K (a fused K x K max pool, K a power of two, Ho and Wo multiples of K): TH and TW are
    multiples of K (whole windows; the kernel expands the pooled gradient there)."""
    if pool and block_p < pool * pool:
        raise ValueError(f"conv2d_wgrad: BLOCK_P {block_p} cannot hold a {pool}x{pool} window")
    tw = max(pool, min(next_pow2(Wo), block_p // max(pool, 1)))
    th = max(pool, min(next_pow2(Ho), block_p // tw))
    tb = block_p // (tw * th)
    real = N * Ho * Wo
    boxed = triton.cdiv(N, tb) * tb * triton.cdiv(Ho, th) * th * triton.cdiv(Wo, tw) * tw
    need = WGRAD_BOX_MIN_NARROW if block_n <= 128 else WGRAD_BOX_MIN
    return (tb, th, tw) if real >= need * boxed else (0, 0, 0)


def wgrad_tiles(C: int, N: int, P: int, taps: int, elem_bytes: int = 2, fused_dz: bool = False) -> Config:
    """The tile config of a wgrad in its GEMM view [taps*C, P] x [P, N]: block_m = channels of
    one tap (BLOCK_K), block_n = output channels, block_k = the pixel chunk (BLOCK_P). fused_dz:
    the B operand is act'(z) * dy (* scale), computed in registers."""
    if _device.INTERPRETED:
        # long reduction chunks: each loop trip costs a round of numpy calls
        # (BLOCK_P 4096 ran 1.5-3x faster than 512 on digits' convs)
        bk, bn, bp = next_pow2(C, 16, 256), next_pow2(N, 16, 256), next_pow2(P, 16, 4096)
        while bp > 512 and bp * max(bk, bn) > (1 << 20):  # Triton's largest tile
            bp //= 2
        return Config(bk, bn, bp)
    return wgrad_heuristic(C, N, P, taps, elem_bytes, fused_dz)
