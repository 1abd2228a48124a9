"""The autograd Function of the fused NHWC convolution: forward through
engine.kernels.conv.forward, backward through engine.kernels.conv.backward.

Public API: Conv2dFunction, conv2d.
"""
from __future__ import annotations

import os

import torch

from engine.errors import UsageError
from engine.kernels.activations import act_code
from engine.kernels.batchnorm.backward import bn_apply_dx
from engine.kernels.batchnorm.training import BatchStats
from engine.kernels.common import pair
from engine.kernels.conv.backward import act_backward, conv2d_dgrad, conv2d_wgrad
from engine.kernels.conv.forward import conv2d_forward
from engine.kernels.conv.geometry import out_hw
from engine.kernels.dropout import dropout_backward
from engine.kernels.layout import channel_multiple, pad_channels, padded_channels
from engine.kernels.params import claim_grad_slot, slot_view
from engine.kernels.pool import max_pool2d_backward

# How the backward of a fused conv -> max pool gets the full-resolution gradient:
# "kernel": one gather kernel (pool.max_pool2d_backward) expands the pooled gradient through
#   the argmax, then the plain dgrad and wgrad read it;
# "operand": dgrad and wgrad expand it inside their dy loads (no full-res dy in HBM: 0.72 GB
#   less traffic per airbench94 step, but 4 instructions per expanded element per tap make
#   those loops instruction-bound: sm_90 issue/tensor 0.46-1.05 -> 0.89-3.93, and the static
#   step estimate 1,695 us against ~1,390 us; docs/PERF_MODEL.md).
# "kernel" is the default until a GPU says otherwise; FUSENET_POOL_GRAD=operand selects the other.
POOL_GRAD = os.environ.get("FUSENET_POOL_GRAD", "kernel")
if POOL_GRAD not in ("kernel", "operand"):
    raise UsageError(f"environment variable FUSENET_POOL_GRAD={POOL_GRAD!r} is not a choice\n"
                     "hint: set it to 'kernel' (the default) or 'operand', or unset it")


