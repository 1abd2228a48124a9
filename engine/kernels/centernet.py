"""The CenterNet detection loss (forward and gradient in one pass) and the decode peak test.

A detection network's output is NHWC `[B, Ho, Wo, C + 4]` (compute dtype):
channels 0..C-1 class heatmap logits, then box width, height (output cells)
and center offset x, y (engine.ir.detection). Targets (engine.training.data.detection,
`CenterNetTargets`): heatmap `[B, Ho, Wo, C]` fp32 Gaussian splats (exactly 1 at
each center), and per object k < K: index `[B, K]` int32 (flat center cell
cy * Wo + cx), size `[B, K, 2]`, offset `[B, K, 2]`, mask `[B, K]` fp32.

With N = max(1, sum(mask)), p = sigmoid(x), x = logit_scale * logits:

    focal  = (1/N) * sum_{cells, classes}  (1-p)^a * -log(p)              where heat == 1
                                           (1-heat)^b * p^a * -log(1-p)    elsewhere
    size   = (1/N) * sum_{objects k, j in w,h} |pred_j(index_k) - size_kj|
    offset = (1/N) * sum_{objects k, j in x,y} |pred_j(index_k) - offset_kj|
    total  = focal + size_weight * size + offset_weight * offset

("Objects as Points", Zhou et al. 2019; a = alpha = 2, b = beta = 4.) log(p) and
log(1 - p) are computed as -softplus(-x) and -softplus(x), so no clamp of p is
needed (the paper's code clamps p to [1e-4, 1 - 1e-4]); the L1 terms sum both
coordinates and divide by the object count. The gradients written:

    d focal / dx = (1-p)^a * (a * p * log(p) - (1 - p))   / N      at centers
                   (1-heat)^b * p^a * (p - a * (1-p) * log(1-p)) / N   elsewhere
    d L1 / dpred_j(cell) = weight * sum_{objects k at cell} sign(pred_j - target_kj) / N

Objects sharing a center cell each add their term (no atomics: every program
compares its cells with all K objects of its image, so the scatter is a sum in
a fixed order). `_centernet_fwd_kernel` computes the loss and the gradient of
`total` at once: the training step runs the backward from the logits with that
gradient (as engine.kernels.loss's cross-entropy does). When one program holds
the batch it also finishes the loss (one launch); otherwise programs write
(focal, size, offset) partial sums and `_centernet_finish_kernel` adds them in
a fixed order (two launches). With a step clock (engine.kernels.clock) the
finishing program adds the batch to the epoch's sums (total and each term, per
image), records the first non-finite loss and advances the step: no host sync.

`_centernet_peaks_kernel` is decoding's first half: sigmoid of the heatmap, a 3x3
max-pool equality test (zero padding is never a maximum: sigmoid > 0), the heat
where a cell is a peak and 0 elsewhere. Top-k and the box assembly run on
PyTorch (engine.training.detection.decode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine import device
from engine.kernels.clock import record_loss
from engine.kernels.common import FLOAT_DTYPES, next_pow2, scale_by_device_scalar
from engine.kernels.launch import launch

REG = 4  # regression channels after the heatmaps: width, height, offset x, offset y
ONE_PROGRAM_ELEMENTS = 1 << 16  # GPU: up to this many (cells x heat channels) finish in one program


@triton.jit
def _softplus(x):
    """log(1 + exp(x)), stable for any x (fp32)."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _count_objects(mask_ptr, BK, BLOCK_N: tl.constexpr):
    """max(1, sum of the [B*K] object mask), summed in a fixed order (fp32 scalar)."""
    offs = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # [BLOCK_N] lane sums
    for n0 in range(0, BK, BLOCK_N):
        acc += tl.load(mask_ptr + n0 + offs, mask=n0 + offs < BK, other=0.0)
    return tl.maximum(tl.sum(acc, axis=0), 1.0)


