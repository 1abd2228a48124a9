"""Host and device helpers shared by the kernel modules.

Whatever more than one kernel module needs lives here, under a public name: a
kernel module imports from here (or from activations/launch/autotune), never a
sibling's private names. Nothing here launches a kernel except `scale_by_device_scalar`; the
deterministic split reductions (sum_partials, fold_partials, the ticket counters of last_to_arrive)
are engine.kernels.reduction's.

Host:
    FLOAT_DTYPES, next_pow2, prev_pow2, pair, contiguous, act_code_checked
    checks        check_activation, check_like, check_nhwc, check_grad, check_param
    [M, C] rows   rows_of, block_1d (flat), tile_2d, reduce_plan, finalize_plan, rows_block
    pixels        pixel_tiles, pixel_grid, idx64 (int64 index math switch)
    GEMMs         precision (tf32 / ieee), upcast (bf16 under the interpreter)
Device (@triton.jit):
    channel_block, row_tile, reduce_rows, store_partial_row, pixel_tile, pixel_nhw, dot

Tile budgets are module constants (elements per program) so tests can shrink
them to force several row/channel blocks on small tensors.
"""
from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

from engine import device as _device
from engine.kernels.activations import act_code
from engine.kernels.launch import launch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_MAX = 2**31 - 1

INTERP_BLOCK_1D = 1 << 16
INTERP_TILE = 1 << 16
INTERP_MAX_BLOCK_C = 4096
GPU_BLOCK_1D = 1024
GPU_TILE = 4096
GPU_MAX_BLOCK_C = 128
# Split reductions: aim for about this many row-partials on the GPU.
GPU_TARGET_PARTIALS = 256
# Partials taller than this are first folded in parallel (fold_partials) to about
# GPU_TARGET_PARTIALS rows, so no second pass walks thousands of rows in one program
# (a conv epilogue's per-tile batch-norm sums: 7,688 rows for airbench's stem).
FOLD_ROWS = 512


# --------------------------------------------------------------------------- #
# Numbers and arguments
# --------------------------------------------------------------------------- #
def next_pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """The smallest power of two >= n (1 for n <= 1), clamped to [lo, hi]."""
    p = 1 << (max(1, int(n)) - 1).bit_length()
    if hi is not None:
        p = min(p, hi)
    return max(lo, p)


def prev_pow2(n: int) -> int:
    """The largest power of two <= n (1 for n <= 1)."""
    return 1 << (max(1, int(n)).bit_length() - 1)


def pair(v, what: str) -> tuple[int, int]:
    """(a, b) from an int or a pair of ints; a ValueError naming `what` otherwise."""
    items = (v, v) if isinstance(v, int) else v
    try:
        a, b = (operator.index(i) for i in items)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an int or a pair of ints, got {v!r}") from None
    return a, b


def act_code_checked(act) -> int:
    """The constexpr code of activation `act` (a name); ValueError otherwise."""
    if not isinstance(act, str):
        raise ValueError(f"act must be an activation name, got {act!r}")
    return act_code(act)


def contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


# --------------------------------------------------------------------------- #
# Tensor checks
# --------------------------------------------------------------------------- #
def check_activation(x, name: str = "x") -> None:
    """Raise ValueError unless x is a fp32/fp16/bf16 tensor with at least one dimension."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (channels last), got a scalar")


def check_like(a, b, what: str, names: tuple[str, str] = ("a", "b"), same_dtype: bool = True) -> None:
    """check_activation on both, and: one shape (no broadcasting), one device, one dtype if same_dtype."""
    check_activation(a, names[0])
    check_activation(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)} (no broadcasting)")
    if same_dtype and a.dtype != b.dtype:
        raise ValueError(f"{what}: dtypes differ, {a.dtype} vs {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{what}: devices differ, {a.device} vs {b.device}")


def check_nhwc(x, name: str = "x", ndim: int = 4) -> None:
    """check_activation, and: `ndim` dimensions (NHWC, or NC for ndim=2), contiguous, not empty."""
    check_activation(x, name)
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D ({'NHWC' if ndim == 4 else 'NC'}), got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (NHWC), got strides {x.stride()}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")


def check_grad(dy, shape, name: str = "dy") -> torch.Tensor:
    """dy made contiguous and checked like check_nhwc, with the op's output `shape`."""
    dy = dy.contiguous()
    check_nhwc(dy, name, len(shape))
    if tuple(dy.shape) != tuple(shape):
        raise ValueError(f"{name} {tuple(dy.shape)} does not match the output shape {tuple(shape)}")
    return dy


