"""One executor per kernel family: how a planned kernel group runs on fusenet's kernels.

An executor takes the forward pass's `Pass` (the network, the plan and the
values computed so far) and a `KernelGroup`, reads the group's typed epilogue,
and calls its family's autograd-aware launcher (engine.kernels), so the
backward pass runs on the family's backward kernels. `EXECUTORS` maps each
`Family` of the op registry to its executor; the runtime looks groups up
there and never branches on op names.
"""
from __future__ import annotations

from typing import Callable

import torch

from engine.ir.graph import Node
from engine.ir.ops import Family
from engine.kernels import batchnorm as K_bn
from engine.kernels import concat as K_concat
from engine.kernels import conv as K_conv
from engine.kernels import dropout as K_drop
from engine.kernels import global_pool as K_gpool
from engine.kernels import linear as K_linear
from engine.kernels import pointwise as K_pw
from engine.kernels import pool as K_pool
from engine.kernels import resample as K_rs
from engine.kernels import softmax as K_sm
from engine.kernels.activations import ACTIVATIONS
from engine.passes.plan import KernelGroup


def activation(node: Node | None) -> tuple[str, float]:
    """(name, parameter) of an activation node for the kernels' ACT and `p` ("none" for None)."""
    if node is None:
        return "none", 0.0
    act = ACTIVATIONS[node.op]
    return node.op, float(node.attr(act.param)) if act.param else 0.0


def dropout_seed(p=None, node_id: int = 0, on_device: bool = True):
    """A dropout mask's seed. Under a training step's clock (`Pass.clock`), a ClockSeed:
    drawn on the device per step, so a captured step replays with fresh masks. Otherwise
    (or for a launcher that takes only integers: `on_device=False`) an int drawn from
    torch's CPU generator: torch.manual_seed reproduces it and a checkpoint's saved RNG
    state resumes it exactly."""
    if p is not None and p.clock is not None and on_device:
        return K_drop.ClockSeed(p.clock, node_id)
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _dropout(p, node_id: int | None, on_device: bool = True) -> dict:
    """The dropout keyword arguments of a GEMM launcher for the epilogue's dropout node."""
    if node_id is None or not p.training:
        return {}
    prob = p.graph.node(node_id).attrs["p"]
    return dict(dropout_p=prob, dropout_seed=dropout_seed(p, node_id, on_device)) if prob > 0 else {}