@triton.jit
def _finish(focal, size, offset, n_obj, B, size_w, off_w, terms_ptr, counters_ptr, stats_ptr, sums_ptr,
            CLOCK: tl.constexpr):
    """Store the terms [focal, size, offset, total] / N; with a clock, add the total (x B images) to the
    epoch's sums (stats) and each term to the clock's term sums, set the NaN guard and advance the
    step (layout: engine.kernels.clock)."""
    f = focal / n_obj
    s = size / n_obj
    o = offset / n_obj
    total = f + size_w * s + off_w * o  # scalar fp32
    tl.store(terms_ptr + 0, f)
    tl.store(terms_ptr + 1, s)
    tl.store(terms_ptr + 2, o)
    tl.store(terms_ptr + 3, total)
    if CLOCK:
        tl.store(sums_ptr + 0, tl.load(sums_ptr + 0) + f.to(tl.float64) * B)  # the clock's terms
        tl.store(sums_ptr + 1, tl.load(sums_ptr + 1) + s.to(tl.float64) * B)
        tl.store(sums_ptr + 2, tl.load(sums_ptr + 2) + o.to(tl.float64) * B)
        record_loss(total, B, counters_ptr, stats_ptr)


@triton.jit
def _centernet_fwd_kernel(
    z_ptr, heat_ptr, index_ptr, size_ptr, offset_ptr, mask_ptr,
    grad_ptr, part_ptr, terms_ptr, counters_ptr, stats_ptr, sums_ptr,
    B, P, C, K, tiles_per_img, tiles_per_prog,
    logit_scale, size_w, off_w, alpha, beta,
    FINISH: tl.constexpr, CLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    CT = C + 4  # channels of a cell in z and grad
    n_obj = _count_objects(mask_ptr, B * K, BLOCK_N)  # scalar fp32 max(1, objects in the batch)
    g_scale = logit_scale / n_obj  # d total / d (focal sum), through the logit scale
    offs_p = tl.arange(0, BLOCK_P)  # [BLOCK_P]
    offs_c = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    offs_j = tl.arange(0, 4)  # [4] regression channel
    is_size = offs_j < 2  # [4] width, height (else offset x, y)
    w_j = tl.where(is_size, size_w, off_w)  # [4] fp32 term weights
    focal_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)  # [BLOCK_P] lane sums of focal terms
    size_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)  # [BLOCK_P] lane sums of |size errors|
    off_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)  # [BLOCK_P] lane sums of |offset errors|
    n_tiles = B * tiles_per_img
    t_end = tl.minimum(pid * tiles_per_prog + tiles_per_prog, n_tiles)
    for t in range(pid * tiles_per_prog, t_end):
        b = t // tiles_per_img
        cells = (t % tiles_per_img) * BLOCK_P + offs_p  # [BLOCK_P] flat cell cy * Wo + cx
        cmask = cells < P
        row = (b * P + cells).to(tl.int64)  # [BLOCK_P] NHWC row of each cell
        # the heatmaps: penalty-reduced focal loss and its gradient
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs_c  # [BLOCK_C]
            m2 = cmask[:, None] & (cols < C)[None, :]
            x = tl.load(z_ptr + row[:, None] * CT + cols[None, :], mask=m2, other=0.0)
            x = x.to(tl.float32) * logit_scale  # [BLOCK_P, BLOCK_C] fp32 logits
            gt = tl.load(heat_ptr + row[:, None] * C + cols[None, :], mask=m2, other=0.0)  # [BLOCK_P, BLOCK_C]
            nlp = _softplus(-x)  # -log(p)
            nlq = _softplus(x)  # -log(1 - p)
            p = tl.exp(-nlp)  # sigmoid(x)
            q = tl.exp(-nlq)  # 1 - sigmoid(x), without cancellation
            pa = tl.exp(-alpha * nlp)  # p^alpha
            qa = tl.exp(-alpha * nlq)  # (1 - p)^alpha
            one_m = 1.0 - gt
            wneg = tl.where(one_m > 0.0, tl.exp(beta * tl.log(tl.maximum(one_m, 1e-30))), 0.0)  # (1-gt)^beta
            pos = gt == 1.0
            loss = tl.where(pos, qa * nlp, wneg * pa * nlq)  # [BLOCK_P, BLOCK_C] fp32
            g = tl.where(pos, qa * (-alpha * p * nlp - q), wneg * pa * (p + alpha * q * nlq))
            focal_acc += tl.sum(tl.where(m2, loss, 0.0), axis=1)
            tl.store(grad_ptr + row[:, None] * CT + cols[None, :], (g * g_scale).to(grad_ptr.dtype.element_ty),
                     mask=m2)
        # the regression channels: L1 at the object centres of image b
        mreg = cmask[:, None] & (offs_j < 4)[None, :]  # [BLOCK_P, 4]
        reg = tl.load(z_ptr + row[:, None] * CT + C + offs_j[None, :], mask=mreg, other=0.0)
        reg = reg.to(tl.float32) * logit_scale  # [BLOCK_P, 4] fp32 predictions
        gsum = tl.zeros((BLOCK_P, 4), dtype=tl.float32)  # [BLOCK_P, 4] sum of sign(error) over objects
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k  # [BLOCK_K]
            kmask = ks < K
            obj = b * K + ks  # [BLOCK_K] object slot
            live = tl.load(mask_ptr + obj, mask=kmask, other=0.0) > 0.0  # [BLOCK_K] real objects
            centre = tl.load(index_ptr + obj, mask=kmask, other=-1)  # [BLOCK_K] flat centre cell
            jsz = tl.minimum(offs_j, 1)  # [4] column in size/offset: 0, 1, 1, 1 (masked below)
            jof = tl.maximum(offs_j - 2, 0)  # [4] 0, 0, 0, 1
            tsz = tl.load(size_ptr + obj[:, None] * 2 + jsz[None, :],
                          mask=kmask[:, None] & is_size[None, :], other=0.0)  # [BLOCK_K, 4]
            tof = tl.load(offset_ptr + obj[:, None] * 2 + jof[None, :],
                          mask=kmask[:, None] & (offs_j >= 2)[None, :], other=0.0)  # [BLOCK_K, 4]
            tgt = tl.where(is_size[None, :], tsz, tof)  # [BLOCK_K, 4] fp32 targets
            hit = (centre[None, :] == cells[:, None]) & live[None, :] & cmask[:, None]  # [BLOCK_P, BLOCK_K]
            diff = reg[:, None, :] - tgt[None, :, :]  # [BLOCK_P, BLOCK_K, 4]
            ad = tl.where(hit[:, :, None], tl.abs(diff), 0.0)  # [BLOCK_P, BLOCK_K, 4]
            sgn = tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
            gsum += tl.sum(tl.where(hit[:, :, None], sgn, 0.0), axis=1)
            err = tl.sum(ad, axis=1)  # [BLOCK_P, 4]
            size_acc += tl.sum(tl.where(is_size[None, :], err, 0.0), axis=1)
            off_acc += tl.sum(tl.where(is_size[None, :], 0.0, err), axis=1)
        greg = gsum * w_j[None, :] * g_scale  # [BLOCK_P, 4] fp32
        tl.store(grad_ptr + row[:, None] * CT + C + offs_j[None, :], greg.to(grad_ptr.dtype.element_ty), mask=mreg)
    focal = tl.sum(focal_acc, axis=0)
    size = tl.sum(size_acc, axis=0)
    offset = tl.sum(off_acc, axis=0)
    if FINISH:
        _finish(focal, size, offset, n_obj, B, size_w, off_w, terms_ptr, counters_ptr, stats_ptr, sums_ptr, CLOCK)
    else:
        tl.store(part_ptr + pid * 3, focal)
        tl.store(part_ptr + pid * 3 + 1, size)
        tl.store(part_ptr + pid * 3 + 2, offset)


