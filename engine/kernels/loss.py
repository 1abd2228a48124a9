"""Fused softmax cross-entropy with label smoothing (mean reduction), forward and backward.

Logits are `[M, C]` rows: M = N for classification `[N, C]`, M = N*H*W for
per-pixel segmentation logits stored NHWC `[N, H, W, C]` (a view, same kernel).
Targets are integer class indices (`[N]` or `[N, H, W]`, int64).

Semantics are PyTorch's `F.cross_entropy(logits, target, label_smoothing=eps)`
with reduction "mean" (no ignore_index, no class weights):

    loss_i = lse_i - (1 - eps) * x_i[t_i] - (eps / C) * sum_j x_ij
    dloss/dx_ij = (softmax_ij - eps / C - (1 - eps) * [j == t_i]) / M

One kernel (`_xent_fwd_kernel`) computes, per block of rows, an online
log-sum-exp over C-blocks, the per-row losses (summed into one fp32 partial per
program) and the unscaled gradient `softmax - q` (fp32 math, stored in the
logits' dtype). `_xent_mean_kernel` adds the partials in a fixed order and
divides by M. The backward multiplies the saved gradient by `dL / M`, reading the
incoming scalar gradient from its tensor (no host sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine import device
from engine.kernels.common import FLOAT_DTYPES, next_pow2
from engine.kernels.launch import launch

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for padding (keeps the interpreter free of inf - inf)


@triton.jit
def _xent_fwd_kernel(
    logits_ptr, target_ptr, grad_ptr, part_ptr,
    M, C,
    stride_lm, stride_lc,
    eps,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] row indices
    row_mask = rows < M
    tgt = tl.load(target_ptr + rows, mask=row_mask, other=0)  # [BLOCK_M] int class index
    offs_c = tl.arange(0, BLOCK_C)  # [BLOCK_C]

    # pass 1: online log-sum-exp, sum of logits, target logit (all fp32)
    run_max = tl.full((BLOCK_M,), _NEG, dtype=tl.float32)  # [BLOCK_M] running max
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # [BLOCK_M] sum exp(x - run_max)
    sum_x = tl.zeros((BLOCK_M,), dtype=tl.float32)  # [BLOCK_M] sum_j x_ij
    x_tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)  # [BLOCK_M] x_i[t_i]
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs_c
        mask = row_mask[:, None] & (cols < C)[None, :]
        x = tl.load(logits_ptr + rows[:, None] * stride_lm + cols[None, :] * stride_lc, mask=mask, other=0.0)
        x = tl.where(mask, x.to(tl.float32), _NEG)  # [BLOCK_M, BLOCK_C] fp32
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        run_max = new_max
        sum_x += tl.sum(tl.where(mask, x, 0.0), axis=1)
        x_tgt += tl.sum(tl.where(mask & (cols[None, :] == tgt[:, None]), x, 0.0), axis=1)
    lse = run_max + tl.log(run_sum)  # [BLOCK_M] fp32
    loss = lse - (1.0 - eps) * x_tgt - (eps / C) * sum_x  # [BLOCK_M] fp32 per-row loss
    loss = tl.where(row_mask, loss, 0.0)
    tl.store(part_ptr + pid, tl.sum(loss, axis=0))

    # pass 2: unscaled gradient softmax - q, q = eps/C + (1-eps)*onehot (fp32)
    off_value = eps / C
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs_c
        mask = row_mask[:, None] & (cols < C)[None, :]
        x = tl.load(logits_ptr + rows[:, None] * stride_lm + cols[None, :] * stride_lc, mask=mask, other=0.0)
        x = tl.where(mask, x.to(tl.float32), _NEG)  # [BLOCK_M, BLOCK_C] fp32
        p = tl.exp(x - lse[:, None])  # [BLOCK_M, BLOCK_C] fp32 softmax
        g = p - off_value - tl.where(cols[None, :] == tgt[:, None], 1.0 - eps, 0.0)
        tl.store(grad_ptr + rows[:, None] * C + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _xent_mean_kernel(part_ptr, out_ptr, P, inv_m, BLOCK: tl.constexpr):
    """out[()] = inv_m * sum(part[0:P]), summed in a fixed order by one program."""
    offs = tl.arange(0, BLOCK)  # [BLOCK]
    acc = tl.zeros((BLOCK,), dtype=tl.float32)  # [BLOCK] fp32 lane sums
    for p0 in range(0, P, BLOCK):
        acc += tl.load(part_ptr + p0 + offs, mask=p0 + offs < P, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * inv_m)


@triton.jit
def _xent_bwd_kernel(grad_ptr, dloss_ptr, out_ptr, L, inv_m, BLOCK: tl.constexpr):
    """out = grad * (dloss / M), dloss read from a 1-element tensor."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat indices
    mask = offs < L
    scale = tl.load(dloss_ptr).to(tl.float32) * inv_m  # scalar fp32
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] fp32
    tl.store(out_ptr + offs, (g * scale).to(out_ptr.dtype.element_ty), mask=mask)


