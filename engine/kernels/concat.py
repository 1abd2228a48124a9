"""Strided row copies for channel concatenation of channels-last tensors.

A destination or source is viewed as `[M, C]` rows with unit channel stride and
one row stride (e.g. a channel slice `buf[..., c0:c1]` of a contiguous NHWC
buffer), so a copy into a concat buffer is one kernel, no torch.cat.

Public API:
    copy_rows(dst, src)                           -> dst        (no autograd)
    copy_into(dst_view, src)                      -> dst_view   (CopyIntoFunction)
    concat_channels(xs)                           -> y          (ConcatFunction)
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from engine.kernels.common import check_activation, check_like, tile_2d
from engine.kernels.launch import launch


# --------------------------------------------------------------------------- #
# Strided row copy: channel slices of NHWC buffers (concat)
# --------------------------------------------------------------------------- #
def _rows_view(t: torch.Tensor, name: str = "tensor") -> tuple[int, int, int]:
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
    check_like(dst, src, "copy", names=("dst", "src"), same_dtype=False)
    M, C, ds = _rows_view(dst, "dst")
    try:
        _, _, ss = _rows_view(src, "src")
    except ValueError:
        src = src.contiguous()
        _, _, ss = _rows_view(src, "src")
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
