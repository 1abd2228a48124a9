"""The max pool a conv forward fuses (conv2d_forward's pool=K: a K x K / stride K max pool, floor
mode): the order of an M tile's rows over the pool windows, the epilogue that pools a tile and
stores the pooled output, its one-byte argmax and the pooled batch statistics, and the
preconditions.

A tile holds whole windows, so the pool needs no other program's rows; the rows a floor-mode pool
drops are not computed. The backward (the bn apply that reads the pooled output, or
engine.kernels.pool's gather, or the dgrad/wgrad operand expansion) reads only the argmax.

Public API: window_rows, pool_epilogue (jit); pool_row_order, check_pool.
"""
from __future__ import annotations

import triton
import triton.language as tl

from engine.kernels.activations import apply_act


@triton.jit
def window_rows(pid_m, POOL: tl.constexpr, TAP_S1: tl.constexpr, TAP_S0: tl.constexpr, BLOCK_M: tl.constexpr):
    """(window, tap) of each row of M tile pid_m of a conv with a fused POOL x POOL pool ([BLOCK_M] each;
    tap = dy*POOL + dx; the tile holds windows pid_m*BLOCK_M/POOL**2 onwards).

    POOL 2: tile row r holds tap 2*(r // TAP_S1 % 2) + r // TAP_S0 % 2 (powers of two, TAP_S1 > TAP_S0)
    and the window its other bits make. (2, 1): a window's taps are consecutive rows. (8, 4), (BLOCK_M/2,
    8): rows 8 apart are in one thread of Hopper's warpgroup MMA accumulator (a warp's 16 rows as lane/4
    and lane/4 + 8), as are the two 64-row halves of a 4-warp 128+ row tile, so the window max takes
    one shuffle level or none instead of two (pool_row_order picks; `pool_epilogue` undoes it)."""
    r = tl.arange(0, BLOCK_M)  # [BLOCK_M] row in the tile
    if POOL == 2:
        tap = (r // TAP_S1 % 2) * 2 + r // TAP_S0 % 2  # [BLOCK_M]
        low = r % TAP_S0  # [BLOCK_M] the window's bits below, between and above the tap bits
        mid = (r // (2 * TAP_S0)) % (TAP_S1 // (2 * TAP_S0))
        high = r // (2 * TAP_S1)
        win = pid_m * (BLOCK_M // 4) + low + TAP_S0 * (mid + (TAP_S1 // (2 * TAP_S0)) * high)  # [BLOCK_M]
    else:
        tap = r % (POOL * POOL)  # [BLOCK_M]
        win = pid_m * (BLOCK_M // (POOL * POOL)) + r // (POOL * POOL)  # [BLOCK_M]
    return win, tap


def pool_row_order(pool: int, block_m: int, num_warps: int | None) -> tuple[int, int]:
    """window_rows' (TAP_S1, TAP_S0) for a tile: a 2x2 window's taps in as few lanes as the MMA layout allows
    (4 warps and 128+ rows: all four in one thread; else two in a thread), consecutive rows otherwise."""
    if pool != 2 or block_m < 16:
        return 2, 1
    if block_m >= 128 and (num_warps or 4) == 4:
        return block_m // 2, 8
    return 8, 4


@triton.jit
def pool_epilogue(acc, pid_m, offs_c, mask_c, y_ptr, idx_ptr, bias_ptr, scale_ptr, shift_ptr, psum_ptr,
                  psumsq_ptr, NWIN, Cout, slope, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_SHIFT: tl.constexpr, STATS: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr,
                  TAP_S1: tl.constexpr, TAP_S0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A fused POOL x POOL / stride POOL max pool of tile pid_m, whose rows are whole windows in
    window_rows' order (tap = dy*POOL + dx). Stores the pooled y = max over the window of
    act((acc + bias) * scale + shift) into y [NWIN, Cout] (contiguous), the winning tap into idx
    (one byte, engine.kernels.pool's code: the first maximum in tap order) and, with STATS, the
    per-tile sums of the pooled y and y*y (psum/psumsq row pid_m)."""
    z = acc  # [BLOCK_M, BLOCK_N] fp32
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        z *= tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        z += tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    # act before the max: inference only (the plan fuses no activation here in training)
    z = apply_act(z, ACT, slope)
    # the max of the values as stored (rounded to y's dtype), as a separate pool would see them:
    # the same winner, ties included (the first tap; NaNs are not ranked as a pool kernel ranks them)
    z = z.to(y_ptr.dtype.element_ty).to(tl.float32)
    if POOL == 2:
        # window_rows' order: row r = ((high*2 + s1)*MID + mid)*2*TAP_S0 + s0*TAP_S0 + low holds tap 2*s1 + s0
        # of window (high*MID + mid)*TAP_S0 + low (MID = TAP_S1 / (2*TAP_S0))
        z6 = tl.reshape(z, [BLOCK_M // (2 * TAP_S1), 2, TAP_S1 // (2 * TAP_S0), 2, TAP_S0, BLOCK_N])
        z3 = tl.reshape(tl.permute(z6, (0, 2, 4, 1, 3, 5)), [BLOCK_M // 4, 4, BLOCK_N])  # [windows, taps, BLOCK_N]
    else:
        z3 = tl.reshape(z, [BLOCK_M // (POOL * POOL), POOL * POOL, BLOCK_N])  # [windows, taps, BLOCK_N]
    best, arg = tl.max(z3, axis=1, return_indices=True)  # [BLOCK_M // (POOL * POOL), BLOCK_N] each
    win = pid_m * (BLOCK_M // (POOL * POOL)) + tl.arange(0, BLOCK_M // (POOL * POOL))  # [windows] pooled pixel
    mask = (win < NWIN)[:, None] & mask_c[None, :]  # [BLOCK_M // (POOL * POOL), BLOCK_N]
    off = win[:, None] * Cout + offs_c[None, :]  # [BLOCK_M // (POOL * POOL), BLOCK_N]
    tl.store(y_ptr + off, best.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(idx_ptr + off, arg.to(tl.uint8), mask=mask)
    if STATS:
        bm = tl.where(mask, best, 0.0)  # [BLOCK_M // (POOL * POOL), BLOCK_N]: padded windows/channels count 0
        tl.store(psum_ptr + pid_m * Cout + offs_c, tl.sum(bm, axis=0), mask=mask_c)
        tl.store(psumsq_ptr + pid_m * Cout + offs_c, tl.sum(bm * bm, axis=0), mask=mask_c)


def check_pool(pool, Ho, Wo, Cin_g, G, residual, out, dropout_p, save_pre) -> None:
    """A fused max pool's preconditions (conv2d_forward's pool=)."""
    if not isinstance(pool, int) or pool < 2 or pool & (pool - 1) or pool > 4:
        raise ValueError(f"conv2d: pool must be 0 or a power of two in 2..4 (whole windows per tile), got {pool!r}")
    if Ho < pool or Wo < pool:
        raise ValueError(f"conv2d: a {pool}x{pool} pool needs an output of at least {pool}x{pool}, got {Ho}x{Wo}")
    if Cin_g == 1 and G > 1:
        raise ValueError("conv2d: a fused pool needs the GEMM kernel (not a depthwise conv)")
    if residual is not None or out is not None or dropout_p > 0 or save_pre:
        raise ValueError("conv2d: a fused pool takes no residual, out, dropout or save_pre")


__all__ = ["window_rows", "pool_epilogue", "pool_row_order", "check_pool"]