class Conv2dFunction(torch.autograd.Function):
    """y = dropout(act(conv(x, w) + bias [* scale + shift] + residual)), NHWC,
    differentiable in x, w, bias, residual.

    scale/shift are treated as constants (folded inference BN): no gradient.
    `out` (first, see forward): a view of a larger buffer written in place.
    Dropout's mask is regenerated from its seed in the backward.
    The weights the kernels read are the fused optimizer's packed copies when it
    keeps them (engine.kernels.conv.weights), and the weight and bias gradients
    land in their slots of its flat gradient buffer when `conv2d` claimed them.
    stats=True also returns the per-tile partial sums of the pre-activation
    (psum, psumsq, fp32 [T, Cout]) for a training-mode batch norm that follows:
    statistics, not values, so they carry no gradient (the batch norm's own
    backward accounts for its statistics' dependence on its input).
    pool=K: a K x K / stride K max pool (no padding, floor mode) fused after the conv: the
    output is the pooled [N, Ho//K, Wo//K, Cout] (its statistics too), the forward saves the
    one-byte argmax, and the backward expands the pooled gradient through it (POOL_GRAD: one
    gather kernel, or inside the dgrad/wgrad dy loads). Differentiable only without act,
    scale/shift, residual and dropout (none of them has a backward through the pool here).
    Backward hand-offs (engine.kernels.batchnorm.backward): grad_link (a BnGradLink) when x is
    act(bn(.)) of a training batch norm read only here: the dgrad epilogue returns that batch
    norm's dz and leaves its gradient sums on the link. pool_link (a PoolGradLink) when the pooled
    output feeds only a training batch norm: its backward writes the full-resolution gradient
    (POOL_GRAD "kernel"), which the backward here takes from the link. apply_link (a BnApplyLink) when
    the output feeds only a training batch norm and no activation, scale, residual, dropout or pool
    comes between: that batch norm's backward may leave its apply to the wgrad here.
    """

    @staticmethod
    def forward(ctx, out, x, w, bias, residual, stride, padding, dilation, groups, act, slope, allow_tf32,
                scale=None, shift=None, dropout_p=0.0, dropout_seed=0, stats=False, slots=(None, None), pool=0,
                grad_link=None, pool_link=None, stats_tail=None, apply_link=None):
        # `out` comes first: autograd's handling of in-place writes into views
        # (CopySlices) expects the written tensor to be the first input
        code = act_code(act)
        # a channel count off 16-byte rows (an RGB stem's 3) is padded once here, so the forward
        # and the wgrad both read 16-byte rows and the padded copy is what the backward keeps
        xs, channels = x, None
        if groups == 1 and x.dim() == 4 and x.shape[3] % channel_multiple(x.dtype):
            xs, channels = pad_channels(x, padded_channels(x.shape[3], x.dtype)), x.shape[3]
        res = conv2d_forward(xs, w, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                             scale=scale, shift=shift, residual=residual, act=act, slope=slope,
                             save_pre=code != 0 and not pool, allow_tf32=allow_tf32, dropout_p=dropout_p,
                             dropout_seed=dropout_seed, out=out, stats=stats, channels=channels, pool=pool,
                             stats_tail=stats_tail)
        ctx.x_shape, ctx.channels = tuple(x.shape), channels
        ctx.dropout = (dropout_p, dropout_seed)
        ctx.wrote_into = out is not None
        if out is not None:
            # written in place into a slice of a larger buffer (a concat): autograd
            # routes that slice of the buffer's gradient back here
            ctx.mark_dirty(out)
        ctx.save_for_backward(xs, w, res.z, scale, res.idx)
        ctx.pool = pool
        if pool:  # the output rows and columns the pool read (it dropped any past a whole window)
            Ho, Wo = out_hw(xs.shape[1], xs.shape[2], *w.shape[2:], stride, padding, dilation)
            ctx.pool_hw = (Ho // pool * pool, Wo // pool * pool)
        if apply_link is not None and (code != 0 or pool or bias is not None or scale is not None
                                       or residual is not None or dropout_p > 0 or out is not None):
            raise ValueError("conv2d: apply_link needs the plain conv output (no activation, bias, scale, "
                             "residual, dropout, pool or out)")
        ctx.links = grad_link, (pool_link if pool and POOL_GRAD == "kernel" else None), apply_link
        if ctx.links[1] is not None:
            pool_link.pool = (res.idx, pool, (x.shape[0], *ctx.pool_hw, w.shape[0]))
        ctx.conf = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, allow_tf32=allow_tf32)
        ctx.act, ctx.slope = act, slope
        ctx.has_res = residual is not None
        ctx.slots = slots  # the flat-gradient slots `conv2d` claimed for w and bias (grad mode is off in here)
        if stats:  # the partial sums, or the statistics the kernel finished (stats_tail)
            a, b = res.stats if res.stats is not None else (res.psum, res.psumsq)
            ctx.mark_non_differentiable(a, b)
            return res.y, a, b
        return res.y

    @staticmethod
    def backward(ctx, dy, *_stats_grads):  # the partial sums (stats=True) have no gradient
        x, w, z, scale, idx = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[1:5]
        bn_apply = ctx.links[2].take() if ctx.links[2] is not None else None
        if ctx.links[1] is not None:  # dy is the batch norm's placeholder: the real one is on the link
            dy = ctx.links[1].take_grad()  # full resolution (no act, residual or dropout before a pool)
        elif bn_apply is not None:  # a placeholder too: the batch norm after left its dz and apply here
            dy = bn_apply[0]
            if need_x:  # dgrad reads dy too: the batch norm's dx, once
                dy, bn_apply = bn_apply_dx(dy, bn_apply), None
        else:
            dy = dy.contiguous()
        if ctx.dropout[0] > 0:  # the forward's mask, regenerated from its seed
            dy = dropout_backward(dy, *ctx.dropout)
        act, dres = ctx.act, None
        if act_code(act) != 0 and ctx.has_res and need_r:
            # dz is the residual's gradient: materialise it once, then plain GEMMs
            dz = act_backward(dy, z, act_code(act), ctx.slope)
            dres, g, z, act = dz, dz, None, "none"
        else:
            # dz is formed on the fly inside dgrad/wgrad (act none: dz = dy)
            g = dy
            if need_r:
                dres = dy
        bw = dict(z=z, act=act, slope=ctx.slope, grad_scale=scale, **ctx.conf)
        if ctx.pool and POOL_GRAD == "operand":  # dy is the pooled gradient, expanded in the kernels' loads
            bw.update(pool=ctx.pool, pool_idx=idx)
        elif ctx.pool:
            # the full-resolution gradient, expanded once through the argmax (by the batch norm's
            # backward, or here), stops at the rows the pool read: dgrad and wgrad take the rest as zeros
            if ctx.links[1] is None:
                g = max_pool2d_backward(g, idx, (g.shape[0], *ctx.pool_hw, g.shape[3]), ctx.pool, ctx.pool, 0)
            bw.update(extent=ctx.pool_hw)
        dx, bn_link = None, ctx.links[0]
        if need_x and bn_link is not None and bn_link.saved is not None:  # dz of the bn that made x, and its sums
            dx, bn_link.sums = conv2d_dgrad(g, w, ctx.x_shape, bn_grad=bn_link.saved, **bw)
        elif need_x:
            dx = conv2d_dgrad(g, w, ctx.x_shape, **bw)
        dw = db = None
        if need_w or need_b:
            # straight into the optimizer's flat gradient buffer when the forward claimed the slots
            out = slot_view(ctx.slots[0]) if need_w else None
            bias_out = slot_view(ctx.slots[1]) if need_b else None
            dw, db = conv2d_wgrad(x, g, w.shape, need_bias=need_b, channels=ctx.channels, out=out,
                                  bias_out=bias_out, bn_apply=bn_apply, weight=w, **bw)
        # `out`'s overwritten contents get a zero gradient; it must be a real tensor
        # (autograd's CopySlices drops the buffer's gradient when it is None), and a
        # stride-0 expanded scalar costs no memory
        dout = torch.zeros((), device=dy.device, dtype=dy.dtype).expand(dy.shape) if ctx.wrote_into else None
        return (dout, dx, (dw if need_w else None), db, dres, None, None, None, None, None, None, None, None,
                None, None, None, None, None, None, None, None, None, None)


