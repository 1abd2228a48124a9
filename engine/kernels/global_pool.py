"""Global pools on NHWC activations, forward and backward: `[N, H, W, C] -> [N, C]`.

`global_avg_pool(x)`, `global_max_pool(x)`. The reduction over H*W is split
into chunks of rows when H*W is large: each (n, channel block, chunk) program
writes an fp32 partial (and for max the flat hw index of its first maximum),
and a second kernel folds the partials in chunk order, so results are
deterministic. `chunk=` (rows per split) overrides the automatic choice (one
program per (n, channel block) under the interpreter, 4096 rows per chunk on a
GPU). Max routes the gradient to the first maximal position
(`F.adaptive_max_pool2d(x, 1)` does the same; `amax` would split it among
ties). With NaNs the output is NaN and the gradient goes to the first NaN
(PyTorch: the last one). The backward is a broadcast over [pixels, channels]
tiles (common.pixel_tiles), as in engine.kernels.pool.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine import device as _device
from engine.kernels.common import (
    INT32_MAX,
    check_grad,
    check_nhwc,
    idx64,
    next_pow2,
    pixel_grid,
    pixel_tile,
    prev_pow2,
)
from engine.kernels.launch import launch


# ----------------------------------------------------------------------------
# global pools: [N, H, W, C] -> [N, C]
# ----------------------------------------------------------------------------
@triton.jit
def _global_pool_partial_kernel(
    x_ptr,  # [N, HW, C]
    out_ptr, out_idx_ptr,  # DIRECT: y [N, C] (+ idx int32 [N, C]); else fp32 partials [SPLIT, N, C] (+ int32)
    N, HW, C, hw_f,  # hw_f = float(HW)
    ITERS: tl.constexpr,  # row blocks per split: a split covers CHUNK = ITERS * BLOCK_HW rows
    IS_MAX: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_N: tl.constexpr,  # images per program (many under the interpreter, which pays per program)
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    # (loop trip counts are constexpr: Triton 3.6's interpreter cannot take a runtime
    # scalar as a range() bound with NumPy >= 2.3)
    CHUNK: tl.constexpr = ITERS * BLOCK_HW
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    s = tl.program_id(2)
    if IDX64:
        pid_n = pid_n.to(tl.int64)
        s = s.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] image
    mask_n = offs_n < N
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = offs_c < C
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    x_img = x_ptr + (offs_n * HW * C)[:, None, None]  # [BLOCK_N, 1, 1] image bases
    BIG: tl.constexpr = 2147483647
    if IS_MAX:
        best = tl.full([BLOCK_N, BLOCK_C], float("-inf"), tl.float32)  # [BLOCK_N, BLOCK_C] running max
        bidx = tl.full([BLOCK_N, BLOCK_C], BIG, tl.int32)  # [BLOCK_N, BLOCK_C] flat hw of the first max
        bnan = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.int32)  # [BLOCK_N, BLOCK_C] 1 once a NaN was seen
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_HW, BLOCK_C], dtype=tl.float32)  # partial sums
    for it in range(ITERS):
        rows = start + it * BLOCK_HW + tl.arange(0, BLOCK_HW)  # [BLOCK_HW] flat hw
        m3 = mask_n[:, None, None] & (rows < end)[None, :, None] & mask_c[None, None, :]  # [BLOCK_N, BLOCK_HW, BLOCK_C]
        ptrs = x_img + (rows * C)[None, :, None] + offs_c[None, None, :]
        if IS_MAX:
            v = tl.load(ptrs, mask=m3, other=float("-inf")).to(tl.float32)  # [BLOCK_N, BLOCK_HW, BLOCK_C]
            isn = m3 & (v != v)
            vv = tl.where(isn, float("-inf"), v)
            bm = tl.max(vv, axis=1)  # [BLOCK_N, BLOCK_C] block max (NaN ignored)
            rows3 = rows[None, :, None].to(tl.int32) + tl.zeros([BLOCK_N, BLOCK_HW, BLOCK_C], dtype=tl.int32)
            first_max = tl.min(tl.where(m3 & (v == bm[:, None, :]), rows3, BIG), axis=1)  # [BLOCK_N, BLOCK_C]
            first_nan = tl.min(tl.where(isn, rows3, BIG), axis=1)  # [BLOCK_N, BLOCK_C]
            has_nan = first_nan < BIG
            cand = tl.where(has_nan, first_nan, first_max)
            take = (bnan == 0) & (has_nan | (bm > best) | ((bm == best) & (cand < bidx)))
            best = tl.where(take, tl.where(has_nan, float("nan"), bm), best)
            bidx = tl.where(take, cand, bidx)
            bnan = tl.where(has_nan, 1, bnan)
        else:
            acc += tl.load(ptrs, mask=m3, other=0.0).to(tl.float32)
    if IS_MAX:
        val = best
    else:
        val = tl.sum(acc, axis=1)  # [BLOCK_N, BLOCK_C]
    m2 = mask_n[:, None] & mask_c[None, :]  # [BLOCK_N, BLOCK_C]
    if DIRECT:
        out_offs = offs_n[:, None] * C + offs_c[None, :]  # [BLOCK_N, BLOCK_C] into [N, C]
        if not IS_MAX:
            val = val / hw_f
        tl.store(out_ptr + out_offs, val.to(out_ptr.dtype.element_ty), mask=m2)
    else:
        out_offs = (s * N + offs_n)[:, None] * C + offs_c[None, :]  # into [SPLIT, N, C]
        tl.store(out_ptr + out_offs, val, mask=m2)
    if IS_MAX:
        tl.store(out_idx_ptr + out_offs, bidx, mask=m2)


@triton.jit
def _global_pool_combine_kernel(
    part_ptr, part_idx_ptr,  # fp32 [SPLIT, NC] partials (+ int32 [SPLIT, NC] first-max indices)
    y_ptr, idx_ptr,  # y [N, C]; idx int32 [N, C] (max only)
    NC, hw_f,
    SPLIT: tl.constexpr, IS_MAX: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat (n, c)
    mask = offs < NC
    BIG: tl.constexpr = 2147483647
    best = tl.full([BLOCK], float("-inf"), tl.float32)  # [BLOCK]
    bidx = tl.full([BLOCK], BIG, tl.int32)
    bnan = tl.zeros([BLOCK], dtype=tl.int32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT):  # fixed order: deterministic
        v = tl.load(part_ptr + s * NC + offs, mask=mask, other=0.0)
        if IS_MAX:
            vi = tl.load(part_idx_ptr + s * NC + offs, mask=mask, other=BIG)
            has_nan = v != v
            take = (bnan == 0) & (has_nan | (v > best) | ((v == best) & (vi < bidx)))
            best = tl.where(take, v, best)
            bidx = tl.where(take, vi, bidx)
            bnan = tl.where(has_nan, 1, bnan)
        else:
            acc += v
    if IS_MAX:
        tl.store(y_ptr + offs, best.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(idx_ptr + offs, bidx, mask=mask)
    else:
        tl.store(y_ptr + offs, (acc / hw_f).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _global_pool_bwd_kernel(
    dy_ptr, idx_ptr, dx_ptr,  # dy [N, C]; idx int32 [N, C] (max only); dx [N, HW, C]
    P, HW, C, hw_f,  # P = N*HW input pixels
    IS_MAX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    offs_p, offs_c, mask_p, mask_c = pixel_tile(tl.program_id(0), tl.program_id(1), P, C, BLOCK_P, BLOCK_C, IDX64)
    hw = offs_p % HW  # [BLOCK_P]
    n = offs_p // HW
    m2 = mask_p[:, None] & mask_c[None, :]  # [BLOCK_P, BLOCK_C]
    nc = (n * C)[:, None] + offs_c[None, :]  # [BLOCK_P, BLOCK_C]
    g = tl.load(dy_ptr + nc, mask=m2, other=0.0).to(tl.float32)
    if IS_MAX:
        a = tl.load(idx_ptr + nc, mask=m2, other=-1)
        g = tl.where(a == hw[:, None], g, 0.0)
    else:
        g = g / hw_f
    out = (offs_p * C)[:, None] + offs_c[None, :]
    tl.store(dx_ptr + out, g.to(dx_ptr.dtype.element_ty), mask=m2)


def _global_pool_forward(x: torch.Tensor, is_max: bool, chunk: int | None):
    check_nhwc(x)
    N, H, W, C = x.shape
    HW = H * W
    if HW >= INT32_MAX:
        raise ValueError(f"H*W = {HW} is too large for int32 indices")
    if _device.INTERPRETED:
        block_c = min(next_pow2(C), 512)
        block_hw = min(max(1, 16384 // block_c), next_pow2(HW))
        # several images per program: the interpreter's cost is per program (one
        # per image took ~3 ms each on a 64x4x4x32 batch)
        block_n = min(next_pow2(N), max(1, (1 << 16) // (block_hw * block_c)))
        default_chunk = 1 << 20
    else:
        block_c = min(next_pow2(C), 64)
        block_hw = max(8, 2048 // block_c)
        block_n = 1
        default_chunk = 4096
    chunk = default_chunk if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    block_hw = min(block_hw, prev_pow2(chunk))
    chunk = triton.cdiv(min(chunk, HW), block_hw) * block_hw  # rows per split, a multiple of BLOCK_HW
    split = triton.cdiv(HW, chunk)
    y = torch.empty((N, C), device=x.device, dtype=x.dtype)
    idx = torch.empty((N, C), device=x.device, dtype=torch.int32) if is_max else None
    grid = (triton.cdiv(N, block_n), triton.cdiv(C, block_c), split)
    meta = dict(IS_MAX=is_max, BLOCK_N=block_n, BLOCK_HW=block_hw, BLOCK_C=block_c, IDX64=idx64(x), num_warps=4)
    if split == 1:
        launch(_global_pool_partial_kernel, grid, x, y, idx if is_max else y, N, HW, C, float(HW),
               ITERS=chunk // block_hw, DIRECT=True, **meta)
        return y, idx
    part = torch.empty((split, N, C), device=x.device, dtype=torch.float32)
    part_idx = torch.empty((split, N, C), device=x.device, dtype=torch.int32) if is_max else part
    launch(_global_pool_partial_kernel, grid, x, part, part_idx, N, HW, C, float(HW),
           ITERS=chunk // block_hw, DIRECT=False, **meta)
    NC = N * C
    block = min(next_pow2(NC), 16384) if _device.INTERPRETED else 256
    launch(_global_pool_combine_kernel, (triton.cdiv(NC, block),), part, part_idx, y, idx if is_max else y,
           NC, float(HW), SPLIT=split, IS_MAX=is_max, BLOCK=block, num_warps=4)
    return y, idx


def _global_pool_backward(dy: torch.Tensor, idx, x_shape, is_max: bool) -> torch.Tensor:
    N, H, W, C = (int(s) for s in x_shape)
    dy = check_grad(dy, (N, C))
    if is_max and (idx is None or tuple(idx.shape) != (N, C) or idx.dtype != torch.int32 or not idx.is_contiguous()):
        raise ValueError("idx must be a contiguous int32 [N, C] tensor from global_max_pool_forward")
    dx = torch.empty((N, H, W, C), device=dy.device, dtype=dy.dtype)
    grid, tiles = pixel_grid(N * H * W, C)
    launch(_global_pool_bwd_kernel, grid, dy, idx if is_max else dy, dx, N * H * W, H * W, C, float(H * W),
           IS_MAX=is_max, IDX64=idx64(dx), **tiles)
    return dx


def global_avg_pool_forward(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Mean over H, W of NHWC `x` -> [N, C] in x.dtype. `chunk`: rows per split (None = auto)."""
    return _global_pool_forward(x, False, chunk)[0]