def check_param(p, C: int, x: torch.Tensor, name: str, optional: bool = False) -> None:
    """A per-channel fp32 parameter/statistic of shape [C] on x's device (None allowed if optional)."""
    if p is None and optional:
        return
    if not isinstance(p, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
    if p.dtype != torch.float32:
        raise ValueError(f"{name} must be float32 (parameters and statistics are fp32), got {p.dtype}")
    if p.dim() != 1 or p.shape[0] != C:
        raise ValueError(f"{name} must have shape [{C}] (channels of x), got {tuple(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if not p.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


# --------------------------------------------------------------------------- #
# Tile plans: flat vectors and [M, C] rows (channels last)
# --------------------------------------------------------------------------- #
def rows_of(x: torch.Tensor) -> tuple[int, int]:
    """(M, C) of a channels-last tensor viewed as [M, C] rows."""
    C = x.shape[-1]
    M = x.numel() // C if C else 0
    return M, C


def block_1d(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a flat elementwise kernel over n elements."""
    if _device.INTERPRETED:
        return max(16, min(INTERP_BLOCK_1D, next_pow2(n))), 4
    return GPU_BLOCK_1D, 4


def tile_2d(M: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for a [rows, channels] tile."""
    if _device.INTERPRETED:
        bc = min(next_pow2(C), INTERP_MAX_BLOCK_C, INTERP_TILE)
        bm = max(1, min(next_pow2(M), INTERP_TILE // bc))
        return bm, bc, 4
    bc = max(4, min(next_pow2(C), GPU_MAX_BLOCK_C))
    bm = max(1, min(GPU_TILE // bc, next_pow2(M)))
    return bm, bc, 4


def reduce_plan(M: int, C: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_C, N_ITER, T, num_warps) for a split row reduction: each
    program reduces N_ITER*BLOCK_M rows x BLOCK_C channels and writes one fp32
    partial row; T = number of partial rows."""
    bm, bc, nw = tile_2d(M, C)
    tiles = triton.cdiv(M, bm)
    if _device.INTERPRETED:
        n_iter = 1
    else:
        n_iter = max(1, triton.cdiv(tiles, GPU_TARGET_PARTIALS))
        n_iter = min(n_iter, 64)
    T = triton.cdiv(tiles, n_iter)
    return bm, bc, n_iter, T, nw


def finalize_plan(T: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_C, num_warps) for kernels that reduce [T, C] partials."""
    if _device.INTERPRETED:
        bc = min(next_pow2(C), INTERP_MAX_BLOCK_C, INTERP_TILE)
    else:
        bc = max(4, min(next_pow2(C), 32))
    return rows_block(T, bc), bc, 4


def rows_block(T: int, block_c: int, elems: int = 2048) -> int:
    """BLOCK_T of a `reduce_rows` over T partial rows at block_c columns (an `elems`-element tile on the GPU)."""
    return max(1, min(next_pow2(T), (INTERP_TILE if _device.INTERPRETED else elems) // block_c))


# --------------------------------------------------------------------------- #
# [pixels, channels] tiles of NHWC tensors (pooling, resampling)
# --------------------------------------------------------------------------- #
def pixel_tiles(P: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) for a [pixels, channels] tile."""
    if _device.INTERPRETED:
        # Few, fat programs: the interpreter pays per program and per op.
        block_c = min(next_pow2(C), 512)
        block_p = min(max(1, 16384 // block_c), next_pow2(P))
        return block_p, block_c, 4
    block_c = min(next_pow2(C), 64)
    block_p = max(16, 1024 // block_c)
    return block_p, block_c, 4


def pixel_grid(P: int, C: int) -> tuple[tuple[int, int], dict]:
    """(grid, launch options) of a kernel tiling [P pixels, C channels] with pixel_tile:
    grid (P tiles, C tiles) and BLOCK_P, BLOCK_C, num_warps."""
    bp, bc, nw = pixel_tiles(P, C)
    return (triton.cdiv(P, bp), triton.cdiv(C, bc)), dict(BLOCK_P=bp, BLOCK_C=bc, num_warps=nw)


def idx64(*tensors: torch.Tensor) -> bool:
    """64-bit index math when offsets could overflow int32. Always under the interpreter: it checks
    every int32 add/mul for overflow (slow) but not int64 ones, so int64 is ~2x faster there."""
    return _device.INTERPRETED or any(t.numel() > INT32_MAX for t in tensors)


# --------------------------------------------------------------------------- #
# GEMM operands
# --------------------------------------------------------------------------- #
def precision(allow_tf32: bool) -> str:
    """The PRECISION constexpr of `dot`: tl.dot's input_precision."""
    return "tf32" if allow_tf32 else "ieee"


def upcast(dtype: torch.dtype) -> bool:
    """The UPCAST constexpr of `dot`: only for bf16 under the interpreter."""
    return bool(_device.INTERPRETED) and dtype == torch.bfloat16


# --------------------------------------------------------------------------- #
# Device helpers
# --------------------------------------------------------------------------- #
@triton.jit
def channel_block(pid_c, C, BLOCK_C: tl.constexpr):
    """Channels pid_c*BLOCK_C ... of C: (cols, cmask), both [BLOCK_C]."""
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    return cols, cols < C


@triton.jit
def row_tile(tile, M, C, cols, cmask, BLOCK_M: tl.constexpr):
    """Row tile `tile` (rows tile*BLOCK_M ...) of a contiguous [M, C] array at
    columns `cols` ([BLOCK_C], masked by `cmask`): (mask, offs), both
    [BLOCK_M, BLOCK_C], offsets in int64 so M*C may pass 2**31."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    mask = (rows[:, None] < M) & cmask[None, :]  # [BLOCK_M, BLOCK_C]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]  # [BLOCK_M, BLOCK_C]
    return mask, offs


@triton.jit
def reduce_rows(p_ptr, T, C, cols, cmask, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum rows 0..T-1 of a contiguous fp32 [T, C] array at columns `cols`
    ([BLOCK_C] int, masked by `cmask`). Deterministic: fixed loop order, fixed
    tree reduction (with BLOCK_T = 1, a plain running sum per column). Returns
    [BLOCK_C] fp32."""
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)  # [BLOCK_T, BLOCK_C] fp32
    for t0 in range(0, T, BLOCK_T):
        trows = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        offs = trows[:, None].to(tl.int64) * C + cols[None, :]  # [BLOCK_T, BLOCK_C]
        m = (trows[:, None] < T) & cmask[None, :]
        acc += tl.load(p_ptr + offs, mask=m, other=0.0)
    return tl.sum(acc, axis=0)  # [BLOCK_C] fp32


@triton.jit
def store_partial_row(pa_ptr, pb_ptr, acc_a, acc_b, row, C, cols, cmask):
    """Row `row` of two fp32 [T, C] partial arrays (for sum_partials): the column
    sums of the [BLOCK_M, BLOCK_C] accumulators acc_a and acc_b at columns `cols`."""
    offs = row.to(tl.int64) * C + cols  # [BLOCK_C]
    tl.store(pa_ptr + offs, tl.sum(acc_a, axis=0), mask=cmask)
    tl.store(pb_ptr + offs, tl.sum(acc_b, axis=0), mask=cmask)


@triton.jit
def pixel_tile(pid_p, pid_c, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr):
    """Tile (pid_p, pid_c) of [P pixels, C channels]: (offs_p [BLOCK_P], offs_c [BLOCK_C], their masks)."""
    if IDX64:
        pid_p = pid_p.to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] flat pixel (n, h, w)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] channel
    return offs_p, offs_c, offs_p < P, offs_c < C


@triton.jit
def pixel_nhw(offs_p, H, W):
    """Flat NHWC pixel indices [BLOCK_P] -> (image, row, column), each [BLOCK_P]."""
    t = offs_p // W
    return t // H, t % H, offs_p % W


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation; a and b share a dtype (already rounded to it).

    UPCAST (interpreter + bf16 only): Triton's CPU interpreter mis-computes tl.dot
    on bf16 operands (it stores bf16 as raw uint16), so feed it fp32 copies; bf16
    products are exact in fp32, so this matches a GPU bf16 dot with fp32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _scale_by_scalar_kernel(x_ptr, s_ptr, out_ptr, L, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat indices
    mask = offs < L
    scale = tl.load(s_ptr).to(tl.float32)  # scalar fp32, read on the device
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] fp32
    tl.store(out_ptr + offs, (x * scale).to(out_ptr.dtype.element_ty), mask=mask)


def scale_by_device_scalar(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x * s[0] as a new tensor like x, with s a device tensor (never read on the host): the
    backward of a loss whose forward already wrote its gradient, scaled by the incoming one."""
    if not x.is_contiguous() or s.numel() < 1 or s.device != x.device:
        raise ValueError(f"scale_by_device_scalar: x must be contiguous and s a tensor on its device, "
                         f"got {tuple(x.shape)} and {tuple(s.shape)} on {s.device}")
    out = torch.empty_like(x)
    L = x.numel()
    if L:
        block = 1 << 16 if _device.INTERPRETED else 1024
        launch(_scale_by_scalar_kernel, (triton.cdiv(L, block),), x, s, out, L, BLOCK=block, num_warps=4)
    return out