def conv(p, group: KernelGroup) -> torch.Tensor:
    e = group.epilogue
    anchor = p.graph.node(group.anchor)
    x = p.values[anchor.inputs[0]]
    layer, a = p.net.layer(anchor), anchor.attrs
    scale = shift = residual = None
    if e.folded_bn is not None:
        bn = p.net.layer(p.graph.node(e.folded_bn))
        # the kernel computes (acc + bias) * scale + shift == bn(conv(x))
        scale, shift = K_bn.bn_eval_scale_shift(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    if e.residual is not None:
        residual = p.values[p.graph.node(e.residual).inputs[1]]
    act, slope = activation(p.node_or_none(e.act))
    stats = e.stats is not None and p.training
    pool = p.graph.node(e.pool).attrs["kernel"][0] if e.pool is not None else 0
    # backward hand-offs: the bn that made x takes dz and its sums from this dgrad; the bn reading the
    # pooled output writes this conv's full-resolution gradient
    grad_link = p.grad_links.pop(anchor.inputs[0], None)
    pool_link = stats_tail = apply_link = None
    if e.pool_grad_by is not None and p.training:
        pool_link = p.pool_links[group.output] = K_bn.PoolGradLink()
    if e.apply_by is not None and p.training:  # the bn reading the output leaves its dx to the wgrad
        apply_link = p.apply_links[group.output] = K_bn.BnApplyLink()
    if stats:  # the kernel's last programs finish the bn's statistics (running ones included)
        bn = p.net.layer(p.graph.node(e.stats))
        stats_tail = K_bn.StatsTail(bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps)
    y = K_conv.conv2d(x, layer.weight, layer.bias, residual=residual, stride=a["stride"], padding=a["pad"],
                      dilation=a["dilation"], groups=a["groups"], act=act, slope=slope,
                      allow_tf32=p.net.allow_tf32, scale=scale, shift=shift, out=p.concat_slice(group, x.shape[0]),
                      stats=stats, pool=pool, grad_link=grad_link, pool_link=pool_link, stats_tail=stats_tail,
                      apply_link=apply_link,
                      **_dropout(p, e.dropout, on_device=False))  # conv takes int seeds (for now)
    if stats:  # the batch statistics of the bn that reads this output (partial sums, or finished)
        y, p.bn_partials[group.output] = y
        if y.grad_fn is not None:
            # the statistics are marked non-differentiable and their backward ignores
            # their gradients: do not let autograd fill two zero tensors per conv for them
            # (Conv2dFunction should say so itself, ctx.set_materialize_grads(False))
            y.grad_fn.set_materialize_grads(False)
    return y


def linear(p, group: KernelGroup) -> torch.Tensor:
    e = group.epilogue
    anchor = p.graph.node(group.anchor)
    layer = p.net.layer(anchor)
    act, slope = activation(p.node_or_none(e.act))
    return K_linear.linear(p.values[anchor.inputs[0]], layer.weight, layer.bias, act=act, slope=slope,
                           allow_tf32=p.net.allow_tf32, **_dropout(p, e.dropout))


def batch_norm(p, group: KernelGroup) -> torch.Tensor:
    anchor = p.graph.node(group.anchor)
    x, bn = p.values[anchor.inputs[0]], p.net.layer(anchor)
    act, slope = activation(p.node_or_none(group.epilogue.act))
    if p.training:
        grad_link = None
        if group.epilogue.sums_by is not None:  # the conv reading the output makes dz and the sums
            grad_link = p.grad_links[group.output] = K_bn.BnGradLink()
        return K_bn.batch_norm_train(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum=bn.momentum,
                                     eps=bn.eps, num_batches_tracked=bn.num_batches_tracked, act=act, slope=slope,
                                     partials=p.bn_partials.pop(anchor.inputs[0], None), grad_link=grad_link,
                                     pool_link=p.pool_links.pop(anchor.inputs[0], None),
                                     apply_link=p.apply_links.pop(anchor.inputs[0], None))
    return K_bn.batch_norm_eval(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, act, slope)


def single_activation(p, group: KernelGroup) -> torch.Tensor:
    node = p.graph.node(group.anchor)
    return K_pw.activation(p.values[node.inputs[0]], *activation(node))


def pointwise_chain(p, group: KernelGroup) -> torch.Tensor:
    """A run of activations and constant scales in one kernel."""
    links = []
    for node in p.plan.nodes_of(group):
        links.append(("scale", node.attrs["factor"]) if node.op == "scale" else activation(node))
    return K_pw.pointwise_chain(p.values[p.graph.node(group.anchor).inputs[0]], links)


def add(p, group: KernelGroup) -> torch.Tensor:
    anchor = p.graph.node(group.anchor)
    a, b = (p.values[i] for i in anchor.inputs)
    return K_pw.add_act(a, b, *activation(p.node_or_none(group.epilogue.act)))


def scale(p, group: KernelGroup) -> torch.Tensor:
    node = p.graph.node(group.anchor)
    return K_pw.scale(p.values[node.inputs[0]], node.attrs["factor"])


def pool(p, group: KernelGroup) -> torch.Tensor:
    node = p.graph.node(group.anchor)
    a, x = node.attrs, p.values[node.inputs[0]]
    if node.op != "maxpool":
        return K_pool.avg_pool2d(x, a["kernel"], a["stride"], a["pad"])
    stats = group.epilogue.stats is not None and p.training
    y = K_pool.max_pool2d(x, a["kernel"], a["stride"], a["pad"], stats=stats,
                          grad_link=p.grad_links.pop(node.inputs[0], None))  # the bn before makes its sums here
    if stats:  # the partial sums of the bn that reads this output
        y, p.bn_partials[group.output] = y
    return y


def global_pool(p, group: KernelGroup) -> torch.Tensor:
    node = p.graph.node(group.anchor)
    x = p.values[node.inputs[0]]
    return K_gpool.global_max_pool(x) if node.op == "global_maxpool" else K_gpool.global_avg_pool(x)


def blurpool(p, group: KernelGroup) -> torch.Tensor:
    node = p.graph.node(group.anchor)
    return K_rs.blurpool(p.values[node.inputs[0]], node.attrs["filter"], node.attrs["stride"])


def upsample(p, group: KernelGroup) -> torch.Tensor:
    node = p.graph.node(group.anchor)
    return K_rs.upsample(p.values[node.inputs[0]], node.attrs["factor"], node.attrs["mode"])


def concat(p, group: KernelGroup) -> torch.Tensor:
    """The concat's buffer, with the inputs not already written in place by their producers copied in."""
    node = p.graph.node(group.anchor)
    current = p.values[node.inputs[0]]
    buf = p.concat_buffer(node.id, current.shape[0])
    c0 = 0
    for slot, src in enumerate(node.inputs):
        v = current if slot == 0 else p.values[src]
        width = v.shape[-1]
        if src not in group.in_place:
            K_concat.copy_into(buf[..., c0:c0 + width], v)  # in place: autograd tracks it through buf
        c0 += width
    return buf


def flatten(p, group: KernelGroup) -> torch.Tensor:
    # PyTorch flattens C, H, W in that order; NHWC must be put in NCHW order
    # first so linear weights mean the same in both backends (a copy, no arithmetic).
    x = p.values[p.graph.node(group.anchor).inputs[0]]
    return x.permute(0, 3, 1, 2).contiguous().reshape(x.shape[0], -1) if x.dim() == 4 else x


def dropout(p, group: KernelGroup) -> torch.Tensor:
    node = p.graph.node(group.anchor)
    x = p.values[node.inputs[0]]
    if not p.training or node.attrs["p"] == 0.0:
        return x
    return K_drop.dropout(x, node.attrs["p"], dropout_seed(p, node.id), True)


def softmax(p, group: KernelGroup) -> torch.Tensor:
    return K_sm.softmax(p.values[p.graph.node(group.anchor).inputs[0]])


EXECUTORS: dict[Family, Callable] = {
    Family.CONV: conv,
    Family.LINEAR: linear,
    Family.BATCH_NORM: batch_norm,
    Family.ACTIVATION: single_activation,
    Family.POINTWISE: pointwise_chain,
    Family.ADD: add,
    Family.SCALE: scale,
    Family.POOL: pool,
    Family.GLOBAL_POOL: global_pool,
    Family.BLURPOOL: blurpool,
    Family.UPSAMPLE: upsample,
    Family.CONCAT: concat,
    Family.FLATTEN: flatten,
    Family.DROPOUT: dropout,
    Family.SOFTMAX: softmax,
}
