"""Convolution backward (NHWC): dgrad (engine.kernels.conv.dgrad), split-K wgrad
(engine.kernels.conv.wgrad), and the materialised activation gradient a
residual needs.

Both dgrad and wgrad load dz = act_grad(dy, z) (* scale) while loading dy (ACT
/ HAS_SCALE constexprs), so the activation backward costs no extra pass unless
a residual needs dz materialised as its own gradient (act_backward).

Public API: conv2d_dgrad, conv2d_wgrad, act_backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine import device as _device
from engine.kernels.activations import act_grad
from engine.kernels.common import next_pow2
from engine.kernels.conv.dgrad import conv2d_dgrad
from engine.kernels.conv.wgrad import conv2d_wgrad
from engine.kernels.launch import launch


@triton.jit
def _act_grad_kernel(dy_ptr, z_ptr, dz_ptr, numel, slope, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """dz = act_grad(dy, z), elementwise over contiguous tensors."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    tl.store(dz_ptr + offs, act_grad(dy, z, ACT, slope).to(dz_ptr.dtype.element_ty), mask=mask)


def act_backward(dy: torch.Tensor, z: torch.Tensor, code: int, slope: float) -> torch.Tensor:
    """dz = act_grad(dy, z) materialised (contiguous, dy's dtype)."""
    dz = torch.empty_like(dy)
    numel = dy.numel()
    block = next_pow2(numel, 16, 1 << 16) if _device.INTERPRETED else 1024
    launch(_act_grad_kernel, (triton.cdiv(numel, block),), dy, z, dz, numel, float(slope), ACT=code, BLOCK=block)
    return dz


__all__ = ["conv2d_dgrad", "conv2d_wgrad", "act_backward"]
