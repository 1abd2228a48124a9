"""The main loop shared by the conv forward and dgrad kernels: an implicit GEMM
over (kernel tap, channel chunk), shaped for the tensor cores.

Why this shape (read from the sm_90 SASS, docs/PERF_MODEL.md): a Hopper SM
issues 4 warp-instructions per clock and its tensor cores retire ~2,048 bf16
multiply-adds per clock, so a trip of the loop must cost few instructions per
MMA. A reduction flattened over (tap, channel) with per-element div/mod and
2-D masks cost 180-700 instructions per trip; this loop costs 70-150:
- one flat loop over NR*NS taps x CHUNKS channel chunks (so the pipeliner
  overlaps the next tap's loads with this tap's MMAs even when a tap is one
  chunk, as with 64 channels and BLOCK_K 64);
- the tap (jr, js) and chunk c0 are derived from the trip counter with
  constexpr divisors: scalar, uniform arithmetic, no per-element div/mod;
- the A tile is fixed row pointers plus a scalar offset per trip, masked by
  one bit per row of a per-program tap-validity word (padding, image edges);
- the B tile is a TMA copy (W_TMA) or fixed pointers plus a scalar row offset.

Tap (jr, js) reads A at row offset jr*a_rstep + js*a_sstep + c0 and B at row
b_row0 + jr*b_rstep + js*b_sstep + c0. The forward has jr, js = r, s (all
KH x KW taps); dgrad has the taps of one stride phase (NR x NS of them).

Public (jit) API: tap_bits, load_dz (dy -> the operand dz of a fused
activation's gradient), load_pooled (d(pooled) -> the full-res dy of a fused
max pool, in the A load), tap_gemm.
"""
from __future__ import annotations

import triton
import triton.language as tl

from engine.kernels.activations import act_grad
from engine.kernels.common import dot


@triton.jit
def tap_bits(h0, w0, step_h, step_w, H, W, mask_m, NR, NS, KH: tl.constexpr, KW: tl.constexpr):
    """[BLOCK_M] int32 (int64 beyond 32 taps): bit jr*KW + js is set when row m reads a real
    pixel at tap (jr, js), i.e. 0 <= h0 + jr*step_h < H and 0 <= w0 + js*step_w < W
    (jr < NR <= KH, js < NS <= KW). At most 64 taps."""
    if KH * KW > 32:
        bits = tl.zeros_like(h0).to(tl.int64)  # [BLOCK_M]
    else:
        bits = tl.zeros_like(h0).to(tl.int32)  # [BLOCK_M]
    for jr in tl.static_range(KH):
        h = h0 + jr * step_h  # [BLOCK_M]
        h_ok = mask_m & (h >= 0) & (h < H) & (jr < NR)  # [BLOCK_M]
        for js in tl.static_range(KW):
            w = w0 + js * step_w  # [BLOCK_M]
            ok = h_ok & (w >= 0) & (w < W) & (js < NS)  # [BLOCK_M]
            bits |= ok.to(bits.dtype) << (jr * KW + js)
    return bits


