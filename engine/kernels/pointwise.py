"""Pointwise kernels: activations, fused residual add, constant scale, per-channel
affine + activation (eval-mode batch norm), and the strided channel-slice copy
used for concatenation. Forward and backward side by side.

Every kernel views its activation as `[M, C]` rows with channels last
(`M = N*H*W` for NHWC `[N, H, W, C]`, `M = N` for `[N, F]`). Purely elementwise
ops go further and treat the tensor as a flat `[numel]` vector.

Public API (autograd-aware, what the runtime calls):
    activation(x, act="relu", slope=0.01)         -> y          (ActFunction)
    add_act(a, b, act="none", slope=0.01)         -> y          (AddActFunction)
    scale(x, factor)                              -> y          (ScaleFunction)
    affine_act(x, scale, shift, act="none", slope=0.01) -> y    (AffineActFunction)
    copy_into(dst_view, src)                      -> dst_view   (CopyIntoFunction)
    concat_channels(xs)                           -> y          (ConcatFunction)

Host launchers (no autograd; also used by other kernel modules):
    act_forward, act_backward, add_act_forward, add_act_backward, scale_forward,
    affine_act_forward, affine_act_backward, copy_rows, sum_partials.

Shared helpers for sibling modules (batchnorm, dropout, softmax):
    rows_of, check_activation, tile_2d, reduce_plan, block_1d, reduce_rows (jit).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from engine import device as _device
from engine.kernels.activations import act_code, act_grad, apply_act
from engine.kernels.launch import launch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tile budgets (elements per program). Tests shrink the interpreter ones to force
# several row/channel blocks on small tensors.
INTERP_BLOCK_1D = 1 << 16
INTERP_TILE = 1 << 16
INTERP_MAX_BLOCK_C = 4096
GPU_BLOCK_1D = 1024
GPU_TILE = 4096
GPU_MAX_BLOCK_C = 128
# Split reductions: aim for about this many row-partials on the GPU.
GPU_TARGET_PARTIALS = 256


# --------------------------------------------------------------------------- #
# Host-side helpers shared by the pointwise/normalisation modules
# --------------------------------------------------------------------------- #
def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_activation(x, name: str = "x") -> None:
    """Raise ValueError unless x is a non-empty fp32/fp16/bf16 tensor."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (channels last), got a scalar")


def check_param(p, C: int, x: torch.Tensor, name: str) -> None:
    """A per-channel fp32 parameter/statistic of shape [C] on x's device."""
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


def rows_of(x: torch.Tensor) -> tuple[int, int]:
    """(M, C) of a channels-last tensor viewed as [M, C] rows."""
    C = x.shape[-1]
    M = x.numel() // C if C else 0
    return M, C


def rows_view(t: torch.Tensor, name: str = "tensor") -> tuple[int, int, int]:
    """(M, C, row_stride) for a tensor whose leading dims collapse to rows with a
    single stride and whose channel stride is 1 (e.g. a channel slice of a larger
    NHWC buffer). Raises ValueError for other layouts."""
    C = t.shape[-1]
    M = t.numel() // C if C else 0
    if t.dim() == 1:
        if t.stride(0) != 1 and C > 1:
            raise ValueError(f"{name}: channel stride must be 1, got {t.stride(0)}")
        return 1, C, C
    if C > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: channel (last) stride must be 1, got {t.stride(-1)}")
    row_stride = None
    expected = None
    # walk leading dims from innermost to outermost; size-1 dims don't matter
    for d in range(t.dim() - 2, -1, -1):
        if t.shape[d] == 1:
            continue
        if row_stride is None:
            row_stride = t.stride(d)
            expected = row_stride * t.shape[d]
        else:
            if t.stride(d) != expected:
                raise ValueError(
                    f"{name}: leading dims {tuple(t.shape[:-1])} with strides {t.stride()[:-1]} "
                    "do not collapse into rows of one stride"
                )
            expected = t.stride(d) * t.shape[d]
    if row_stride is None:
        row_stride = C
    return M, C, row_stride


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


def _act_code_checked(act) -> int:
    if not isinstance(act, str):
        raise ValueError(f"act must be an activation name, got {act!r}")
    return act_code(act)


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


