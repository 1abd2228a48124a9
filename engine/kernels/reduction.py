"""Deterministic split reductions of fp32 partials, the second stage of every split reduction.

A kernel that splits a reduction writes fp32 partials (rows [T, C], or split slices [S, L]);
their sum is taken in a FIXED order, so results are bit-identical run to run:

* in the kernel itself, by the last of a group of programs to finish (`last_to_arrive` on an
  int32 ticket counter from `ticket_counters`; the arrival order decides which program adds,
  never the order of the additions): `sum_row_range` (partial rows), `sum_slices` (splits),
  `fold_rows` (a fold's row block);
* or by a second launch: `sum_partials` (column sums), after `fold_partials` for tall
  partials (more than common.FOLD_ROWS rows, folded in parallel first).

Tunables (GPU_TARGET_PARTIALS, FOLD_ROWS, the interpreter's tiles) are common's, read at call
time so tests can shrink them.

Public API: ticket_counters, MIN_TICKETS, TAIL_ELEMS, fold_tail_buffers, fold_plan, fold_partials,
sum_partials; device: last_to_arrive, fold_tail, sum_slices, sum_row_range, fold_rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine import device as _device
from engine.kernels import common
from engine.kernels.common import channel_block, next_pow2, reduce_rows
from engine.kernels.launch import launch


@triton.jit
def sum_row_range(pa_ptr, pb_ptr, lo, hi, C, cols, cmask, HAS_B: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """Column sums of rows lo .. hi-1 of the contiguous fp32 [*, C] arrays pa (and pb if HAS_B; zeros
    otherwise) at columns `cols` ([BLOCK_C], masked by `cmask`): (sa, sb), each [BLOCK_C] fp32, in
    common.reduce_rows' fixed order. Both arrays' tiles are loaded in the same trip, so their loads
    are in flight together."""
    acc_a = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)  # [BLOCK_T, BLOCK_C] fp32
    acc_b = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)  # [BLOCK_T, BLOCK_C] fp32
    for t0 in range(lo, hi, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]  # [BLOCK_T, BLOCK_C]
        m = (rows[:, None] < hi) & cmask[None, :]
        acc_a += tl.load(pa_ptr + offs, mask=m, other=0.0)
        if HAS_B:
            acc_b += tl.load(pb_ptr + offs, mask=m, other=0.0)
    return tl.sum(acc_a, axis=0), tl.sum(acc_b, axis=0)




# --------------------------------------------------------------------------- #
# Ticket counters: the last program of a split reduction finishes it in place
# --------------------------------------------------------------------------- #
# A kernel that writes fp32 partials can reduce them itself instead of a second
# launch: each program of a group stores its partial, then draws a ticket from the
# group's int32 counter (`last_to_arrive`); the one drawing the last ticket has every
# partial of its group visible, adds them in a FIXED order (deterministic: the
# arrival order only decides who adds, never how), and resets the counter to 0.
# The counters are one persistent zero-initialised workspace per device, shared by
# every such kernel (launches on a stream are ordered and each leaves its counters
# at 0): no fill per step, nothing allocated in a CUDA graph once it is warm.
MIN_TICKETS = 4096
# The last-arriving program's sum of a channel block's partial rows walks [BLOCK_T, BLOCK_C] tiles of
# both arrays at once (their loads in flight together), this many elements each: within the main
# loop's registers on sm_90 (4096 spilled the 128x32 bn backward reduce variant: 255 registers, 8 B).
TAIL_ELEMS = 2048
_tickets: dict[torch.device, torch.Tensor] = {}


def ticket_counters(device, n: int) -> torch.Tensor:
    """int32 [n] counters on `device`, 0 between launches (see `last_to_arrive`)."""
    key = torch.device(device)
    buf = _tickets.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(next_pow2(max(n, MIN_TICKETS)), device=key, dtype=torch.int32)
        _tickets[key] = buf
    return buf[:n]


@triton.jit
def last_to_arrive(ctr_ptr, n):
    """True in the one program of a group of `n` (sharing the int32 counter `ctr_ptr`) that arrives
    last, after every program of the group stored its partial; that program then sees those
    stores. The last one resets the counter to 0 for the next launch. Every program of the group
    must call it exactly once."""
    tl.debug_barrier()  # all threads of this program have issued their partial stores
    # acq_rel at GPU scope: releases this program's stores (bar.sync above orders its other
    # threads' ones before), acquires every earlier arrival's
    ticket = tl.atomic_add(ctr_ptr, 1, sem="acq_rel", scope="gpu")  # scalar int32: tickets drawn before
    last = ticket == n - 1
    tl.atomic_xchg(ctr_ptr, 0, mask=last)
    return last


@triton.jit
def fold_tail(pa_ptr, pb_ptr, fa_ptr, fb_ptr, ctr_ptr, row, T, R, C, cblock, n_cblocks, cols, cmask,
              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """The column sums of two fp32 [T, C] partial arrays, finished in place by the programs that wrote
    them: call after storing row `row` of channel block `cblock` (of n_cblocks; columns `cols`). Rows
    fold in groups of R: the last program of a group to arrive sums its rows into fold row row // R
    (fa/fb, [cdiv(T, R), C]), and the last group to finish sums the fold rows, all in a fixed order.
    Returns (done, sa, sb): done in that one program per channel block, with the sums ([BLOCK_C] fp32
    each; zeros elsewhere). ctr: int32 [(cdiv(T, R) + 1) * n_cblocks] tickets at 0 (ticket_counters).
    Every program of the launch must call it once."""
    done = row < 0  # a scalar False
    sa = tl.zeros([BLOCK_C], dtype=tl.float32)
    sb = tl.zeros([BLOCK_C], dtype=tl.float32)
    fold = row // R
    T2 = (T + R - 1) // R
    if last_to_arrive(ctr_ptr + fold * n_cblocks + cblock, tl.minimum(T - fold * R, R)):
        fold_rows(pa_ptr, pb_ptr, fa_ptr, fb_ptr, fold, T, C, R, cols, cmask, True, BLOCK_T, BLOCK_C)
        if last_to_arrive(ctr_ptr + T2 * n_cblocks + cblock, T2):
            sa, sb = sum_row_range(fa_ptr, fb_ptr, 0, T2, C, cols, cmask, True, BLOCK_T, BLOCK_C)
            done = row >= 0
    return done, sa, sb


def fold_tail_buffers(T: int, C: int, block_c: int, device, extra_tickets: int = 0) -> tuple:
    """Scratch of `fold_tail` for T partial rows of C channels in blocks of block_c: (fa, fb [T2, C],
    tickets (+ `extra_tickets` after fold_tail's), R, BLOCK_T); T2 = cdiv(T, R) <= GPU_TARGET_PARTIALS
    (one fold of every row when T <= FOLD_ROWS)."""
    R = T if T <= common.FOLD_ROWS else fold_plan(T, C)[0]
    T2 = triton.cdiv(T, R)
    nb = triton.cdiv(C, block_c)
    f32 = dict(device=device, dtype=torch.float32)
    return (torch.empty((T2, C), **f32), torch.empty((T2, C), **f32),
            ticket_counters(device, (T2 + 1) * nb + extra_tickets), R,
            common.rows_block(max(R, T2), block_c, TAIL_ELEMS))


@triton.jit
def sum_slices(p_ptr, offs, mask, S, stride):
    """sum over s = 0, 1, ..., S-1 in that order of p[s*stride + offs] (fp32, masked): a tile of the sum
    of S split partials, the shape of `offs`."""
    acc = tl.zeros(offs.shape, dtype=tl.float32)
    ptrs = p_ptr + offs  # split 0; 64-bit pointers step by `stride` (S*stride may pass 2**31)
    # unrolled: several splits' loads in flight at once (one program reads them all, so its memory
    # parallelism is the tail's speed); the adds stay in split order
    for _ in tl.range(0, S, loop_unroll_factor=4):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += stride
    return acc


# --------------------------------------------------------------------------- #
# Deterministic second-stage reduction: column sums of fp32 partials
# --------------------------------------------------------------------------- #
@triton.jit
def _sum_partials_kernel(
    pa_ptr,  # [T, C] fp32 partials
    pb_ptr,  # [T, C] fp32 partials (if HAS_B)
    oa_ptr,  # [C] fp32 out
    ob_ptr,  # [C] fp32 out (if HAS_B)
    T, C,
    HAS_B: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, cmask = channel_block(tl.program_id(0), C, BLOCK_C)  # [BLOCK_C] each
    sa = reduce_rows(pa_ptr, T, C, cols, cmask, BLOCK_T, BLOCK_C)  # [BLOCK_C] fp32
    tl.store(oa_ptr + cols, sa, mask=cmask)
    if HAS_B:
        sb = reduce_rows(pb_ptr, T, C, cols, cmask, BLOCK_T, BLOCK_C)  # [BLOCK_C] fp32
        tl.store(ob_ptr + cols, sb, mask=cmask)


@triton.jit
def fold_rows(pa_ptr, pb_ptr, oa_ptr, ob_ptr, row, T, C, R, cols, cmask,
              HAS_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row `row` of the fold: oa[row] = sum of pa rows row*R .. row*R + R - 1 (< T) at columns `cols`, in a fixed
    order (pb into ob alike if HAS_B); pa/pb [T, C], oa/ob [T2, C] fp32."""
    lo = row * R
    sa, sb = sum_row_range(pa_ptr, pb_ptr, lo, tl.minimum(T, lo + R), C, cols, cmask, HAS_B, BLOCK_T,
                           BLOCK_C)  # [BLOCK_C] each
    out = row.to(tl.int64) * C + cols  # [BLOCK_C]
    tl.store(oa_ptr + out, sa, mask=cmask)
    if HAS_B:
        tl.store(ob_ptr + out, sb, mask=cmask)


@triton.jit
def _fold_partials_kernel(
    pa_ptr,  # [T, C] fp32 partials
    pb_ptr,  # [T, C] fp32 partials (if HAS_B)
    oa_ptr,  # [T2, C] fp32 out: sums of R consecutive rows
    ob_ptr,  # [T2, C] fp32 out (if HAS_B)
    T, C, R,
    HAS_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Row block pid_t of the fold: rows pid_t*R .. pid_t*R + R - 1, in a fixed order."""
    cols, cmask = channel_block(tl.program_id(1), C, BLOCK_C)  # [BLOCK_C] each
    fold_rows(pa_ptr, pb_ptr, oa_ptr, ob_ptr, tl.program_id(0), T, C, R, cols, cmask, HAS_B, BLOCK_T, BLOCK_C)


def fold_plan(T: int, C: int, rows: int | None = None) -> tuple[int, int, int, int]:
    """(R, T2, BLOCK_T, BLOCK_C) of a fold of [T, C] partials to T2 <= `rows` (GPU_TARGET_PARTIALS) rows
    of R input rows each."""
    R = triton.cdiv(T, max(1, rows if rows is not None else common.GPU_TARGET_PARTIALS))
    T2 = triton.cdiv(T, R)
    bc = max(4, min(next_pow2(C), 64 if not _device.INTERPRETED else common.INTERP_MAX_BLOCK_C))
    bt = max(1, min(next_pow2(R), 2048 // bc if not _device.INTERPRETED else common.INTERP_TILE // bc))
    return R, T2, bt, bc


def fold_partials(pa: torch.Tensor, pb: torch.Tensor | None = None, rows: int | None = None):
    """fp32 [T, C] partials (and pb alike) -> [T2, C] with T2 <= `rows`: each output row the sum of
    consecutive input rows in a fixed order, programs in parallel over row blocks and channels."""
    T, C = pa.shape
    R, T2, bt, bc = fold_plan(T, C, rows)
    oa = torch.empty((T2, C), device=pa.device, dtype=torch.float32)
    ob = torch.empty((T2, C), device=pa.device, dtype=torch.float32) if pb is not None else None
    launch(_fold_partials_kernel, (T2, triton.cdiv(C, bc)), pa, pb if pb is not None else pa, oa,
           ob if ob is not None else oa, T, C, R, HAS_B=pb is not None, BLOCK_T=bt, BLOCK_C=bc, num_warps=4)
    return oa if pb is None else (oa, ob)


def sum_partials(pa: torch.Tensor, pb: torch.Tensor | None = None, *, block: int | None = None,
                 out: torch.Tensor | None = None):
    """Column sums of fp32 [T, C] partials in a fixed order -> [C] fp32 (or a pair).

    By default a program folds [BLOCK_T, BLOCK_C] tiles of rows (finalize_plan)
    and tree-sums the tile last: for tall partials (the row-tile sums of a
    reduction over M rows). `block=B`: B columns per program taken one row at a
    time, a plain running sum per column: for wide partials (the split-K slices
    of a weight gradient, C = its size). `out`: a contiguous fp32 [C] tensor to
    write pa's sums into (e.g. a gradient's slot in the optimizer's flat buffer)."""
    for name, p in (("pa", pa), ("pb", pb)):
        if p is None:
            continue
        if p.dtype != torch.float32 or p.dim() != 2 or not p.is_contiguous():
            raise ValueError(f"{name} must be a contiguous fp32 [T, C] tensor, got {p.dtype} {tuple(p.shape)}")
    if pb is not None and pb.shape != pa.shape:
        raise ValueError(f"partials differ in shape: {tuple(pa.shape)} vs {tuple(pb.shape)}")
    if block is None and pa.shape[0] > common.FOLD_ROWS and not _device.INTERPRETED:
        folded = fold_partials(pa, pb)
        pa, pb = (folded, None) if pb is None else folded
    T, C = pa.shape
    if out is not None and (out.shape != (C,) or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous fp32 [{C}] tensor, got {out.dtype} {tuple(out.shape)}")
    oa = out if out is not None else torch.empty(C, device=pa.device, dtype=torch.float32)
    ob = torch.empty(C, device=pa.device, dtype=torch.float32) if pb is not None else None
    bt, bc, nw = common.finalize_plan(T, C) if block is None else (1, block, 4)
    launch(
        _sum_partials_kernel, (triton.cdiv(C, bc),),
        pa, pb if pb is not None else pa, oa, ob if ob is not None else oa, T, C,
        HAS_B=pb is not None, BLOCK_T=bt, BLOCK_C=bc, num_warps=nw,
    )
    return oa if pb is None else (oa, ob)