@triton.jit
def load_dz(dy_ptr, z_ptr, scale_ptr, off, mask, ch, mask_ch, slope, ACT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Load dy at `off` and turn it into the GEMM operand dz = act'(z) * dy (* scale[ch]).

    `ch` ([C]) are the output channels along axis 1 of the [R, C] tile. Returns fp32.
    Masked lanes give 0 since every act_grad is linear in dy.
    """
    gr = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)  # [R, C] upstream grad
    if ACT != 0:
        zz = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)  # [R, C] pre-activation
        gr = act_grad(gr, zz, ACT, slope)
    if HAS_SCALE:
        # z = acc*scale + ..., so d acc = dz * scale
        gr = gr * tl.load(scale_ptr + ch, mask=mask_ch, other=0.0)[None, :]
    return gr


@triton.jit
def load_pooled(dp_ptr, idx_ptr, h, w, p_n, P_W, p_ld, p_ch, ch, mask, POOL: tl.constexpr):
    """The dy of a conv whose output a fused POOL x POOL / stride POOL max pool reads, at full-res
    pixels (h, w) ([R] each, >= 0 where `mask` holds) and channels `ch` ([C]): dp[n, h//POOL,
    w//POOL, ch] where the pool's saved argmax (engine.kernels.pool's tap code (h%POOL)*POOL +
    w%POOL, one byte) picked this pixel, else 0. dp [N, PH, PW, *] has rows p_ld apart, the
    channel base p_ch; p_n [R] = n*PH. Rows past PH*POOL / PW*POOL must be masked off by the caller.
    Returns [R, C] in dp's dtype; masked lanes give 0."""
    ph = h // POOL  # [R] pooled row (POOL constexpr: shifts for a power of two)
    pw = w // POOL
    tap = (h - ph * POOL) * POOL + (w - pw * POOL)  # [R] the window tap this pixel is
    off = (((p_n + ph) * P_W + pw) * p_ld + p_ch)[:, None] + ch[None, :]  # [R, C]
    g = tl.load(dp_ptr + off, mask=mask, other=0.0)  # [R, C] pooled gradient
    win = tl.load(idx_ptr + off, mask=mask, other=0)  # [R, C] uint8 winning tap
    return tl.where(win.to(tl.int32) == tap[:, None], g, tl.zeros_like(g))


@triton.jit
def tap_gemm(acc, a_base, a_rows, h0, w0, step_h, step_w, H, W, mask_m, b_op, offs_k, mask_n, n_iters, NR, NS,
             c_stored, a_rstep, a_sstep, b_row0, b_rstep, b_sstep, b_ld, col0, z_base, scale_ptr, ch0, slope,
             KH: tl.constexpr, KW: tl.constexpr, CHUNKS: tl.constexpr, TPC: tl.constexpr, EVEN_K: tl.constexpr,
             EVEN_N: tl.constexpr, W_TMA: tl.constexpr, A_ACT: tl.constexpr, A_SCALE: tl.constexpr,
             PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr, W_PAD: tl.constexpr,
             p_idx, p_n, P_W, p_ld, p_ch, A_POOL: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] fp32 += sum over n_iters trips of A(tap, chunk) @ B(tap, chunk).

    A: a_base + a_rows ([BLOCK_M] offsets of tap (0, 0), channel 0) + the channel
    lane + the trip's scalar offset; row m reads a real pixel at tap (jr, js) when
    0 <= h0 + jr*step_h < H and 0 <= w0 + js*step_w < W (h0, w0, mask_m [BLOCK_M]).
    With A_ACT / A_SCALE the operand is dz = act'(z) * a (* scale[ch0 + channel]),
    z read at the same offsets from z_base (dgrad of a fused activation).
    B: a TMA descriptor (W_TMA, block [BLOCK_K, BLOCK_N], read at (row, col0)) or
    the pointer tile [BLOCK_K, BLOCK_N] of row 0 (rows b_ld apart).
    offs_k [BLOCK_K]; mask_n [BLOCK_N]; c_stored: channels per tap (the last chunk
    may be partial unless EVEN_K); NR x NS taps (constexprs or scalars, at most KH x KW).
    TPC > 1: a chunk holds TPC whole taps of c_stored = BLOCK_K // TPC channels each
    (a padded RGB stem: 8 channels, 16-byte vectors of one tap each); then CHUNKS is
    1, taps past NR*NS read zeros, and B's rows must run on linearly across taps
    (b_row0 + it*BLOCK_K + lane: the forward's packing).
    W_PAD (the forward of an input with zero channels appended, c_stored > the weight's
    b_sstep channels per tap): B holds b_sstep rows per tap, and its rows of channels
    c >= b_sstep are masked (they meet A's zero channels). With TPC > 1 b_op's lane k
    must point at row (k // c_stored) * b_sstep + k % c_stored and a trip advances
    TPC * b_sstep rows; no TMA.
    A_POOL (dgrad of a conv with a fused A_POOL x A_POOL max pool; TPC == 1, no A_ACT /
    A_SCALE): A is the pooled gradient a_base [N, PH, PW, *] expanded in the load
    (load_pooled, argmax p_idx; p_n [BLOCK_M] = n*PH, P_W, p_ld, p_ch as there); a_rows
    is unused, and H, W must be PH*A_POOL, PW*A_POOL (dropped rows read as outside).
    """
    if KH * KW <= 64:
        bits = tap_bits(h0, w0, step_h, step_w, H, W, mask_m, NR, NS, KH, KW)  # [BLOCK_M]
    if TPC == 1:
        a_offs = a_rows[:, None] + offs_k[None, :]  # [BLOCK_M, BLOCK_K] offsets of tap (0, 0), chunk 0
    for it in range(0, n_iters):
        if TPC == 1:
            tap = it // CHUNKS  # scalar: constexpr divisor
            c0 = (it - tap * CHUNKS) * BLOCK_K
            jr = tap // NS
            js = tap - jr * NS
            if KH * KW <= 64:
                ok = ((bits >> (jr * KW + js)) & 1) != 0  # [BLOCK_M] rows with a real pixel at this tap
            else:
                h = h0 + jr * step_h  # [BLOCK_M]
                w = w0 + js * step_w  # [BLOCK_M]
                ok = mask_m & (h >= 0) & (h < H) & (w >= 0) & (w < W)  # [BLOCK_M]
            a_off = jr * a_rstep + js * a_sstep + c0  # scalar
            b_row = b_row0 + jr * b_rstep + js * b_sstep + c0  # scalar
            if EVEN_K:
                a_mask = ok[:, None]  # [BLOCK_M, 1]
            else:
                in_k = (c0 + offs_k) < c_stored  # [BLOCK_K] channels of a partial last chunk
                a_mask = ok[:, None] & in_k[None, :]  # [BLOCK_M, BLOCK_K]
            a_idx = a_offs + a_off  # [BLOCK_M, BLOCK_K]
        else:
            # TPC taps per chunk: lane k is tap it*TPC + k // c_stored, channel k % c_stored
            tap_k = it * TPC + offs_k // (BLOCK_K // TPC)  # [BLOCK_K]
            jr_k = tap_k // NS
            js_k = tap_k - jr_k * NS
            ok_k = ((bits[:, None] >> (jr_k * KW + js_k)[None, :]) & 1) != 0  # [BLOCK_M, BLOCK_K]
            a_mask = ok_k & (tap_k < NR * NS)[None, :]
            lane = jr_k * a_rstep + js_k * a_sstep + offs_k % (BLOCK_K // TPC)  # [BLOCK_K]
            a_idx = a_rows[:, None] + lane[None, :]  # [BLOCK_M, BLOCK_K]
            c0 = 0
            if W_PAD:
                b_row = b_row0 + it * (TPC * b_sstep)  # scalar: b_sstep weight rows per tap
            else:
                b_row = b_row0 + it * BLOCK_K  # scalar: rows run on linearly across taps
        if A_POOL > 0:
            a = load_pooled(a_base, p_idx, h0 + jr * step_h, w0 + js * step_w, p_n, P_W, p_ld, p_ch,
                            c0 + offs_k, a_mask, A_POOL)  # [BLOCK_M, BLOCK_K] expanded dy
        elif A_ACT != 0 or A_SCALE:
            a = load_dz(a_base, z_base, scale_ptr, a_idx, a_mask, ch0 + c0 + offs_k,
                        (c0 + offs_k) < c_stored, slope, A_ACT, A_SCALE)  # [BLOCK_M, BLOCK_K] fp32 dz
        else:
            a = tl.load(a_base + a_idx, mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K]
        if W_TMA:
            # one TMA copy; past the edges it reads zeros, and rows of the next tap in a
            # partial chunk meet the zeroed A channels above
            b = b_op.load([b_row, col0])  # [BLOCK_K, BLOCK_N]
        elif TPC > 1 and W_PAD:
            # [BLOCK_K] lanes of real taps and of the weight's channels (loop-invariant but the taps)
            in_rows = (tap_k < NR * NS) & ((offs_k % (BLOCK_K // TPC)) < b_sstep)
            b = tl.load(b_op + b_row * b_ld, mask=in_rows[:, None] & mask_n[None, :], other=0.0)
        elif TPC > 1:
            in_rows = (b_row - b_row0 + offs_k) < NR * NS * c_stored  # [BLOCK_K] rows of real taps
            b = tl.load(b_op + b_row * b_ld, mask=in_rows[:, None] & mask_n[None, :], other=0.0)
        elif W_PAD:
            in_w = (c0 + offs_k) < b_sstep  # [BLOCK_K] the weight's channels of this chunk
            b = tl.load(b_op + b_row * b_ld, mask=in_w[:, None] & mask_n[None, :], other=0.0)
        elif EVEN_K and EVEN_N:
            b = tl.load(b_op + b_row * b_ld)  # [BLOCK_K, BLOCK_N]
        elif EVEN_K:
            b = tl.load(b_op + b_row * b_ld, mask=mask_n[None, :], other=0.0)
        else:
            b = tl.load(b_op + b_row * b_ld, mask=in_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot(a.to(b.dtype), b, acc, PRECISION, UPCAST)
    return acc


__all__ = ["tap_bits", "load_dz", "load_pooled", "tap_gemm"]