# --------------------------------------------------------------------------- #
# Shared device function: fixed-order sum over rows of an fp32 [T, C] array
# --------------------------------------------------------------------------- #
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
    tree reduction. Returns [BLOCK_C] fp32."""
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)  # [BLOCK_T, BLOCK_C] fp32
    for t0 in range(0, T, BLOCK_T):
        trows = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        offs = trows[:, None].to(tl.int64) * C + cols[None, :]  # [BLOCK_T, BLOCK_C]
        m = (trows[:, None] < T) & cmask[None, :]
        acc += tl.load(p_ptr + offs, mask=m, other=0.0)
    return tl.sum(acc, axis=0)  # [BLOCK_C] fp32


@triton.jit
def _sum_partials_kernel(
    pa_ptr,  # [T, C] fp32 partials
    pb_ptr,  # [T, C] fp32 partials (if HAS_B)
    oa_ptr,  # [C] fp32 out
    ob_ptr,  # [C] fp32 out (if HAS_B)
    T,
    C,
    HAS_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = cols < C
    sa = reduce_rows(pa_ptr, T, C, cols, cmask, BLOCK_T, BLOCK_C)  # [BLOCK_C] fp32
    tl.store(oa_ptr + cols, sa, mask=cmask)
    if HAS_B:
        sb = reduce_rows(pb_ptr, T, C, cols, cmask, BLOCK_T, BLOCK_C)  # [BLOCK_C] fp32
        tl.store(ob_ptr + cols, sb, mask=cmask)


def finalize_plan(T: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_C, num_warps) for kernels that reduce [T, C] partials."""
    if _device.INTERPRETED:
        bc = min(next_pow2(C), INTERP_MAX_BLOCK_C, INTERP_TILE)
        bt = max(1, min(next_pow2(T), INTERP_TILE // bc))
        return bt, bc, 4
    bc = max(4, min(next_pow2(C), 32))
    bt = max(1, min(next_pow2(T), 2048 // bc))
    return bt, bc, 4


def sum_partials(pa: torch.Tensor, pb: torch.Tensor | None = None):
    """Column sums of fp32 [T, C] partials in a fixed order -> [C] fp32 (or a pair)."""
    for name, p in (("pa", pa), ("pb", pb)):
        if p is None:
            continue
        if p.dtype != torch.float32 or p.dim() != 2 or not p.is_contiguous():
            raise ValueError(f"{name} must be a contiguous fp32 [T, C] tensor, got {p.dtype} {tuple(p.shape)}")
    if pb is not None and pb.shape != pa.shape:
        raise ValueError(f"partials differ in shape: {tuple(pa.shape)} vs {tuple(pb.shape)}")
    T, C = pa.shape
    oa = torch.empty(C, device=pa.device, dtype=torch.float32)
    ob = torch.empty(C, device=pa.device, dtype=torch.float32) if pb is not None else None
    bt, bc, nw = finalize_plan(T, C)
    launch(
        _sum_partials_kernel, (triton.cdiv(C, bc),),
        pa, pb if pb is not None else pa, oa, ob if ob is not None else oa, T, C,
        HAS_B=pb is not None, BLOCK_T=bt, BLOCK_C=bc, num_warps=nw,
    )
    return oa if pb is None else (oa, ob)


# --------------------------------------------------------------------------- #
# Elementwise kernels: y = act(x [+ b]),  dz = act_grad(dy, x [+ b]),  y = x*f
# --------------------------------------------------------------------------- #
@triton.jit
def _act_fwd_kernel(
    x_ptr,  # [n] input (pre-activation, or first addend)
    b_ptr,  # [n] second addend (if HAS_B)
    y_ptr,  # [n] output, x's dtype
    n,
    slope,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat index
    mask = offs < n
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] fp32
    if HAS_B:
        z += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = apply_act(z, ACT, slope)  # [BLOCK] fp32
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd_kernel(
    dy_ptr,  # [n] upstream gradient
    x_ptr,  # [n] saved input (first addend)
    b_ptr,  # [n] saved second addend (if HAS_B)
    dx_ptr,  # [n] gradient wrt the pre-activation, x's dtype
    n,
    slope,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat index
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] fp32
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] fp32
    if HAS_B:
        z += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dz = act_grad(dy, z, ACT, slope)  # [BLOCK] fp32
    tl.store(dx_ptr + offs, dz.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(
    x_ptr,  # [n] input
    y_ptr,  # [n] output = x * factor
    n,
    factor,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat index
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] fp32
    tl.store(y_ptr + offs, (x * factor).to(y_ptr.dtype.element_ty), mask=mask)


def act_forward(x: torch.Tensor, act: str = "relu", slope: float = 0.01) -> torch.Tensor:
    """y = act(x), new tensor of x's shape/dtype. No autograd (see `activation`)."""
    check_activation(x)
    code = _act_code_checked(act)
    x = _contig(x)
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    blk, nw = block_1d(n)
    launch(_act_fwd_kernel, (triton.cdiv(n, blk),), x, x, y, n, float(slope),
           HAS_B=False, ACT=code, BLOCK=blk, num_warps=nw)
    return y


def act_backward(dy: torch.Tensor, x: torch.Tensor, act: str = "relu", slope: float = 0.01,
                 b: torch.Tensor | None = None) -> torch.Tensor:
    """dz = act'(z) * dy with z = x (+ b). Returns a tensor in x's dtype."""
    check_activation(x)
    code = _act_code_checked(act)
    if dy.shape != x.shape:
        raise ValueError(f"dy shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")
    if b is not None and b.shape != x.shape:
        raise ValueError(f"b shape {tuple(b.shape)} != x shape {tuple(x.shape)}")
    dy, x = _contig(dy), _contig(x)
    b = _contig(b) if b is not None else None
    dx = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return dx
    blk, nw = block_1d(n)
    launch(_act_bwd_kernel, (triton.cdiv(n, blk),), dy, x, b if b is not None else x, dx, n, float(slope),
           HAS_B=b is not None, ACT=code, BLOCK=blk, num_warps=nw)
    return dx


def add_act_forward(a: torch.Tensor, b: torch.Tensor, act: str = "none", slope: float = 0.01) -> torch.Tensor:
    """y = act(a + b) (same shapes and dtypes, no broadcasting). No autograd."""
    check_activation(a, "a")
    check_activation(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"add_act: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)} (no broadcasting)")
    if a.dtype != b.dtype:
        raise ValueError(f"add_act: dtypes differ, {a.dtype} vs {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"add_act: devices differ, {a.device} vs {b.device}")
    code = _act_code_checked(act)
    a, b = _contig(a), _contig(b)
    y = torch.empty_like(a)
    n = a.numel()
    if n == 0:
        return y
    blk, nw = block_1d(n)
    launch(_act_fwd_kernel, (triton.cdiv(n, blk),), a, b, y, n, float(slope),
           HAS_B=True, ACT=code, BLOCK=blk, num_warps=nw)
    return y


def add_act_backward(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, act: str = "none",
                     slope: float = 0.01) -> torch.Tensor:
    """Gradient wrt a (== gradient wrt b) of act(a + b)."""
    if act == "none":
        return dy
    return act_backward(dy, a, act, slope, b=b)


def scale_forward(x: torch.Tensor, factor: float) -> torch.Tensor:
    """y = x * factor (a Python number). No autograd."""
    check_activation(x)
    x = _contig(x)
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    blk, nw = block_1d(n)
    launch(_scale_kernel, (triton.cdiv(n, blk),), x, y, n, float(factor), BLOCK=blk, num_warps=nw)
    return y


class ActFunction(torch.autograd.Function):
    """y = act(x). Saves x (the pre-activation)."""

    @staticmethod
    def forward(ctx, x, act="relu", slope=0.01):
        ctx.act, ctx.slope = act, slope
        ctx.save_for_backward(x)
        return act_forward(x, act, slope)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return act_backward(dy, x, ctx.act, ctx.slope), None, None


class AddActFunction(torch.autograd.Function):
    """y = act(a + b). Saves a and b when act != "none" (z = a + b is recomputed
    in the backward kernel), nothing otherwise. Both inputs get the same
    gradient tensor."""

    @staticmethod
    def forward(ctx, a, b, act="none", slope=0.01):
        ctx.act, ctx.slope = act, slope
        if act != "none":
            ctx.save_for_backward(a, b)
        return add_act_forward(a, b, act, slope)

    @staticmethod
    def backward(ctx, dy):
        if ctx.act == "none":
            dz = dy
        else:
            a, b = ctx.saved_tensors
            dz = act_backward(dy, a, ctx.act, ctx.slope, b=b)
        return (dz if ctx.needs_input_grad[0] else None,
                dz if ctx.needs_input_grad[1] else None, None, None)


class ScaleFunction(torch.autograd.Function):
    """y = x * factor. Saves nothing."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = float(factor)
        return scale_forward(x, factor)

    @staticmethod
    def backward(ctx, dy):
        return scale_forward(dy, ctx.factor), None


def activation(x: torch.Tensor, act: str = "relu", slope: float = 0.01) -> torch.Tensor:
    """Autograd-aware act(x). act="none" returns x itself."""
    check_activation(x)
    _act_code_checked(act)
    if act == "none":
        return x
    return ActFunction.apply(x, act, slope)


def add_act(a: torch.Tensor, b: torch.Tensor, act: str = "none", slope: float = 0.01) -> torch.Tensor:
    """Autograd-aware fused residual add + activation: act(a + b)."""
    return AddActFunction.apply(a, b, act, slope)


def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Autograd-aware x * factor (constant)."""
    return ScaleFunction.apply(x, factor)


# --------------------------------------------------------------------------- #
# Per-channel affine + activation: y = act(x * scale[c] + shift[c])
# --------------------------------------------------------------------------- #
@triton.jit
def _affine_act_fwd_kernel(
    x_ptr,  # [M, C] input
    scale_ptr,  # [C] fp32
    shift_ptr,  # [C] fp32
    y_ptr,  # [M, C] output, x's dtype
    M,
    C,
    slope,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = cols < C
    mask, offs = row_tile(pid_m, M, C, cols, cmask, BLOCK_M)  # [BLOCK_M, BLOCK_C] each
    s = tl.load(scale_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    t = tl.load(shift_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
    z = x * s[None, :] + t[None, :]
    y = apply_act(z, ACT, slope)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_act_bwd_kernel(
    dy_ptr,  # [M, C] upstream gradient
    x_ptr,  # [M, C] saved input
    scale_ptr,  # [C] fp32
    shift_ptr,  # [C] fp32
    dx_ptr,  # [M, C] out, x's dtype (if NEED_DX)
    pds_ptr,  # [T, C] fp32 partial sums of dz * x (if NEED_PARAM)
    pdt_ptr,  # [T, C] fp32 partial sums of dz (if NEED_PARAM)
    M,
    C,
    slope,
    ACT: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_PARAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    N_ITER: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = cols < C
    s = tl.load(scale_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    t = tl.load(shift_ptr + cols, mask=cmask, other=0.0)  # [BLOCK_C] fp32
    acc_s = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # [BLOCK_M, BLOCK_C] sum dz*x
    acc_t = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # [BLOCK_M, BLOCK_C] sum dz
    for i in range(N_ITER):
        mask, offs = row_tile(pid_t * N_ITER + i, M, C, cols, cmask, BLOCK_M)  # [BLOCK_M, BLOCK_C] each
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C] fp32
        z = x * s[None, :] + t[None, :]
        dz = tl.where(mask, act_grad(dy, z, ACT, slope), 0.0)  # [BLOCK_M, BLOCK_C] fp32
        if NEED_DX:
            tl.store(dx_ptr + offs, (dz * s[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_PARAM:
            acc_s += dz * x
            acc_t += dz
    if NEED_PARAM:
        poffs = pid_t.to(tl.int64) * C + cols  # [BLOCK_C]
        tl.store(pds_ptr + poffs, tl.sum(acc_s, axis=0), mask=cmask)
        tl.store(pdt_ptr + poffs, tl.sum(acc_t, axis=0), mask=cmask)


def affine_act_forward(x, scale, shift, act="none", slope=0.01):
    """y = act(x * scale[c] + shift[c]) over the last (channel) dim. No autograd."""
    check_activation(x)
    M, C = rows_of(x)
    check_param(scale, C, x, "scale")
    check_param(shift, C, x, "shift")
    code = _act_code_checked(act)
    x = _contig(x)
    y = torch.empty_like(x)
    if M == 0 or C == 0:
        return y
    bm, bc, nw = tile_2d(M, C)
    launch(_affine_act_fwd_kernel, (triton.cdiv(M, bm), triton.cdiv(C, bc)),
           x, scale, shift, y, M, C, float(slope), ACT=code, BLOCK_M=bm, BLOCK_C=bc, num_warps=nw)
    return y


def affine_act_backward(dy, x, scale, shift, act="none", slope=0.01, need_dx=True, need_param=True):
    """Returns (dx or None, d_scale [C] fp32 or None, d_shift [C] fp32 or None).
    d_scale = sum_rows(dz * x), d_shift = sum_rows(dz), dz = act'(z) * dy, split
    deterministic two-stage reduction."""
    check_activation(x)
    M, C = rows_of(x)
    check_param(scale, C, x, "scale")
    check_param(shift, C, x, "shift")
    if dy.shape != x.shape:
        raise ValueError(f"dy shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")
    code = _act_code_checked(act)
    dy, x = _contig(dy), _contig(x)
    if not (need_dx or need_param):
        return None, None, None
    bm, bc, n_iter, T, nw = reduce_plan(M, C)
    dx = torch.empty_like(x) if need_dx else None
    if need_param:
        pds = torch.empty((T, C), device=x.device, dtype=torch.float32)
        pdt = torch.empty((T, C), device=x.device, dtype=torch.float32)
    else:
        pds = pdt = None
    launch(_affine_act_bwd_kernel, (T, triton.cdiv(C, bc)),
           dy, x, scale, shift, dx if need_dx else x, pds if need_param else scale,
           pdt if need_param else scale, M, C, float(slope),
           ACT=code, NEED_DX=need_dx, NEED_PARAM=need_param,
           BLOCK_M=bm, BLOCK_C=bc, N_ITER=n_iter, num_warps=nw)
    if not need_param:
        return dx, None, None
    d_scale, d_shift = sum_partials(pds, pdt)
    return dx, d_scale, d_shift


class AffineActFunction(torch.autograd.Function):
    """y = act(x * scale + shift) per channel. Saves x, scale, shift (z is
    recomputed in the backward kernel)."""

    @staticmethod
    def forward(ctx, x, scale, shift, act="none", slope=0.01):
        ctx.act, ctx.slope = act, slope
        ctx.save_for_backward(x, scale, shift)
        return affine_act_forward(x, scale, shift, act, slope)

    @staticmethod
    def backward(ctx, dy):
        x, s, t = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_param = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx, ds, dt = affine_act_backward(dy, x, s, t, ctx.act, ctx.slope, need_dx, need_param)
        return (dx, ds if ctx.needs_input_grad[1] else None,
                dt if ctx.needs_input_grad[2] else None, None, None)


def affine_act(x, scale, shift, act="none", slope=0.01):
    """Autograd-aware per-channel affine + activation (eval-mode batch norm folded
    into scale/shift, see batchnorm.bn_eval_scale_shift)."""
    return AffineActFunction.apply(x, scale, shift, act, slope)


# --------------------------------------------------------------------------- #
# Strided row copy: channel slices of NHWC buffers (concat)
# --------------------------------------------------------------------------- #
@triton.jit
def _copy_rows_kernel(
    src_ptr,  # [M, C] rows with stride src_stride
    dst_ptr,  # [M, C] rows with stride dst_stride (dst dtype)
    M,
    C,
    src_stride,
    dst_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask = (rows[:, None] < M) & (cols[None, :] < C)  # [BLOCK_M, BLOCK_C]
    r64 = rows[:, None].to(tl.int64)
    v = tl.load(src_ptr + r64 * src_stride + cols[None, :], mask=mask)  # [BLOCK_M, BLOCK_C]
    tl.store(dst_ptr + r64 * dst_stride + cols[None, :], v.to(dst_ptr.dtype.element_ty), mask=mask)


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst[...] = src (cast to dst's dtype), both viewed as [M, C] rows with unit
    channel stride and one row stride each (e.g. dst a channel slice
    `buf[..., c0:c1]` of a contiguous NHWC buffer). Writes dst in place; no autograd."""
    check_activation(dst, "dst")
    check_activation(src, "src")
    if dst.shape != src.shape:
        raise ValueError(f"copy: dst shape {tuple(dst.shape)} != src shape {tuple(src.shape)}")
    if dst.device != src.device:
        raise ValueError(f"copy: devices differ, {dst.device} vs {src.device}")
    M, C, ds = rows_view(dst, "dst")
    try:
        _, _, ss = rows_view(src, "src")
    except ValueError:
        src = src.contiguous()
        _, _, ss = rows_view(src, "src")
    if M == 0 or C == 0:
        return dst
    bm, bc, nw = tile_2d(M, C)
    launch(_copy_rows_kernel, (triton.cdiv(M, bm), triton.cdiv(C, bc)),
           src, dst, M, C, ss, ds, BLOCK_M=bm, BLOCK_C=bc, num_warps=nw)
    return dst


def _contiguous_copy(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    out = torch.empty(t.shape, device=t.device, dtype=dtype or t.dtype)
    return copy_rows(out, t)


class CopyIntoFunction(torch.autograd.Function):
    """dst_view <- src, in place (dst_view is marked dirty). Backward: the gradient
    for src is a contiguous copy of the gradient's slice (in src's dtype); the
    overwritten old contents of dst_view get a zero gradient. Saves nothing."""

    @staticmethod
    def forward(ctx, dst_view, src):
        ctx.src_dtype = src.dtype
        copy_rows(dst_view, src)
        ctx.mark_dirty(dst_view)
        return dst_view

    @staticmethod
    def backward(ctx, g):
        dsrc = _contiguous_copy(g, ctx.src_dtype) if ctx.needs_input_grad[1] else None
        # The old contents of dst_view were overwritten: their gradient is zero. It
        # must be a defined tensor (autograd's CopySlices drops the base's gradient
        # when this is None); a stride-0 expanded scalar costs no memory.
        ddst = torch.zeros((), device=g.device, dtype=g.dtype).expand(g.shape)
        return ddst, dsrc


def copy_into(dst_view: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Write src into dst_view (typically `buf[..., c0:c1]` of an NHWC buffer
    allocated with torch.empty) with autograd; returns dst_view. Use the returned
    base buffer (`buf`) downstream: autograd routes its gradient's channel slice
    back to src."""
    return CopyIntoFunction.apply(dst_view, src)


class ConcatFunction(torch.autograd.Function):
    """Channel concatenation of channels-last tensors with equal leading dims.
    Saves only channel counts; backward copies each channel slice of the gradient
    into a contiguous tensor."""

    @staticmethod
    def forward(ctx, *xs):
        lead = xs[0].shape[:-1]
        for k, x in enumerate(xs):
            check_activation(x, f"xs[{k}]")
            if x.shape[:-1] != lead or x.dtype != xs[0].dtype or x.device != xs[0].device:
                raise ValueError("concat_channels: inputs must share leading dims, dtype and device")
        widths = [x.shape[-1] for x in xs]
        out = torch.empty((*lead, sum(widths)), device=xs[0].device, dtype=xs[0].dtype)
        c0 = 0
        for x, w in zip(xs, widths):
            copy_rows(out[..., c0:c0 + w], x)
            c0 += w
        ctx.widths = widths
        return out

    @staticmethod
    def backward(ctx, g):
        grads, c0 = [], 0
        for k, w in enumerate(ctx.widths):
            grads.append(_contiguous_copy(g[..., c0:c0 + w]) if ctx.needs_input_grad[k] else None)
            c0 += w
        return tuple(grads)


def concat_channels(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Autograd-aware concat along the last (channel) dim into a new contiguous tensor."""
    if len(xs) == 0:
        raise ValueError("concat_channels needs at least one tensor")
    return ConcatFunction.apply(*xs)


# --------------------------------------------------------------------------- #
# Fan-out: one value, several consumers
# --------------------------------------------------------------------------- #
class FanOutFunction(torch.autograd.Function):
    """Hands one activation to n consumers as n aliases (views, no copy).

    Without it, PyTorch's autograd engine would sum the consumers' gradients
    itself (an aten add). Here the backward sums them with fusenet's add kernel,
    in consumer order, so the whole backward pass stays on Triton and is
    deterministic."""

    @staticmethod
    def forward(ctx, x, n: int):
        return tuple(x.view_as(x) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        total = None
        for g in grads:
            if g is None:
                continue
            total = g if total is None else add_act_forward(total, g)
        return total, None


def fan_out(x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """n aliases of x whose gradients are summed by a Triton kernel (see FanOutFunction)."""
    if n < 2:
        raise ValueError(f"fan_out needs at least 2 consumers, got {n}")
    return FanOutFunction.apply(x, n)


# --------------------------------------------------------------------------- #
# Pointwise chains: up to CHAIN_MAX unary ops in one pass
# --------------------------------------------------------------------------- #
CHAIN_MAX = 4
# A link's op code: an activation's code (activations.CODES, 0 the identity), or
# SCALE_LINK for a constant multiply. Activation codes are never negative, so no
# activation can ever be taken for a scale.
_SCALE_OP = -1
SCALE_LINK = tl.constexpr(_SCALE_OP)


@triton.jit
def _chain_op(v, OP: tl.constexpr, c):
    """One link: identity, an activation (c = its parameter) or a constant scale (c = factor)."""
    if OP == SCALE_LINK:
        return v * c
    else:
        return apply_act(v, OP, c)


@triton.jit
def _chain_op_grad(g, v, OP: tl.constexpr, c):
    """Gradient through one link, given the link's input v."""
    if OP == SCALE_LINK:
        return g * c
    else:
        return act_grad(g, v, OP, c)


@triton.jit
def _chain_kernel(
    x_ptr,  # [n] chain input
    dy_ptr,  # [n] upstream gradient (BACKWARD only)
    out_ptr,  # [n] chain output (forward) or input gradient (backward)
    n, c1, c2, c3, c4,
    OP1: tl.constexpr, OP2: tl.constexpr, OP3: tl.constexpr, OP4: tl.constexpr,
    BACKWARD: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] fp32
    z1 = _chain_op(x, OP1, c1)  # each link's output stays in registers
    z2 = _chain_op(z1, OP2, c2)
    z3 = _chain_op(z2, OP3, c3)
    if BACKWARD:
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
        g = _chain_op_grad(g, z3, OP4, c4)
        g = _chain_op_grad(g, z2, OP3, c3)
        g = _chain_op_grad(g, z1, OP2, c2)
        g = _chain_op_grad(g, x, OP1, c1)
        tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        y = _chain_op(z3, OP4, c4)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _chain_codes(ops: Sequence[tuple[str, float]]) -> tuple[list[int], list[float]]:
    if not 1 <= len(ops) <= CHAIN_MAX:
        raise ValueError(f"pointwise_chain: 1..{CHAIN_MAX} ops, got {len(ops)}")
    codes, consts = [], []
    for name, c in ops:
        codes.append(_SCALE_OP if name == "scale" else _act_code_checked(name))
        consts.append(float(c))
    pad = CHAIN_MAX - len(ops)
    return codes + [0] * pad, consts + [0.0] * pad


def _chain_launch(x, dy, ops, backward: bool) -> torch.Tensor:
    check_activation(x, "x")
    codes, consts = _chain_codes(ops)
    x = _contig(x)
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    blk, nw = block_1d(n)
    launch(_chain_kernel, (triton.cdiv(n, blk),), x, _contig(dy) if backward else x, out, n, *consts,
           OP1=codes[0], OP2=codes[1], OP3=codes[2], OP4=codes[3], BACKWARD=backward, BLOCK=blk, num_warps=nw)
    return out


class PointwiseChainFunction(torch.autograd.Function):
    """y = f_k(...f_1(x)) for unary ops f_i (activations, constant scales) in one
    kernel. Saves only x: the backward recomputes the links in registers."""

    @staticmethod
    def forward(ctx, x, ops):
        ctx.save_for_backward(x)
        ctx.ops = ops
        return _chain_launch(x, None, ops, backward=False)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _chain_launch(x, dy, ctx.ops, backward=True), None


def pointwise_chain(x: torch.Tensor, ops: Sequence[tuple[str, float]]) -> torch.Tensor:
    """Apply `ops` in order, e.g. [("tanh", 0), ("scale", 0.5), ("leaky_relu", 0.1)]:
    an activation with its slope (used by leaky_relu) or ("scale", factor)."""
    return PointwiseChainFunction.apply(x, tuple((name, float(c)) for name, c in ops))
