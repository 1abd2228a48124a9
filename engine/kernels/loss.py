"""Fused softmax cross-entropy with label smoothing (mean reduction), forward and backward.

Logits are `[M, C]` rows: M = N for classification `[N, C]`, M = N*H*W for
per-pixel segmentation logits stored NHWC `[N, H, W, C]` (a view, same kernel).
Targets are integer class indices (`[N]` or `[N, H, W]`, int64).

Semantics are PyTorch's `F.cross_entropy(s * logits, target, label_smoothing=eps)`
with reduction "mean" (no ignore_index, no class weights); `s` (`logit_scale`,
default 1) lets a network's trailing constant scale run inside the loss:

    x = s * logits
    loss_i = lse_i - (1 - eps) * x_i[t_i] - (eps / C) * sum_j x_ij
    dloss/dlogits_ij = s * (softmax_ij - eps / C - (1 - eps) * [j == t_i]) / M

`_xent_fwd_kernel` walks its rows in blocks: an online log-sum-exp over
C-blocks, the per-row losses and whether the row's argmax is its target (fp32
lane sums, added in a fixed order), then the gradient of the mean loss (fp32
math, stored in the logits' dtype). When the whole batch fits one program
(classification logits: `M * BLOCK_C <= 2**16` on a GPU) that program also
finishes the mean: one launch. Otherwise each program writes a (loss, correct)
partial and `_xent_finish_kernel` adds them in a fixed order: two launches.
No atomics, so the loss is bit-identical run to run.

The training step (engine.training.step) takes the gradient straight from
`cross_entropy_step` and runs the backward from the logits, so its loss is those
one or two launches. With a step clock (engine.kernels.clock) the finishing
program also adds the batch to the epoch's running sums, records the first
non-finite loss (the NaN guard) and advances the clock's step: no host sync.
The autograd path (`cross_entropy`) adds one launch in the backward that
multiplies the saved gradient by the incoming `dL`, read from its tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine import device
from engine.kernels.clock import record_loss
from engine.kernels.common import FLOAT_DTYPES, next_pow2, scale_by_device_scalar
from engine.kernels.launch import launch

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for padding (keeps the interpreter free of inf - inf)
ONE_PROGRAM_ELEMENTS = 1 << 16  # GPU: up to M * BLOCK_C logits, one program finishes the loss itself


@triton.jit
def _finish(loss_sum, correct, M, inv_m, loss_ptr, counters_ptr, stats_ptr, CLOCK: tl.constexpr):
    """Store the mean loss; with a clock, update the epoch sums and the guard, then advance the step
    (layout: engine.kernels.clock)."""
    mean = loss_sum * inv_m  # scalar fp32
    tl.store(loss_ptr, mean)
    if CLOCK:
        tl.store(stats_ptr + 1, tl.load(stats_ptr + 1) + correct.to(tl.float64))  # CORRECT
        record_loss(mean, M, counters_ptr, stats_ptr)


@triton.jit
def _xent_fwd_kernel(
    logits_ptr, target_ptr, grad_ptr, part_ptr, loss_ptr, counters_ptr, stats_ptr,
    M, C, rows_per_prog,
    stride_lm, stride_lc,
    eps, logit_scale, grad_scale, inv_m,
    FINISH: tl.constexpr, CLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    offs_c = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    loss_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)  # [BLOCK_M] per-lane sums of row losses
    hit_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)  # [BLOCK_M] per-lane counts of argmax == target
    off_value = eps / C
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] row indices
        row_mask = rows < row_end
        tgt = tl.load(target_ptr + rows, mask=row_mask, other=0)  # [BLOCK_M] int class index
        # pass 1: online log-sum-exp, sum of logits, target logit, argmax (all fp32)
        run_max = tl.full((BLOCK_M,), _NEG, dtype=tl.float32)  # [BLOCK_M] running max
        run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # [BLOCK_M] sum exp(x - run_max)
        sum_x = tl.zeros((BLOCK_M,), dtype=tl.float32)  # [BLOCK_M] sum_j x_ij
        x_tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)  # [BLOCK_M] x_i[t_i]
        arg = tl.zeros((BLOCK_M,), dtype=tl.int32)  # [BLOCK_M] first index of the row max
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs_c
            mask = row_mask[:, None] & (cols < C)[None, :]
            x = tl.load(logits_ptr + rows[:, None] * stride_lm + cols[None, :] * stride_lc, mask=mask, other=0.0)
            x = tl.where(mask, x.to(tl.float32) * logit_scale, _NEG)  # [BLOCK_M, BLOCK_C] fp32
            blk_max = tl.max(x, axis=1)
            arg = tl.where(blk_max > run_max, tl.argmax(x, axis=1).to(tl.int32) + c0, arg)  # ties: first wins
            new_max = tl.maximum(run_max, blk_max)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
            run_max = new_max
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=1)
            x_tgt += tl.sum(tl.where(mask & (cols[None, :] == tgt[:, None]), x, 0.0), axis=1)
        lse = run_max + tl.log(run_sum)  # [BLOCK_M] fp32
        loss = lse - (1.0 - eps) * x_tgt - off_value * sum_x  # [BLOCK_M] fp32 per-row loss
        loss_acc += tl.where(row_mask, loss, 0.0)
        hit_acc += tl.where(row_mask & (arg == tgt), 1.0, 0.0)
        # pass 2: gradient of the mean loss, grad_scale * (softmax - q), q = eps/C + (1-eps)*onehot
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs_c
            mask = row_mask[:, None] & (cols < C)[None, :]
            x = tl.load(logits_ptr + rows[:, None] * stride_lm + cols[None, :] * stride_lc, mask=mask, other=0.0)
            x = tl.where(mask, x.to(tl.float32) * logit_scale, _NEG)  # [BLOCK_M, BLOCK_C] fp32
            p = tl.exp(x - lse[:, None])  # [BLOCK_M, BLOCK_C] fp32 softmax
            g = (p - off_value - tl.where(cols[None, :] == tgt[:, None], 1.0 - eps, 0.0)) * grad_scale
            tl.store(grad_ptr + rows[:, None] * C + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask)
    loss_sum = tl.sum(loss_acc, axis=0)
    hits = tl.sum(hit_acc, axis=0)
    if FINISH:
        _finish(loss_sum, hits, M, inv_m, loss_ptr, counters_ptr, stats_ptr, CLOCK)
    else:
        tl.store(part_ptr + pid * 2, loss_sum)
        tl.store(part_ptr + pid * 2 + 1, hits)


@triton.jit
def _xent_finish_kernel(part_ptr, P, M, inv_m, loss_ptr, counters_ptr, stats_ptr,
                        CLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """One program: add the [P, 2] (loss, correct) partials in a fixed order, then `_finish`."""
    offs = tl.arange(0, BLOCK)  # [BLOCK]
    acc = tl.zeros((BLOCK,), dtype=tl.float32)  # [BLOCK] fp32 lane sums of losses
    hits = tl.zeros((BLOCK,), dtype=tl.float32)  # [BLOCK] fp32 lane sums of correct rows
    for p0 in range(0, P, BLOCK):
        acc += tl.load(part_ptr + (p0 + offs) * 2, mask=p0 + offs < P, other=0.0)
        hits += tl.load(part_ptr + (p0 + offs) * 2 + 1, mask=p0 + offs < P, other=0.0)
    _finish(tl.sum(acc, axis=0), tl.sum(hits, axis=0), M, inv_m, loss_ptr, counters_ptr, stats_ptr, CLOCK)


def _xent_plan(M: int, C: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps, rows per program)."""
    if device.INTERPRETED:
        block_c = min(next_pow2(C), 4096)
        block_m = max(2, min(next_pow2(M), (1 << 18) // block_c))
        return block_m, block_c, 4, (M if M * block_c <= (1 << 22) else block_m)
    block_c = min(next_pow2(C), 1024)
    # at most 1024 rows: each row carries six running values, and 2048 rows of 2 classes (a
    # two-class segmentation) left 8 rows a thread, 255 registers and a spill on sm_90
    block_m = max(2, min(next_pow2(M), 4096 // block_c, 1024))
    warps = 8 if block_m * block_c >= 2048 else 4
    return block_m, block_c, warps, (M if M * block_c <= ONE_PROGRAM_ELEMENTS else block_m)


def _check(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> None:
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


def cross_entropy_forward(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0, *,
                          logit_scale: float = 1.0, clock=None):
    """logits `[M, C]`, target `[M]` int -> (mean loss: 0-dim fp32, its gradient `[M, C]` in logits' dtype).

    `logit_scale` s: the loss of `s * logits` (the gradient is w.r.t. the unscaled
    logits). `clock` (engine.kernels.clock.StepClock): also add the batch to the
    epoch sums, set the NaN guard and advance the step (see the module docstring).
    One launch when one program holds the batch, else two.
    """
    _check(logits, target, label_smoothing)
    M, C = logits.shape
    if not target.is_contiguous():
        target = target.contiguous()
    grad = torch.empty((M, C), device=logits.device, dtype=logits.dtype)
    loss = torch.empty((), device=logits.device, dtype=torch.float32)
    if M == 0:
        loss.fill_(float("nan"))  # PyTorch's mean over nothing
        return loss, grad
    block_m, block_c, warps, rows = _xent_plan(M, C)
    n_prog = triton.cdiv(M, rows)
    part = None if n_prog == 1 else torch.empty((n_prog, 2), device=logits.device, dtype=torch.float32)
    counters, stats = (clock.counters, clock.stats) if clock is not None else (None, None)
    finish = dict(CLOCK=clock is not None)
    launch(_xent_fwd_kernel, (n_prog,), logits, target, grad, part, loss, counters, stats, M, C, rows,
           logits.stride(0), logits.stride(1), float(label_smoothing), float(logit_scale),
           float(logit_scale) / M, 1.0 / M,
           FINISH=n_prog == 1, **finish, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
    if n_prog > 1:
        launch(_xent_finish_kernel, (1,), part, n_prog, M, 1.0 / M, loss, counters, stats, **finish,
               BLOCK=1024, num_warps=4)
    return loss, grad


def cross_entropy_backward(grad: torch.Tensor, dloss: torch.Tensor) -> torch.Tensor:
    """dlogits = grad * dloss (grad: the mean loss's gradient, dloss: a 1-element tensor)."""
    return scale_by_device_scalar(grad, dloss)


class CrossEntropyFunction(torch.autograd.Function):
    """Mean softmax cross-entropy of `[M, C]` logits; backward from the saved gradient."""

    @staticmethod
    def forward(ctx, logits, target, label_smoothing=0.0):
        loss, grad = cross_entropy_forward(logits, target, label_smoothing)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        return cross_entropy_backward(grad, dloss), None, None


def _rows(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[M, C]` logits and `[M]` targets from `[N, C]` + `[N]` or NHWC `[N, H, W, C]` + `[N, H, W]` (views)."""
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
    return logits.reshape(-1, C), target.reshape(-1)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy, a 0-dim fp32 tensor.

    logits `[N, C]` with target `[N]`, or NHWC per-pixel logits `[N, H, W, C]`
    with target `[N, H, W]` (the layout fusenet keeps activations in).
    """
    rows, target = _rows(logits, target)
    return CrossEntropyFunction.apply(rows, target, float(label_smoothing))


def cross_entropy_step(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0, *,
                       logit_scale: float = 1.0, clock=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training step's loss: (mean loss, d loss / d logits shaped like `logits`), no autograd
    node, so the step runs the backward from the logits with that gradient (`[N, C]` or NHWC logits)."""
    rows, t = _rows(logits, target)
    loss, grad = cross_entropy_forward(rows, t, float(label_smoothing), logit_scale=logit_scale, clock=clock)
    return loss, grad.view(logits.shape)


def network_loss(out: torch.Tensor, target: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """The fused cross-entropy of a network's output as the module returns it:
    `[N, K]` logits, or NCHW per-pixel logits `[N, K, H, W]` (put channels last
    for the kernel: a copy). Without a target, class 0 everywhere: the loss of
    dry runs and compile checks, where values do not matter."""
    logits = out.permute(0, 2, 3, 1).contiguous() if out.dim() == 4 else out
    if target is None:
        target = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=out.device)
    return cross_entropy(logits, target, label_smoothing)
