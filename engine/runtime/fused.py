"""The Triton backend: runs the fusion plan on fusenet's own kernels.

Activations flow between kernels as NHWC tensors in the compute dtype; the
module's interface stays NCHW (converted once at the input and at the output,
copies only). Every kernel group of the plan is one call into an op family's
autograd.Function, so the backward pass runs on fusenet's backward kernels.
"""
from __future__ import annotations

from typing import Sequence

import torch

from engine.device import DEVICE, announce_interpreter
from engine.ir.graph import ACTIVATION_OPS, Graph, Node
from engine.kernels import batchnorm as K_bn
from engine.kernels import concat as K_concat
from engine.kernels import conv as K_conv
from engine.kernels import global_pool as K_gpool
from engine.kernels import linear as K_linear
from engine.kernels import pointwise as K_pw
from engine.kernels import pool as K_pool
from engine.kernels import resample as K_rs
from engine.runtime.network import Network
from engine.passes.fusion import Kernel
from engine.passes.pipeline import run_pipeline

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def to_nhwc(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NCHW (or N x F) input to the internal layout (a copy, no arithmetic)."""
    x = x.to(dtype)
    return x.permute(0, 2, 3, 1).contiguous() if x.dim() == 4 else x.contiguous()


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float32)
    return x.permute(0, 3, 1, 2).contiguous() if x.dim() == 4 else x


class TritonNetwork(Network):
    backend = "triton"

    def __init__(self, spec, precision: str = "fp32"):
        super().__init__(spec)
        if precision not in DTYPES:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(DTYPES)}")
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.allow_tf32 = precision == "tf32"
        # plans[fold_bn]: folding batch norm into conv epilogues is only valid in
        # eval mode when no gradient is wanted (the fold treats BN as constants).
        self.plans = {fold: run_pipeline(spec.graph, training=not fold) for fold in (False, True)}
        self._reads = {fold: _count_reads(*self.plans[fold]) for fold in (False, True)}
        announce_interpreter()

    def kernel_plan(self, fold_bn: bool = False) -> tuple[Graph, tuple[Kernel, ...]]:
        return self.plans[fold_bn]

    def forward(self, x: torch.Tensor, taps: Sequence[str] = ()):
        self.check_input(x)
        fold = not self.training and not torch.is_grad_enabled()
        graph, plan = self.plans[fold]
        reads = self._reads[fold].copy()
        for t in taps:
            reads[graph.taps[t]] = reads.get(graph.taps[t], 0) + 1
        values = _Values(reads, torch.is_grad_enabled())
        values.put(0, to_nhwc(x, self.dtype))
        self._concat_buffers: dict[int, torch.Tensor] = {}
        self._bn_partials: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # conv output id -> (psum, psumsq)
        for kern in plan:
            values.put(kern.output, self._run(graph, kern, values))
        out = to_nchw(values[graph.output.id])
        if taps:
            return out, {t: to_nchw(values[graph.taps[t]]) for t in taps}
        return out

    # -- concat: producers write into channel slices of one buffer ---------------
    def _concat_buffer(self, graph: Graph, concat_id: int, batch: int) -> torch.Tensor:
        buf = self._concat_buffers.get(concat_id)
        if buf is None:
            buf = torch.empty(_concat_buffer_shape(graph, concat_id, batch), dtype=self.dtype, device=DEVICE)
            self._concat_buffers[concat_id] = buf
        return buf

    def _concat_slice(self, graph: Graph, kern: Kernel, batch: int):
        """The buffer slice a producer writes into (None: a tensor of its own)."""
        if kern.writes_into is None:
            return None
        concat_id, c0 = kern.writes_into
        width = graph.node(kern.output).shape[0]
        return self._concat_buffer(graph, concat_id, batch)[..., c0 : c0 + width]

    def _concat(self, graph: Graph, node: Node, values, current: torch.Tensor) -> torch.Tensor:
        """The concat's buffer, with the inputs not already written in place copied in."""
        buf = self._concat_buffer(graph, node.id, current.shape[0])
        c0 = 0
        for slot, src in enumerate(node.inputs):
            v = current if slot == 0 else values[src]
            width = v.shape[-1]
            target = buf[..., c0 : c0 + width]
            if v.data_ptr() != target.data_ptr():  # not written in place by its producer
                K_concat.copy_into(target, v)  # in place: autograd tracks it through buf
            c0 += width
        return buf

    # -- one fused kernel group --------------------------------------------------
    def _run(self, graph: Graph, kern: Kernel, values) -> torch.Tensor:
        nodes = [graph.node(i) for i in kern.nodes]
        anchor = nodes[0]
        x = values[anchor.inputs[0]]
        act, slope = _act_of(nodes)
        a = anchor.attrs
        kind = kern.kind
        drop = {}
        if "dropout" in kern.epilogue and self.training:
            p = next(n for n in nodes if n.op == "dropout").attrs["p"]
            drop = dict(dropout_p=p, dropout_seed=_dropout_seed()) if p > 0 else {}
        if kind == "conv":
            conv = self.layer(anchor)
            scale = shift = residual = None
            if "bn" in kern.epilogue:
                bn = self.layer(next(n for n in nodes if n.op == "bn"))
                # the kernel computes (acc + bias) * scale + shift == bn(conv(x))
                scale, shift = K_bn.bn_eval_scale_shift(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
            add = next((n for n in nodes if n.op == "add"), None)
            if add is not None:
                residual = values[add.inputs[1]]
            stats = "stats" in kern.epilogue and self.training
            y = K_conv.conv2d(
                x,
                conv.weight,
                conv.bias,
                residual=residual,
                stride=a["stride"],
                padding=a["pad"],
                dilation=a["dilation"],
                groups=a["groups"],
                act=act,
                slope=slope,
                allow_tf32=self.allow_tf32,
                scale=scale,
                shift=shift,
                out=self._concat_slice(graph, kern, x.shape[0]),
                stats=stats,
                **drop,
            )
            if stats:  # the batch statistics of the bn that reads this output
                y, self._bn_partials[kern.output] = y
            return y
        if kind == "linear":
            lin = self.layer(anchor)
            return K_linear.linear(x, lin.weight, lin.bias, act=act, slope=slope, allow_tf32=self.allow_tf32, **drop)
        if kind == "bn":
            bn = self.layer(anchor)
            if self.training:
                return K_bn.batch_norm_train(
                    x,
                    bn.weight,
                    bn.bias,
                    bn.running_mean,
                    bn.running_var,
                    momentum=bn.momentum,
                    eps=bn.eps,
                    num_batches_tracked=bn.num_batches_tracked,
                    act=act,
                    slope=slope,
                    partials=self._bn_partials.pop(anchor.inputs[0], None),
                )
            return K_bn.batch_norm_eval(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, act, slope)
        if kind == "act":
            return K_pw.activation(x, act, slope)
        if kind == "pointwise":  # a chain of activations and scales, one kernel
            ops = [(n.op, n.attrs["factor"] if n.op == "scale" else n.attrs.get("slope", 0.0)) for n in nodes]
            return K_pw.pointwise_chain(x, ops)
        if kind == "add":
            return K_pw.add_act(x, values[anchor.inputs[1]], act, slope)
        if kind == "scale":
            return K_pw.scale(x, a["factor"])
        if kind == "pool":
            fn = K_pool.max_pool2d if anchor.op == "maxpool" else K_pool.avg_pool2d
            return fn(x, a["kernel"], a["stride"], a["pad"])
        if kind == "global_pool":
            return K_gpool.global_avg_pool(x) if anchor.op == "global_avgpool" else K_gpool.global_max_pool(x)
        if kind == "blurpool":
            return K_rs.blurpool(x, a["filter"], a["stride"])
        if kind == "upsample":
            return K_rs.upsample(x, a["factor"], a["mode"])
        if kind == "concat":
            return self._concat(graph, anchor, values, x)
        if kind == "flatten":
            # PyTorch flattens C, H, W in that order; NHWC must be put in NCHW order
            # first so linear weights mean the same in both backends (a copy).
            return x.permute(0, 3, 1, 2).contiguous().reshape(x.shape[0], -1) if x.dim() == 4 else x
        if kind == "dropout":
            from engine.kernels import dropout as K_drop

            if not self.training or a["p"] == 0.0:
                return x
            return K_drop.dropout(x, a["p"], _dropout_seed(), True)
        if kind == "softmax":
            from engine.kernels import softmax as K_sm

            return K_sm.softmax(x)
        raise AssertionError(f"no runtime for kernel kind {kind}")


def _concat_buffer_shape(graph: Graph, concat_id: int, batch: int) -> tuple[int, ...]:
    c, h, w = graph.node(concat_id).shape
    return (batch, h, w, c)


def _dropout_seed() -> int:
    """A dropout mask's seed, drawn from torch's CPU generator: torch.manual_seed
    reproduces it and a checkpoint's saved RNG state resumes it exactly."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _count_reads(graph: Graph, plan) -> dict[int, int]:
    """How often each value is read: by kernels outside the group that made it,
    and once more for the network's output."""
    reads: dict[int, int] = {graph.output.id: 1}
    for kern in plan:
        members = set(kern.nodes)
        for nid in kern.nodes:
            for i in graph.node(nid).inputs:
                if i not in members:
                    reads[i] = reads.get(i, 0) + 1
    return reads


class _Values:
    """The activations of one forward pass, by node id. A value read by several
    consumers is handed out as separate aliases through fan_out, so their
    gradients are summed by a fusenet kernel rather than by autograd."""

    def __init__(self, reads: dict[int, int], grad: bool):
        self.reads, self.grad = reads, grad
        self.store: dict[int, torch.Tensor] = {}
        self.aliases: dict[int, list[torch.Tensor]] = {}

    def put(self, node_id: int, value: torch.Tensor) -> None:
        n = self.reads.get(node_id, 0)
        if self.grad and value.requires_grad and n > 1:
            self.aliases[node_id] = list(K_pw.fan_out(value, n))
        self.store[node_id] = value

    def __getitem__(self, node_id: int) -> torch.Tensor:
        pool = self.aliases.get(node_id)
        return pool.pop(0) if pool else self.store[node_id]


def _act_of(nodes: list[Node]) -> tuple[str, float]:
    """The activation a group ends with ("none" if it has none)."""
    for n in reversed(nodes):
        if n.op in ACTIVATION_OPS:
            return n.op, float(n.attrs.get("slope", 0.01))
    return "none", 0.01