def global_avg_pool_backward(dy: torch.Tensor, x_shape) -> torch.Tensor:
    """dx [N,H,W,C] = dy[n, c] / (H*W) broadcast."""
    return _global_pool_backward(dy, None, x_shape, False)


def global_max_pool_forward(x: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over H, W of NHWC `x` -> (y [N, C] in x.dtype, idx [N, C] int32 flat h*W+w of the first max)."""
    return _global_pool_forward(x, True, chunk)


def global_max_pool_backward(dy: torch.Tensor, idx: torch.Tensor, x_shape) -> torch.Tensor:
    """dx [N,H,W,C]: dy[n, c] at the saved argmax position, zero elsewhere."""
    return _global_pool_backward(dy, idx, x_shape, True)


class GlobalAvgPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, chunk=None):
        ctx.x_shape = tuple(x.shape)
        return global_avg_pool_forward(x, chunk)

    @staticmethod
    def backward(ctx, dy):
        return global_avg_pool_backward(dy, ctx.x_shape), None


class GlobalMaxPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, chunk=None):
        y, idx = global_max_pool_forward(x, chunk)
        ctx.save_for_backward(idx)
        ctx.x_shape = tuple(x.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        (idx,) = ctx.saved_tensors
        return global_max_pool_backward(dy, idx, ctx.x_shape), None


def global_avg_pool(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Differentiable [N,H,W,C] -> [N,C] mean (matches `F.adaptive_avg_pool2d(x, 1)`)."""
    return GlobalAvgPoolFn.apply(x, chunk)


def global_max_pool(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Differentiable [N,H,W,C] -> [N,C] max (matches `F.adaptive_max_pool2d(x, 1)`)."""
    return GlobalMaxPoolFn.apply(x, chunk)