def _xent_blocks(M: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps)."""
    if device.INTERPRETED:
        block_c = min(next_pow2(C), 4096)
        block_m = max(2, min(next_pow2(M), (1 << 18) // block_c))
        return block_m, block_c, 4
    block_c = min(next_pow2(C), 1024)
    block_m = max(2, min(next_pow2(M), 4096 // block_c))
    return block_m, block_c, (8 if block_m * block_c >= 4096 else 4)


def cross_entropy_forward(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0):
    """logits `[M, C]`, target `[M]` int -> (mean loss: 0-dim fp32, unscaled grad `[M, C]` in logits' dtype).

    The unscaled gradient is `softmax - q`; `dloss/dlogits = grad * dL / M`.
    """
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits must be [M, C], got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"cross_entropy: logits dtype must be fp32/fp16/bf16, got {logits.dtype}")
    M, C = logits.shape
    if target.shape != (M,):
        raise ValueError(f"cross_entropy: target must have shape ({M},), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cross_entropy: target must be int64 class indices, got {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"cross_entropy: logits on {logits.device} but target on {target.device}")
    if C < 1:
        raise ValueError("cross_entropy: need at least one class")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not target.is_contiguous():
        target = target.contiguous()
    grad = torch.empty((M, C), device=logits.device, dtype=logits.dtype)
    loss = torch.empty((), device=logits.device, dtype=torch.float32)
    block_m, block_c, warps = _xent_blocks(M, C)
    n_prog = triton.cdiv(M, block_m)
    if M == 0:
        loss.fill_(float("nan"))  # PyTorch's mean over nothing
        return loss, grad
    part = torch.empty((n_prog,), device=logits.device, dtype=torch.float32)
    launch(_xent_fwd_kernel, (n_prog,), logits, target, grad, part, M, C,
           logits.stride(0), logits.stride(1), float(label_smoothing),
           BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
    launch(_xent_mean_kernel, (1,), part, loss, n_prog, 1.0 / M, BLOCK=1024, num_warps=4)
    return loss, grad


def cross_entropy_backward(grad: torch.Tensor, dloss: torch.Tensor, M: int) -> torch.Tensor:
    """dlogits = grad * dloss / M (grad: the unscaled gradient, dloss: a 1-element tensor)."""
    out = torch.empty_like(grad)
    L = grad.numel()
    if L:
        block = 1 << 16 if device.INTERPRETED else 1024
        launch(_xent_bwd_kernel, (triton.cdiv(L, block),), grad, dloss, out, L, 1.0 / max(M, 1),
               BLOCK=block, num_warps=4)
    return out


class CrossEntropyFunction(torch.autograd.Function):
    """Mean softmax cross-entropy of `[M, C]` logits; backward from the saved gradient."""

    @staticmethod
    def forward(ctx, logits, target, label_smoothing=0.0):
        loss, grad = cross_entropy_forward(logits, target, label_smoothing)
        ctx.save_for_backward(grad)
        ctx.m = logits.shape[0]
        return loss

    @staticmethod
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        return cross_entropy_backward(grad, dloss, ctx.m), None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy, a 0-dim fp32 tensor.

    logits `[N, C]` with target `[N]`, or NHWC per-pixel logits `[N, H, W, C]`
    with target `[N, H, W]` (the layout fusenet keeps activations in).
    """
    if logits.dim() == 2:
        if target.dim() != 1:
            raise ValueError(f"cross_entropy: [N, C] logits need a [N] target, got {tuple(target.shape)}")
    elif logits.dim() == 4:
        if tuple(target.shape) != tuple(logits.shape[:3]):
            raise ValueError(
                f"cross_entropy: NHWC logits {tuple(logits.shape)} need a target of shape "
                f"{tuple(logits.shape[:3])}, got {tuple(target.shape)}"
            )
    else:
        raise ValueError(f"cross_entropy: logits must be [N, C] or NHWC [N, H, W, C], got {tuple(logits.shape)}")
    C = logits.shape[-1]
    return CrossEntropyFunction.apply(logits.reshape(-1, C), target.reshape(-1), float(label_smoothing))


def network_loss(out: torch.Tensor, target: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """The fused cross-entropy of a network's output as the module returns it:
    `[N, K]` logits, or NCHW per-pixel logits `[N, K, H, W]` (put channels last
    for the kernel: a copy). Without a target, class 0 everywhere: the loss of
    dry runs and compile checks, where values do not matter."""
    logits = out.permute(0, 2, 3, 1).contiguous() if out.dim() == 4 else out
    if target is None:
        target = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=out.device)
    return cross_entropy(logits, target, label_smoothing)