def conv2d(x, w, bias=None, *, residual=None, stride=1, padding=0, dilation=1, groups=1, act="none",
           slope=0.01, allow_tf32=False, scale=None, shift=None, dropout_p=0.0, dropout_seed=0,
           out=None, stats=False, pool=0, grad_link=None, pool_link=None, stats_tail=None, apply_link=None):
    """Differentiable fused NHWC conv: dropout(act(conv(x, w) + bias [*scale + shift] + residual)),
    then a fused pool x pool max pool when pool > 0 (see Conv2dFunction).

    `out`: a view (e.g. `buf[..., c0:c1]` of a concat buffer) to write the result
    into, in place; it is returned, and gradients flow through the buffer.
    stats=True returns (y, (psum, psumsq)): fp32 [T, Cout] per-tile partial sums
    of the pre-activation, for batch_norm_train(partials=...); with stats_tail (a StatsTail: the
    batch norm's running statistics) and groups 1, (y, BatchStats) instead: the kernel's last
    programs finished the statistics. grad_link, pool_link, apply_link: the backward hand-offs with the
    batch norms before and after (Conv2dFunction)."""
    geometry = pair(stride, "conv2d: stride"), pair(padding, "conv2d: padding"), pair(dilation, "conv2d: dilation")
    if pool and (act != "none" or scale is not None or shift is not None) and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, w, bias)):
        raise ValueError("conv2d: an activation or folded scale before a fused pool has no backward; "
                         "fuse them with the pool only without gradients (inference)")
    slots = (claim_grad_slot(w), claim_grad_slot(bias) if bias is not None else None)
    result = Conv2dFunction.apply(out, x, w, bias, residual, *geometry, groups, act, slope, allow_tf32, scale, shift,
                                  dropout_p, dropout_seed, stats, slots, pool, grad_link, pool_link,
                                  stats_tail, apply_link)
    if stats:
        y, a, b = result
        # finished statistics are [Cout] vectors, partial sums [T, Cout] rows (ConvOutput)
        return y, (BatchStats(a, b) if a.dim() == 1 else (a, b))
    return result
