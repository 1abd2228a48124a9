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

Public (jit) API: tap_bits, pool_tap_bits (the taps of a fused max pool's
dgrad), load_dz (dy -> the operand dz of a fused activation's gradient), tap_gemm.
"""
from __future__ import annotations

import triton
import triton.language as tl

from engine.kernels.activations import act_grad
from engine.kernels.common import dot


@triton.jit
def _in_range(v, n):
    """0 <= v < n for a signed v and n >= 0: one unsigned compare (a negative v wraps past n)."""
    if v.dtype.primitive_bitwidth == 64:
        return v.to(tl.uint64, bitcast=True) < n.to(tl.uint64)
    else:
        return v.to(tl.uint32, bitcast=True) < n.to(tl.uint32)


@triton.jit
def tap_bits(h0, w0, step_h, step_w, H, W, mask_m, NR, NS, KH: tl.constexpr, KW: tl.constexpr):
    """[BLOCK_M] int32 (int64 beyond 32 taps): bit jr*KW + js is set when row m reads a real
    pixel at tap (jr, js), i.e. 0 <= h0 + jr*step_h < H and 0 <= w0 + js*step_w < W
    (jr < NR <= KH, js < NS <= KW). At most 64 taps.

    Each bounds test is one unsigned compare (_in_range): airbench94's 256-row dgrad prologue
    1,718 -> 1,597 instructions. (Building a column word once and selecting it per tap row cut it to
    1,320 but made ptxas spill 40 B in a 64x32 sm_80 forward.)"""
    if KH * KW > 32:
        bits = tl.zeros_like(h0).to(tl.int64)  # [BLOCK_M]
    else:
        bits = tl.zeros_like(h0).to(tl.int32)  # [BLOCK_M]
    for jr in tl.static_range(KH):
        ok_h = mask_m & _in_range(h0 + jr * step_h, H) & (jr < NR)  # [BLOCK_M]
        for js in tl.static_range(KW):
            ok = ok_h & _in_range(w0 + js * step_w, W) & (js < NS)  # [BLOCK_M]
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
def _floor_div(e, K: tl.constexpr):
    """floor(e / K) of a scalar that may be negative (K a positive constexpr, e > -1024*K)."""
    return (e + 1024 * K) // K - 1024


@triton.jit
def pool_tap_bits(q_h, q_w, e0_h, e0_w, step_h, step_w, PH, PW, mask_m, NR, NS, KH: tl.constexpr,
                  KW: tl.constexpr, POOL: tl.constexpr):
    """tap_bits for a dgrad that reads the pooled gradient of a fused POOL x POOL max pool: tap
    (jr, js) reads the full-res dy row K*q_h + e_h (e_h = e0_h + jr*step_h, a scalar), i.e. pooled
    row q_h + floor(e_h / POOL); bit jr*KW + js is set when that pooled pixel is inside [PH, PW]
    (the rows a floor-mode pool dropped are outside). q_h, q_w, mask_m [BLOCK_M]."""
    if KH * KW > 32:
        bits = tl.zeros_like(q_h).to(tl.int64)  # [BLOCK_M]
    else:
        bits = tl.zeros_like(q_h).to(tl.int32)  # [BLOCK_M]
    for jr in tl.static_range(KH):
        ok_h = mask_m & _in_range(q_h + _floor_div(e0_h + jr * step_h, POOL), PH) & (jr < NR)  # [BLOCK_M]
        for js in tl.static_range(KW):
            ok = ok_h & _in_range(q_w + _floor_div(e0_w + js * step_w, POOL), PW) & (js < NS)  # [BLOCK_M]
            bits |= ok.to(bits.dtype) << (jr * KW + js)
    return bits


@triton.jit
def tap_gemm(acc, a_base, a_rows, h0, w0, step_h, step_w, H, W, mask_m, b_op, offs_k, mask_n, n_iters, NR, NS,
             c_stored, a_rstep, a_sstep, b_row0, b_rstep, b_sstep, b_ld, col0, z_base, scale_ptr, ch0, slope,
             KH: tl.constexpr, KW: tl.constexpr, CHUNKS: tl.constexpr, TPC: tl.constexpr, EVEN_K: tl.constexpr,
             EVEN_N: tl.constexpr, W_TMA: tl.constexpr, A_ACT: tl.constexpr, A_SCALE: tl.constexpr,
             PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr, W_PAD: tl.constexpr,
             p_idx, p_e0h, p_e0w, A_POOL: tl.constexpr, IN_BOUNDS: tl.constexpr):
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
    A_SCALE, KH*KW <= 64): A is the pooled gradient [N, PH, PW, *] with the forward's argmax
    p_idx (one byte, tap code dy*A_POOL + dx) at the same offsets, expanded in the load. The
    rows are dx pixels of one (stride phase, pool phase): tap (jr, js) reads full-res dy row
    A_POOL*h0 + e_h (e_h = p_e0h + jr*step_h, scalar), i.e. pooled row h0 + floor(e_h/A_POOL)
    where the argmax equals (e_h mod A_POOL)*A_POOL + (e_w mod A_POOL): a scalar offset
    (a_rstep, a_sstep: per pooled row / column) and a scalar tap code per trip, as in the
    plain loop. H, W are PH, PW.
    IN_BOUNDS (TPC > 1): every tap of a real row reads a real pixel (the forward of an unpadded
    conv), so A's mask is the row's and the lane's tap, no per-row tap bits: airbench94's 2x2 stem
    forward read 132 -> 127 loop instructions (issue/tensor 1.03 -> 0.99), 1,709 -> 1,489 in all.
    """
    if A_POOL > 0:
        bits = pool_tap_bits(h0, w0, p_e0h, p_e0w, step_h, step_w, H, W, mask_m, NR, NS, KH, KW,
                             A_POOL)  # [BLOCK_M]
    elif KH * KW <= 64 and not (IN_BOUNDS and TPC > 1):
        bits = tap_bits(h0, w0, step_h, step_w, H, W, mask_m, NR, NS, KH, KW)  # [BLOCK_M]
    if TPC == 1:
        a_offs = a_rows[:, None] + offs_k[None, :]  # [BLOCK_M, BLOCK_K] offsets of tap (0, 0), chunk 0
    else:
        a_row_ptrs = a_base + a_rows  # [BLOCK_M] 64-bit row pointers: a lane adds a 32-bit offset
    jr_next = 0  # the tap of a trip when a tap is one chunk: stepped, not divided
    js_next = 0
    for it in range(0, n_iters):
        if TPC == 1:
            if CHUNKS == 1:
                c0 = 0
                jr = jr_next
                js = js_next
            else:
                tap = it // CHUNKS  # scalar: constexpr divisor
                c0 = (it - tap * CHUNKS) * BLOCK_K
                jr = tap // NS
                js = tap - jr * NS
            if KH * KW <= 64:
                # [BLOCK_M] rows with a real pixel at this tap: one AND with the tap's (scalar) bit
                # sets the predicate, where shifting each row's word took two instructions a row
                if KH * KW > 32:
                    bit = tl.full((), 1, tl.int64) << (jr * KW + js).to(tl.int64)
                else:
                    bit = 1 << (jr * KW + js)
                ok = (bits & bit) != 0
            else:
                h = h0 + jr * step_h  # [BLOCK_M]
                w = w0 + js * step_w  # [BLOCK_M]
                ok = mask_m & (h >= 0) & (h < H) & (w >= 0) & (w < W)  # [BLOCK_M]
            if A_POOL > 0:
                e_h = p_e0h + jr * step_h  # scalar: full-res dy row of this tap, minus A_POOL*h0
                e_w = p_e0w + js * step_w
                f_h = _floor_div(e_h, A_POOL)  # scalar pooled row offset
                f_w = _floor_div(e_w, A_POOL)
                win_tap = (e_h - f_h * A_POOL) * A_POOL + (e_w - f_w * A_POOL)  # scalar argmax code read here
                a_off = f_h * a_rstep + f_w * a_sstep + c0  # scalar
            else:
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
            if IN_BOUNDS:
                a_mask = mask_m[:, None] & (tap_k < NR * NS)[None, :]  # [BLOCK_M, BLOCK_K]
            else:
                # each lane's tap bit, 0 past the last tap: one AND per element gives the mask (shifting
                # every row's word and a separate tap check took three instructions a load on sm_90)
                if KH * KW > 32:
                    bit_k = tl.full((BLOCK_K,), 1, tl.int64) << (jr_k * KW + js_k).to(tl.int64)  # [BLOCK_K]
                else:
                    bit_k = 1 << (jr_k * KW + js_k)  # [BLOCK_K]
                bit_k = tl.where(tap_k < NR * NS, bit_k, 0)
                a_mask = (bits[:, None] & bit_k[None, :]) != 0  # [BLOCK_M, BLOCK_K]
            lane = jr_k * a_rstep + js_k * a_sstep + offs_k % (BLOCK_K // TPC)  # [BLOCK_K]
            a_idx = a_rows[:, None] + lane[None, :]  # [BLOCK_M, BLOCK_K]
            c0 = 0
            if W_PAD:
                b_row = b_row0 + it * (TPC * b_sstep)  # scalar: b_sstep weight rows per tap
            else:
                b_row = b_row0 + it * BLOCK_K  # scalar: rows run on linearly across taps
        if A_POOL > 0:
            a = tl.load(a_base + a_idx, mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K] pooled gradient
            won = tl.load(p_idx + a_idx, mask=a_mask, other=0)  # [BLOCK_M, BLOCK_K] uint8 argmax
            a = tl.where(won == win_tap.to(tl.uint8), a, tl.zeros_like(a))  # the full-res dy
        elif A_ACT != 0 or A_SCALE:
            a = load_dz(a_base, z_base, scale_ptr, a_idx, a_mask, ch0 + c0 + offs_k,
                        (c0 + offs_k) < c_stored, slope, A_ACT, A_SCALE)  # [BLOCK_M, BLOCK_K] fp32 dz
        else:
            if TPC == 1:
                a = tl.load(a_base + a_idx, mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K]
            else:
                a = tl.load(a_row_ptrs[:, None] + lane[None, :], mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K]
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
        if TPC == 1 and CHUNKS == 1:
            js_next = js + 1
            wrap = js_next >= NS
            js_next = tl.where(wrap, 0, js_next)
            jr_next = tl.where(wrap, jr + 1, jr)
    return acc


__all__ = ["tap_bits", "pool_tap_bits", "load_dz", "tap_gemm"]