@triton.jit
def _centernet_finish_kernel(part_ptr, mask_ptr, T, B, K, size_w, off_w, terms_ptr, counters_ptr, stats_ptr,
                             sums_ptr, CLOCK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: add the [T, 3] (focal, size, offset) partials in a fixed order, then `_finish`."""
    offs = tl.arange(0, BLOCK)  # [BLOCK]
    f = tl.zeros((BLOCK,), dtype=tl.float32)  # [BLOCK] lane sums
    s = tl.zeros((BLOCK,), dtype=tl.float32)  # [BLOCK]
    o = tl.zeros((BLOCK,), dtype=tl.float32)  # [BLOCK]
    for t0 in range(0, T, BLOCK):
        m = t0 + offs < T
        f += tl.load(part_ptr + (t0 + offs) * 3, mask=m, other=0.0)
        s += tl.load(part_ptr + (t0 + offs) * 3 + 1, mask=m, other=0.0)
        o += tl.load(part_ptr + (t0 + offs) * 3 + 2, mask=m, other=0.0)
    n_obj = _count_objects(mask_ptr, B * K, BLOCK_N)
    _finish(tl.sum(f, axis=0), tl.sum(s, axis=0), tl.sum(o, axis=0), n_obj, B, size_w, off_w,
            terms_ptr, counters_ptr, stats_ptr, sums_ptr, CLOCK)


@triton.jit
def _centernet_peaks_kernel(z_ptr, out_ptr, M, H, W, C, logit_scale, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[cell, c] = sigmoid(x) if it is the max of its 3x3 neighbourhood (same class), else 0."""
    pid = tl.program_id(0)
    CT = C + 4
    cells = pid * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] flat n*H*W + h*W + w
    pm = cells < M
    w = cells % W
    h = (cells // W) % H
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
        m2 = pm[:, None] & (cols < C)[None, :]
        x = tl.load(z_ptr + cells.to(tl.int64)[:, None] * CT + cols[None, :], mask=m2, other=0.0)
        s = 1.0 / (1.0 + tl.exp(-(x.to(tl.float32) * logit_scale)))  # [BLOCK_P, BLOCK_C] fp32 heat
        best = s
        for dy in tl.static_range(3):
            for dx in tl.static_range(3):
                hh = h + (dy - 1)
                ww = w + (dx - 1)
                inside = pm & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)  # [BLOCK_P]
                nb = (cells + (dy - 1) * W + (dx - 1)).to(tl.int64)  # [BLOCK_P] neighbour cell
                mn = inside[:, None] & (cols < C)[None, :]
                y = tl.load(z_ptr + nb[:, None] * CT + cols[None, :], mask=mn, other=0.0)
                sy = 1.0 / (1.0 + tl.exp(-(y.to(tl.float32) * logit_scale)))  # [BLOCK_P, BLOCK_C]
                best = tl.maximum(best, tl.where(mn, sy, 0.0))
        tl.store(out_ptr + cells.to(tl.int64)[:, None] * C + cols[None, :], tl.where(s == best, s, 0.0), mask=m2)


