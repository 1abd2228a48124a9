"""2-D pooling kernels on NHWC activations, forward and backward.

Ops (all tensors NHWC contiguous, compute dtype fp32/fp16/bf16, fp32 math):

* max pool 2-D -- `max_pool2d(x, kernel_size, stride=None, padding=0)`.
  Dilation 1, floor mode, implicit -inf padding (`padding <= kernel // 2`, as
  PyTorch requires). The forward saves, per output element, the *tap index*
  `i * KW + j` of the winning window position: one byte (uint8) when the
  window has at most 256 taps (a 16x16 window), else int32 (the `IDX_WIDE`
  constexpr; in bf16 training a byte is half the pooled output's size where
  int32 was twice). Ties go to the first
  maximum in window scan order (row-major over taps), and a NaN wins over
  anything (the last NaN in scan order), which is exactly PyTorch's CPU rule,
  so gradients match `F.max_pool2d` bit-for-bit in where they are routed.
  With `stats=True` (the `STATS` constexpr) the forward also writes the
  per-tile partial sums of its output and of its square (fp32 [T, C], the
  format of a conv epilogue's batch-norm statistics), for a training-mode
  batch norm that reads only the pooled tensor (`batch_norm_train(partials=)`):
  each program then walks `N_ITER` pixel tiles so that T stays at most
  `common.FOLD_ROWS` on a GPU and the batch norm needs no fold launch.
  The backward is a gather: each program owns input pixels and, for every tap
  `(i, j)`, looks at the one output window that would read this pixel through
  that tap, adding its upstream gradient if the saved tap equals `(i, j)`.
  Overlapping windows (k=3 s=2, k=3 s=1, ...) need nothing special; no atomics.
* average pool 2-D -- `avg_pool2d(x, kernel_size, stride=None, padding=0,
  count_include_pad=True)`. Floor mode; the divisor is PyTorch's (window
  clipped to the padded input when counting padding, to the real input when
  not). Backward is the same tap gather with `dy / divisor`.

Global pools ([N, H, W, C] -> [N, C]) are in engine.kernels.global_pool.

Host launchers (`*_forward`, `*_backward`) validate, allocate and launch through
`engine.kernels.launch.launch`; one `torch.autograd.Function` per op. Tiles are
[pixels, channels] (channels contiguous, common.pixel_tiles): fat ones under
the interpreter, about 1024 elements on a GPU. Index math is int32 on a GPU
unless a tensor has more than 2**31 - 1 elements (`IDX64`), and always int64
under the interpreter, which checks every int32 add/mul for overflow and is
much slower with them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from engine import device as _device
from engine.kernels.batchnorm.backward import bn_grad_args, bn_grad_epilogue
from engine.kernels.common import (FOLD_ROWS, check_grad, check_nhwc, idx64, next_pow2, pair, pixel_grid,
                                   pixel_nhw, pixel_tile, pixel_tiles)
from engine.kernels.launch import launch

# The most taps a window may have for its winning tap to be saved in one byte (uint8 0..255).
NARROW_TAPS = 256


# ----------------------------------------------------------------------------
# host helpers
# ----------------------------------------------------------------------------
def _pool_window(H, W, kernel_size, stride, padding):
    """(window constexprs KH, KW, SH, SW, PH, PW; OH; OW) of a 2-D pool, validated."""
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = pair(stride if stride is not None else (kh, kw), "stride")
    ph, pw = pair(padding, "padding")
    if kh < 1 or kw < 1 or sh < 1 or sw < 1:
        raise ValueError(f"kernel_size and stride must be positive, got {(kh, kw)} and {(sh, sw)}")
    if ph < 0 or pw < 0 or 2 * ph > kh or 2 * pw > kw:
        raise ValueError(f"padding must be between 0 and kernel_size // 2, got {(ph, pw)} for kernel {(kh, kw)}")
    if H + 2 * ph < kh or W + 2 * pw < kw:
        raise ValueError(f"input {H}x{W} (padding {(ph, pw)}) is smaller than the kernel {(kh, kw)}")
    oh = (H + 2 * ph - kh) // sh + 1
    ow = (W + 2 * pw - kw) // sw + 1
    return dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw), oh, ow


# ----------------------------------------------------------------------------
# max / avg pool 2-D kernels
# ----------------------------------------------------------------------------
@triton.jit
def _max_pool_fwd_kernel(
    x_ptr, y_ptr, idx_ptr,  # x [N,H,W,C]; y, idx [N,OH,OW,C] (idx uint8, int32 if IDX_WIDE)
    psum_ptr, psumsq_ptr,  # [T, C] fp32 out (if STATS): per-program sums of y and y*y
    P, C, H, W, OH, OW,  # P = N*OH*OW output pixels
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
    IDX_WIDE: tl.constexpr, STATS: tl.constexpr, N_ITER: tl.constexpr,  # program t: pixel tiles t*N_ITER ...
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    if STATS:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # [BLOCK_P, BLOCK_C] sum y
        acc2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # [BLOCK_P, BLOCK_C] sum y^2
    for it in range(N_ITER):
        offs_p, offs_c, mask_p, mask_c = pixel_tile(pid_t * N_ITER + it, pid_c, P, C, BLOCK_P, BLOCK_C, IDX64)
        n, oh, ow = pixel_nhw(offs_p, OH, OW)  # [BLOCK_P] each
        best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)  # [BLOCK_P, BLOCK_C] running max
        arg = tl.full([BLOCK_P, BLOCK_C], -1, tl.int32)  # [BLOCK_P, BLOCK_C] winning tap, -1 = none yet
        for i in tl.static_range(KH):
            ih = oh * SH - PH + i  # [BLOCK_P]
            vh = mask_p & (ih >= 0) & (ih < H)
            for j in tl.static_range(KW):
                iw = ow * SW - PW + j  # [BLOCK_P]
                v = vh & (iw >= 0) & (iw < W)  # [BLOCK_P] tap inside the real input
                base = ((n * H + ih) * W + iw) * C  # [BLOCK_P]
                m2 = v[:, None] & mask_c[None, :]  # [BLOCK_P, BLOCK_C]
                xv = tl.load(x_ptr + base[:, None] + offs_c[None, :], mask=m2, other=float("-inf")).to(tl.float32)
                # PyTorch's rule: the first valid tap, then strictly greater, and any NaN.
                take = m2 & ((xv > best) | (xv != xv) | (arg < 0))  # [BLOCK_P, BLOCK_C]
                best = tl.where(take, xv, best)
                arg = tl.where(take, i * KW + j, arg)
        out = (offs_p * C)[:, None] + offs_c[None, :]  # [BLOCK_P, BLOCK_C]
        m_out = mask_p[:, None] & mask_c[None, :]  # [BLOCK_P, BLOCK_C]
        tl.store(y_ptr + out, best.to(y_ptr.dtype.element_ty), mask=m_out)
        # every stored element has a valid tap (padding <= kernel // 2), so arg is in 0..KH*KW-1
        if IDX_WIDE:
            tl.store(idx_ptr + out, arg, mask=m_out)
        else:
            tl.store(idx_ptr + out, arg.to(tl.uint8), mask=m_out)
        if STATS:
            # best is a loaded x value, exact in y's dtype: these are the stored y's sums
            ym = tl.where(m_out, best, 0.0)  # [BLOCK_P, BLOCK_C] padded rows/channels count 0
            acc += ym
            acc2 += ym * ym
    if STATS:
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
        prow = pid_t.to(tl.int64) * C + cols  # [BLOCK_C] row pid_t of the [T, C] partials
        tl.store(psum_ptr + prow, tl.sum(acc, axis=0), mask=cols < C)
        tl.store(psumsq_ptr + prow, tl.sum(acc2, axis=0), mask=cols < C)


@triton.jit
def _gather_won(dy_ptr, idx_ptr, n, oh, ow, v, code, OH, OW, C, offs_c, mask_c, IDX_WIDE: tl.constexpr):
    """[BLOCK_P, BLOCK_C] fp32: dy at pooled pixels (n, oh, ow) ([BLOCK_P] each, real where v) where that
    window's saved winning tap is `code` (this pixel's place in it), else 0."""
    off = (((n * OH + oh) * OW + ow) * C)[:, None] + offs_c[None, :]  # [BLOCK_P, BLOCK_C]
    m2 = v[:, None] & mask_c[None, :]
    if IDX_WIDE:
        tap = tl.load(idx_ptr + off, mask=m2, other=0)  # [BLOCK_P, BLOCK_C] int32
    else:
        tap = tl.load(idx_ptr + off, mask=m2, other=0).to(tl.int32)  # [BLOCK_P, BLOCK_C] from uint8
    return tl.load(dy_ptr + off, mask=m2 & (tap == code), other=0.0).to(tl.float32)


@triton.jit
def _max_pool_bwd_kernel(
    dy_ptr, idx_ptr, dx_ptr,  # dy, idx [N,OH,OW,C] (idx uint8, int32 if IDX_WIDE); dx [N,H,W,C]
    bnx_ptr, bn_mean_ptr, bn_rstd_ptr, bn_w_ptr, bn_b_ptr,  # BN_GRAD: the batch norm that made x, and
    pdz_ptr, pdzx_ptr, fdz_ptr, fdzx_ptr, sdz_ptr, sdzx_ptr, bn_ctr_ptr,  # its sums' scratch and output
    P, C, H, W, OH, OW,  # P = N*H*W input pixels
    BN_R, bn_slope,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr, IDX_WIDE: tl.constexpr,
    BN_GRAD: tl.constexpr, BN_ACT: tl.constexpr, BN_HAS_W: tl.constexpr, BN_HAS_B: tl.constexpr,
    BN_BLOCK_T: tl.constexpr,
):
    """dx by gather. BN_GRAD: x = act(bn(bnx)) of a training batch norm this pool alone reads; dz =
    act'(z) * dx is stored instead and the batch norm's gradient sums emitted (batchnorm.backward)."""
    offs_p, offs_c, mask_p, mask_c = pixel_tile(tl.program_id(0), tl.program_id(1), P, C, BLOCK_P, BLOCK_C, IDX64)
    n, ih, iw = pixel_nhw(offs_p, H, W)  # [BLOCK_P] each
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # [BLOCK_P, BLOCK_C] dx accumulator
    if KH <= SH and KW <= SW:
        # windows that do not overlap (2x2/2, a global pool): a pixel is tap (i, j) of at most one
        # window, found by division -- one gather where the loop below tests all KH*KW taps
        oh = (ih + PH) // SH  # [BLOCK_P]
        ow = (iw + PW) // SW
        i = ih + PH - oh * SH  # [BLOCK_P] the pixel's tap in that window
        j = iw + PW - ow * SW
        v = mask_p & (i < KH) & (j < KW) & (oh < OH) & (ow < OW)  # [BLOCK_P]
        acc += _gather_won(dy_ptr, idx_ptr, n, oh, ow, v, (i * KW + j)[:, None], OH, OW, C, offs_c, mask_c, IDX_WIDE)
    else:
        for i in tl.static_range(KH):
            th = ih + PH - i  # [BLOCK_P] oh * SH if tap i of window oh lands here
            oh = th // SH
            vh = mask_p & (th >= 0) & (th % SH == 0) & (oh < OH)
            for j in tl.static_range(KW):
                tw = iw + PW - j
                ow = tw // SW
                v = vh & (tw >= 0) & (tw % SW == 0) & (ow < OW)  # [BLOCK_P]
                acc += _gather_won(dy_ptr, idx_ptr, n, oh, ow, v, i * KW + j, OH, OW, C, offs_c, mask_c, IDX_WIDE)
    out = (offs_p * C)[:, None] + offs_c[None, :]
    if BN_GRAD:  # every program, empty tiles too: each writes its partial row and draws its tickets
        bn_grad_epilogue(acc, dx_ptr, offs_p, mask_p, tl.program_id(0), tl.program_id(1),
                         tl.num_programs(1), offs_c, mask_c, bnx_ptr, bn_mean_ptr, bn_rstd_ptr, bn_w_ptr, bn_b_ptr,
                         pdz_ptr, pdzx_ptr, fdz_ptr, fdzx_ptr, sdz_ptr, sdzx_ptr, bn_ctr_ptr, tl.num_programs(0), BN_R,
                         C, bn_slope, BN_ACT, BN_HAS_W, BN_HAS_B, BN_BLOCK_T, BLOCK_P, BLOCK_C, False)
    else:
        tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _avg_divisor(o, S: tl.constexpr, PAD: tl.constexpr, K: tl.constexpr, size, COUNT_PAD: tl.constexpr):
    """Extent along one dim of the window starting at o*S - PAD (PyTorch's rule)."""
    start = o * S - PAD
    if COUNT_PAD:
        return tl.minimum(start + K, size + PAD) - start
    else:
        return tl.minimum(start + K, size) - tl.maximum(start, 0)


@triton.jit
def _avg_pool_fwd_kernel(
    x_ptr, y_ptr,  # x [N,H,W,C]; y [N,OH,OW,C]
    P, C, H, W, OH, OW,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, COUNT_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    offs_p, offs_c, mask_p, mask_c = pixel_tile(tl.program_id(0), tl.program_id(1), P, C, BLOCK_P, BLOCK_C, IDX64)
    n, oh, ow = pixel_nhw(offs_p, OH, OW)  # [BLOCK_P] each
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # [BLOCK_P, BLOCK_C] window sum
    for i in tl.static_range(KH):
        ih = oh * SH - PH + i
        vh = mask_p & (ih >= 0) & (ih < H)
        for j in tl.static_range(KW):
            iw = ow * SW - PW + j
            v = vh & (iw >= 0) & (iw < W)
            base = ((n * H + ih) * W + iw) * C
            m2 = v[:, None] & mask_c[None, :]
            acc += tl.load(x_ptr + base[:, None] + offs_c[None, :], mask=m2, other=0.0).to(tl.float32)
    div = _avg_divisor(oh, SH, PH, KH, H, COUNT_PAD) * _avg_divisor(ow, SW, PW, KW, W, COUNT_PAD)  # [BLOCK_P]
    y = acc / div.to(tl.float32)[:, None]
    out = (offs_p * C)[:, None] + offs_c[None, :]
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _avg_pool_bwd_kernel(
    dy_ptr, dx_ptr,  # dy [N,OH,OW,C]; dx [N,H,W,C]
    P, C, H, W, OH, OW,  # P = N*H*W input pixels
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, COUNT_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    offs_p, offs_c, mask_p, mask_c = pixel_tile(tl.program_id(0), tl.program_id(1), P, C, BLOCK_P, BLOCK_C, IDX64)
    n, ih, iw = pixel_nhw(offs_p, H, W)  # [BLOCK_P] each
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # [BLOCK_P, BLOCK_C]
    for i in tl.static_range(KH):
        th = ih + PH - i
        oh = th // SH
        vh = mask_p & (th >= 0) & (th % SH == 0) & (oh < OH)
        # divisor of window (oh, ow) = dh * dw, PyTorch's rule (as _avg_divisor; inlined because
        # nested jit calls are slow under the interpreter)
        hs = oh * SH - PH
        if COUNT_PAD:
            dh = tl.minimum(hs + KH, H + PH) - hs  # [BLOCK_P]
        else:
            dh = tl.minimum(hs + KH, H) - tl.maximum(hs, 0)
        for j in tl.static_range(KW):
            tw = iw + PW - j
            ow = tw // SW
            v = vh & (tw >= 0) & (tw % SW == 0) & (ow < OW)
            ws = ow * SW - PW
            if COUNT_PAD:
                dw = tl.minimum(ws + KW, W + PW) - ws
            else:
                dw = tl.minimum(ws + KW, W) - tl.maximum(ws, 0)
            div = (dh * dw).to(tl.float32)  # [BLOCK_P]
            div = tl.where(v, div, 1.0)
            off = (((n * OH + oh) * OW + ow) * C)[:, None] + offs_c[None, :]
            m2 = v[:, None] & mask_c[None, :]
            acc += tl.load(dy_ptr + off, mask=m2, other=0.0).to(tl.float32) / div[:, None]
    out = (offs_p * C)[:, None] + offs_c[None, :]
    tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


# ----------------------------------------------------------------------------
# max / avg pool 2-D launchers
# ----------------------------------------------------------------------------
class MaxPoolOutput(NamedTuple):
    """What the max-pool forward returns.

    y:      [N, OH, OW, C] in x's dtype
    idx:    [N, OH, OW, C] winning tap i*KW+j: uint8, or int32 for windows over NARROW_TAPS taps
    psum:   [T, C] fp32 per-program sums of y, when stats=True
    psumsq: [T, C] fp32 per-program sums of y*y, when stats=True
    """

    y: torch.Tensor
    idx: torch.Tensor
    psum: Optional[torch.Tensor] = None
    psumsq: Optional[torch.Tensor] = None


def _wide_idx(taps: int, wide_idx) -> bool:
    """Whether the winning taps of a `taps`-tap window are saved as int32 (else uint8)."""
    if wide_idx is None:
        return taps > NARROW_TAPS
    if not wide_idx and taps > NARROW_TAPS:
        raise ValueError(f"a {taps}-tap window does not fit one-byte tap indices (at most {NARROW_TAPS} taps)")
    return bool(wide_idx)


def _stats_tiles(P: int, C: int) -> tuple[tuple[int, int], dict]:
    """(grid, launch options) of the forward with statistics: pixel_grid's tiles, each program
    walking N_ITER consecutive pixel tiles so that the [T, C] partials have T <= FOLD_ROWS on a
    GPU (the batch norm reads them without a fold launch; one tile per program under the
    interpreter, which never folds)."""
    bp, bc, nw = pixel_tiles(P, C)
    tiles = triton.cdiv(P, bp)
    n_iter = 1 if _device.INTERPRETED else triton.cdiv(tiles, FOLD_ROWS)
    return (triton.cdiv(tiles, n_iter), triton.cdiv(C, bc)), dict(BLOCK_P=bp, BLOCK_C=bc, num_warps=nw, N_ITER=n_iter)


def max_pool2d_forward(x: torch.Tensor, kernel_size, stride=None, padding=0, *, wide_idx=None,
                       stats: bool = False) -> MaxPoolOutput:
    """Max pool NHWC `x` -> MaxPoolOutput(y, idx[, psum, psumsq]).

    `wide_idx`: None picks uint8 tap indices when the window has at most NARROW_TAPS taps,
    int32 otherwise; True/False force int32/uint8 (tests). `stats=True` also returns the
    per-program partial sums of y and y*y (fp32 [T, C]) for batch_norm_train(partials=...)."""
    check_nhwc(x)
    N, H, W, C = x.shape
    window, OH, OW = _pool_window(H, W, kernel_size, stride, padding)
    wide = _wide_idx(window["KH"] * window["KW"], wide_idx)
    y = torch.empty((N, OH, OW, C), device=x.device, dtype=x.dtype)
    idx = torch.empty((N, OH, OW, C), device=x.device, dtype=torch.int32 if wide else torch.uint8)
    P = N * OH * OW
    if stats:
        grid, tiles = _stats_tiles(P, C)
        psum = torch.empty((grid[0], C), device=x.device, dtype=torch.float32)
        psumsq = torch.empty((grid[0], C), device=x.device, dtype=torch.float32)
    else:
        grid, tiles = pixel_grid(P, C)
        tiles["N_ITER"] = 1
        psum = psumsq = None
    launch(_max_pool_fwd_kernel, grid, x, y, idx, psum if stats else y, psumsq if stats else y,
           P, C, H, W, OH, OW, **window, IDX64=idx64(x, y), IDX_WIDE=wide, STATS=stats, **tiles)
    return MaxPoolOutput(y, idx, psum, psumsq)


def max_pool2d_backward(dy: torch.Tensor, idx: torch.Tensor, x_shape, kernel_size, stride=None, padding=0,
                        bn_grad=None):
    """dx [N,H,W,C] (dy's dtype) from dy and the forward's tap indices, by gather (no atomics).
    bn_grad=(x, mean, rstd, weight, bias, act code, slope) (batchnorm.BnGradLink.saved): the pool's
    input is act(bn(x)) of a training batch norm only this pool reads; returns (dz, (sdz, sdzx)) instead,
    dz = act'(z) * dx and the batch norm's gradient sums ([C] fp32)."""
    N, H, W, C = (int(s) for s in x_shape)
    window, OH, OW = _pool_window(H, W, kernel_size, stride, padding)
    dy = check_grad(dy, (N, OH, OW, C))
    if tuple(idx.shape) != (N, OH, OW, C):
        raise ValueError(f"idx {tuple(idx.shape)} does not match the output shape {(N, OH, OW, C)}")
    taps = window["KH"] * window["KW"]
    if idx.dtype not in (torch.uint8, torch.int32) or not idx.is_contiguous() or idx.device != dy.device:
        raise ValueError("idx must be a contiguous uint8 or int32 tensor on dy's device")
    if idx.dtype == torch.uint8 and taps > NARROW_TAPS:
        raise ValueError(f"uint8 idx cannot hold the taps of a {taps}-tap window")
    dx = torch.empty((N, H, W, C), device=dy.device, dtype=dy.dtype)
    bp, bc, nw = pixel_tiles(N * H * W, C)
    if bn_grad is not None and not _device.INTERPRETED:
        # 4x the pixels (32 values a thread): the bn epilogue's per-program work (its channel parameters,
        # a partial row and its tickets) made airbench94's 3x3 -> 1x1 pool backward issue-bound at
        # 2,304 programs (13.5 us against 3.5 us of HBM)
        bp = min(4 * bp, next_pow2(N * H * W))
    grid, tiles = (triton.cdiv(N * H * W, bp), triton.cdiv(C, bc)), dict(BLOCK_P=bp, BLOCK_C=bc, num_warps=nw)
    bn_args, bn_flags, sums = bn_grad_args(bn_grad, dx, grid[0], bc)  # a partial row per P tile
    launch(_max_pool_bwd_kernel, grid, dy, idx, dx, *bn_args[:12], N * H * W, C, H, W, OH, OW, *bn_args[12:],
           **window, IDX64=idx64(dx, dy), IDX_WIDE=idx.dtype == torch.int32, **bn_flags, **tiles)
    return dx if bn_grad is None else (dx, sums)


def avg_pool2d_forward(x: torch.Tensor, kernel_size, stride=None, padding=0, count_include_pad: bool = True) -> torch.Tensor:
    """Average pool NHWC `x` -> y [N,OH,OW,C] in x.dtype (floor mode, PyTorch's divisor)."""
    check_nhwc(x)
    N, H, W, C = x.shape
    window, OH, OW = _pool_window(H, W, kernel_size, stride, padding)
    y = torch.empty((N, OH, OW, C), device=x.device, dtype=x.dtype)
    grid, tiles = pixel_grid(N * OH * OW, C)
    launch(_avg_pool_fwd_kernel, grid, x, y, N * OH * OW, C, H, W, OH, OW, **window,
           COUNT_PAD=bool(count_include_pad), IDX64=idx64(x, y), **tiles)
    return y


def avg_pool2d_backward(dy: torch.Tensor, x_shape, kernel_size, stride=None, padding=0, count_include_pad: bool = True) -> torch.Tensor:
    """dx [N,H,W,C] (dy's dtype) of avg pool, by gather."""
    N, H, W, C = (int(s) for s in x_shape)
    window, OH, OW = _pool_window(H, W, kernel_size, stride, padding)
    dy = check_grad(dy, (N, OH, OW, C))
    dx = torch.empty((N, H, W, C), device=dy.device, dtype=dy.dtype)
    grid, tiles = pixel_grid(N * H * W, C)
    launch(_avg_pool_bwd_kernel, grid, dy, dx, N * H * W, C, H, W, OH, OW, **window,
           COUNT_PAD=bool(count_include_pad), IDX64=idx64(dx, dy), **tiles)
    return dx


class MaxPool2dFn(torch.autograd.Function):
    """y = max_pool2d(x); with stats=True also (psum, psumsq), the partial sums of y and y*y:
    statistics for the batch norm that reads y, not values, so they carry no gradient (the
    batch norm's backward accounts for its statistics' dependence on y)."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride=None, padding=0, wide_idx=None, stats=False, grad_link=None):
        res = max_pool2d_forward(x, kernel_size, stride, padding, wide_idx=wide_idx, stats=stats)
        ctx.save_for_backward(res.idx)
        ctx.geom = (tuple(x.shape), kernel_size, stride, padding)
        ctx.grad_link = grad_link  # batchnorm.BnGradLink: x is act(bn(.)) read only here
        if stats:
            ctx.mark_non_differentiable(res.psum, res.psumsq)
            # no zero-filled gradients for the statistics: their backward ignores them
            ctx.set_materialize_grads(False)
            return res.y, res.psum, res.psumsq
        return res.y

    @staticmethod
    def backward(ctx, dy, *_stats_grads):  # the partial sums (stats=True) have no gradient
        (idx,) = ctx.saved_tensors
        x_shape, k, s, p = ctx.geom
        if dy is None:  # y unused (stats only): no gradient reaches x
            return None, None, None, None, None, None, None
        link = ctx.grad_link
        if link is not None and link.saved is not None:  # dz of the batch norm that made x, and its sums
            dx, link.sums = max_pool2d_backward(dy, idx, x_shape, k, s, p, bn_grad=link.saved)
        else:
            dx = max_pool2d_backward(dy, idx, x_shape, k, s, p)
        return dx, None, None, None, None, None, None


class AvgPool2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride=None, padding=0, count_include_pad=True):
        ctx.geom = (tuple(x.shape), kernel_size, stride, padding, count_include_pad)
        return avg_pool2d_forward(x, kernel_size, stride, padding, count_include_pad)

    @staticmethod
    def backward(ctx, dy):
        x_shape, k, s, p, cip = ctx.geom
        return avg_pool2d_backward(dy, x_shape, k, s, p, cip), None, None, None, None


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, *, wide_idx=None, stats: bool = False,
               grad_link=None):
    """Differentiable NHWC max pool (matches `F.max_pool2d` on the NCHW view).

    stats=True returns (y, (psum, psumsq)): fp32 [T, C] partial sums of y and y*y, for
    batch_norm_train(partials=...). `wide_idx`: see max_pool2d_forward. grad_link (a
    batchnorm.BnGradLink): x is act(bn(.)) of a training batch norm only this pool reads; the
    backward's gather kernel makes that batch norm's dz and gradient sums."""
    result = MaxPool2dFn.apply(x, kernel_size, stride, padding, wide_idx, stats, grad_link)
    if stats:
        y, psum, psumsq = result
        return y, (psum, psumsq)
    return result


def avg_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, count_include_pad: bool = True) -> torch.Tensor:
    """Differentiable NHWC average pool (matches `F.avg_pool2d` on the NCHW view)."""
    return AvgPool2dFn.apply(x, kernel_size, stride, padding, count_include_pad)
