"""Layout copies of NHWC activations: zero channels appended so every pixel row
starts on a 16-byte boundary.

Why: the convolution kernels load their operands with 16-byte asynchronous
copies (`cp.async`, `LDGSTS....128`) only when every row of a tile starts
16-byte aligned: x's channel count must be a multiple of 8 (bf16/fp16) or 4
(fp32). A 3-channel RGB image falls to 2-byte gathers (13x more main-loop
instructions than the tensor cores need, read from the sm_90 SASS). Padding it
to 8 channels costs one pass over a small tensor; the padded channels meet
zero weight rows (engine.kernels.conv.weights), so results are unchanged.

Public API: channel_multiple, operand_align, padded_channels, pad_channels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.common import idx64, pixel_grid, pixel_tile
from engine.kernels.launch import launch


def channel_multiple(dtype: torch.dtype) -> int:
    """Channels per 16 bytes: the multiple a channel count needs for 16-byte rows."""
    return max(1, 16 // torch.empty((), dtype=dtype).element_size())


def operand_align(total: int, per_group: int, dtype) -> int:
    """The ALIGN constexpr of a channel count: channels per 16 bytes when `total` and
    `per_group` are multiples of it (the kernel can then prove 16-byte rows), else 1."""
    m = channel_multiple(dtype)
    return m if total % m == 0 and per_group % m == 0 else 1


def padded_channels(C: int, dtype: torch.dtype) -> int:
    """C rounded up to a multiple of channel_multiple(dtype)."""
    m = channel_multiple(dtype)
    return -(-C // m) * m


@triton.jit
def _pad_channels_kernel(x_ptr, y_ptr, P, C, CP, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                         IDX64: tl.constexpr):
    """y[p, c] = x[p, c] for c < C, 0 for C <= c < CP. Grid: (P tiles, CP tiles)."""
    offs_p, offs_c, mask_p, mask_c = pixel_tile(tl.program_id(0), tl.program_id(1), P, CP, BLOCK_P, BLOCK_C,
                                                IDX64)  # [BLOCK_P], [BLOCK_C] and their masks
    v = tl.load(x_ptr + offs_p[:, None] * C + offs_c[None, :],
                mask=mask_p[:, None] & (offs_c < C)[None, :], other=0.0)  # [BLOCK_P, BLOCK_C]
    tl.store(y_ptr + offs_p[:, None] * CP + offs_c[None, :], v, mask=mask_p[:, None] & mask_c[None, :])


def pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """x [..., C] contiguous channels-last -> a new [..., channels] tensor, zeros beyond C (channels >= C)."""
    C = x.shape[-1]
    if channels < C:
        raise ValueError(f"pad_channels: cannot pad {C} channels to {channels}")
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], channels), device=x.device, dtype=x.dtype)
    P = x.numel() // C if C else 0
    if P == 0:
        return y.zero_()
    grid, opts = pixel_grid(P, channels)
    launch(_pad_channels_kernel, grid, x, y, P, C, channels, **opts, IDX64=idx64(x, y))
    return y


__all__ = ["channel_multiple", "operand_align", "padded_channels", "pad_channels"]