# ----------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class Targets:
    """The tensors the loss reads (engine.training.data.detection.CenterNetTargets has the same fields)."""

    heatmap: torch.Tensor  # [B, Ho, Wo, C] fp32
    index: torch.Tensor  # [B, K] int32
    size: torch.Tensor  # [B, K, 2] fp32
    offset: torch.Tensor  # [B, K, 2] fp32
    mask: torch.Tensor  # [B, K] fp32


def placeholder_targets(batch: int, output_shape, device=None, max_objects: int = 1) -> Targets:
    """Targets of the right shapes and dtypes for a network whose per-image output is `[C+4, Ho, Wo]`:
    one object of class 0 at cell 0 of every image (dry runs, compile checks, benchmarks: the values
    do not matter, the shapes and the kernels launched do)."""
    ct, ho, wo = (int(v) for v in output_shape)
    heat = torch.zeros((batch, ho, wo, ct - REG), dtype=torch.float32, device=device)
    mask = torch.zeros((batch, max_objects), dtype=torch.float32, device=device)
    if heat.device.type != "meta":
        heat[:, 0, 0, 0] = 1.0
        mask[:, 0] = 1.0
    return Targets(heat, torch.zeros((batch, max_objects), dtype=torch.int32, device=device),
                   torch.ones((batch, max_objects, 2), dtype=torch.float32, device=device),
                   torch.zeros((batch, max_objects, 2), dtype=torch.float32, device=device), mask)


def _plan(B: int, P: int, C: int, K: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_P, BLOCK_C, BLOCK_K, tiles per image, tiles per program, num_warps)."""
    block_k = min(next_pow2(max(K, 1)), 64 if device.INTERPRETED else 16)
    if device.INTERPRETED:
        block_c = min(next_pow2(C), 64)
        block_p = max(16, min(next_pow2(P), (1 << 16) // max(block_c, block_k * 4)))
        tiles = triton.cdiv(P, block_p)
        return block_p, block_c, block_k, tiles, B * tiles, 4  # one program: the interpreter pays per program
    block_c = min(next_pow2(C), 32)
    block_p = max(16, min(next_pow2(P), 64))
    tiles = triton.cdiv(P, block_p)
    per_prog = B * tiles if B * P * block_c <= ONE_PROGRAM_ELEMENTS else 1
    return block_p, block_c, block_k, tiles, per_prog, 4


def _check(z, heat, index, size, offset, mask) -> tuple[int, int, int, int, int]:
    if z.dim() != 4 or z.shape[-1] < REG + 1:
        raise ValueError(f"centernet: logits must be NHWC [B, Ho, Wo, classes+4] with classes >= 1, "
                         f"got {tuple(z.shape)}")
    if z.dtype not in FLOAT_DTYPES:
        raise ValueError(f"centernet: logits dtype must be fp32/fp16/bf16, got {z.dtype}")
    B, Ho, Wo, CT = z.shape
    C = CT - REG
    K = index.shape[-1] if index.dim() == 2 else -1
    want = {"heatmap": (heat, (B, Ho, Wo, C), torch.float32), "index": (index, (B, K), torch.int32),
            "size": (size, (B, K, 2), torch.float32), "offset": (offset, (B, K, 2), torch.float32),
            "mask": (mask, (B, K), torch.float32)}
    for name, (t, shape, dtype) in want.items():
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"centernet: {name} must be {dtype} {shape} for logits {tuple(z.shape)}, "
                             f"got {t.dtype} {tuple(t.shape)}")
        if t.device != z.device:
            raise ValueError(f"centernet: logits on {z.device} but {name} on {t.device}")
    return B, Ho * Wo, C, K, CT


def centernet_forward(z: torch.Tensor, heat: torch.Tensor, index: torch.Tensor, size: torch.Tensor,
                      offset: torch.Tensor, mask: torch.Tensor, *, size_weight: float = 0.1,
                      offset_weight: float = 1.0, alpha: float = 2.0, beta: float = 4.0,
                      logit_scale: float = 1.0, clock=None) -> tuple[torch.Tensor, torch.Tensor]:
    """NHWC logits `[B, Ho, Wo, C+4]` and the targets -> (terms: fp32 [4] focal, size, offset, total;
    d total / d logits, shaped and typed like the logits). One launch when one program holds the
    batch, else two. `clock`: also the epoch's sums, the NaN guard and the step (module docstring)."""
    B, P, C, K, CT = _check(z, heat, index, size, offset, mask)
    z, heat, index, size, offset, mask = (t.contiguous() for t in (z, heat, index, size, offset, mask))
    grad = torch.empty_like(z)
    terms = torch.empty(4, device=z.device, dtype=torch.float32)
    block_p, block_c, block_k, tiles, per_prog, warps = _plan(B, P, C, K)
    n_prog = triton.cdiv(B * tiles, per_prog)
    part = None if n_prog == 1 else torch.empty((n_prog, 3), device=z.device, dtype=torch.float32)
    counters, stats, sums = (clock.counters, clock.stats, clock.terms) if clock is not None else (None, None, None)
    block_n = min(next_pow2(max(B * K, 1)), 1024)
    weights = (float(size_weight), float(offset_weight))
    launch(_centernet_fwd_kernel, (n_prog,), z, heat, index, size, offset, mask, grad, part, terms, counters,
           stats, sums, B, P, C, K, tiles, per_prog, float(logit_scale), *weights, float(alpha), float(beta),
           FINISH=n_prog == 1, CLOCK=clock is not None, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=block_k,
           BLOCK_N=block_n, num_warps=warps)
    if n_prog > 1:
        launch(_centernet_finish_kernel, (1,), part, mask, n_prog, B, K, *weights, terms, counters, stats, sums,
               CLOCK=clock is not None, BLOCK=1024, BLOCK_N=block_n, num_warps=4)
    return terms, grad


def centernet_backward(grad: torch.Tensor, dterms: torch.Tensor) -> torch.Tensor:
    """d logits = grad * dterms[3] (the total's incoming gradient; the terms are not differentiated)."""
    return scale_by_device_scalar(grad, dterms.contiguous()[3:])


class CenterNetFunction(torch.autograd.Function):
    """The loss terms [4] (focal, size, offset, total) of NHWC logits; the backward is the total's."""

    @staticmethod
    def forward(ctx, z, heat, index, size, offset, mask, kw):
        terms, grad = centernet_forward(z, heat, index, size, offset, mask, **kw)
        ctx.save_for_backward(grad)
        return terms

    @staticmethod
    def backward(ctx, dterms):
        (grad,) = ctx.saved_tensors
        return centernet_backward(grad, dterms), None, None, None, None, None, None


def centernet_loss(z: torch.Tensor, targets, *, size_weight: float = 0.1, offset_weight: float = 1.0,
                   alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """The loss terms fp32 [4] (focal, size, offset, total) of NHWC logits against `targets` (any object
    with heatmap, index, size, offset, mask tensors on the logits' device); differentiable through
    the total (terms[3])."""
    kw = dict(size_weight=size_weight, offset_weight=offset_weight, alpha=alpha, beta=beta)
    return CenterNetFunction.apply(z, targets.heatmap, targets.index, targets.size, targets.offset,
                                   targets.mask, kw)


def centernet_step(z: torch.Tensor, targets, *, size_weight: float = 0.1, offset_weight: float = 1.0,
                   alpha: float = 2.0, beta: float = 4.0, logit_scale: float = 1.0,
                   clock=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training step's loss: (terms fp32 [4], d total / d logits), no autograd node (the step
    runs the backward from the logits with that gradient)."""
    return centernet_forward(z, targets.heatmap, targets.index, targets.size, targets.offset, targets.mask,
                             size_weight=size_weight, offset_weight=offset_weight, alpha=alpha, beta=beta,
                             logit_scale=logit_scale, clock=clock)


def heat_peaks(z: torch.Tensor, logit_scale: float = 1.0) -> torch.Tensor:
    """NHWC logits `[B, Ho, Wo, C+4]` -> fp32 `[B, Ho, Wo, C]`: the sigmoid heat at cells that are the
    maximum of their 3x3 neighbourhood (per class), 0 elsewhere. One launch."""
    if z.dim() != 4 or z.shape[-1] < REG + 1 or z.dtype not in FLOAT_DTYPES:
        raise ValueError(f"heat_peaks: logits must be NHWC [B, Ho, Wo, classes+4] fp32/fp16/bf16, "
                         f"got {z.dtype} {tuple(z.shape)}")
    z = z.contiguous()
    B, H, W, CT = z.shape
    C = CT - REG
    out = torch.empty((B, H, W, C), device=z.device, dtype=torch.float32)
    M = B * H * W
    if M:
        block_c = min(next_pow2(C), 64 if device.INTERPRETED else 32)
        block_p = max(16, min(next_pow2(M), (1 << 15) // block_c)) if device.INTERPRETED else 64
        launch(_centernet_peaks_kernel, (triton.cdiv(M, block_p),), z, out, M, H, W, C, float(logit_scale),
               BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return out
