"""The Triton backend: runs the fusion plan on fusenet's own kernels.

Activations flow between kernels as NHWC tensors in the compute dtype; the
module's interface stays NCHW (converted once at the input and at the output,
copies only). Every kernel group of the plan is one call into its family's
executor (engine.runtime.executors), which calls an autograd.Function, so the
backward pass runs on fusenet's backward kernels.

The training step (engine.training.step) calls `logits` instead of `forward`:
the last group's output as the fused loss reads it (NHWC, compute dtype: no
conversion back), with a trailing constant `scale` left to the loss kernel.
While a step clock is attached (`step_clock`), dropout draws its seeds on the
device (engine.kernels.dropout.ClockSeed). Linear and conv weights get packed
copies in the layouts and dtype their kernels read, which the fused optimizer
keeps (engine.kernels.params).
"""
from __future__ import annotations

from typing import Sequence

import torch

from engine.device import DEVICE, announce_interpreter
from engine.ir.graph import Node
from engine.ir.ops import Family
from engine.passes.pipeline import run_pipeline
from engine.passes.plan import KernelGroup, Plan
from engine.precision import precision as precision_named
from engine.kernels import batchnorm as K_bn
from engine.kernels import linear as K_linear
from engine.kernels import pointwise as K_pw
from engine.kernels.conv import weights as K_conv_weights
from engine.kernels.params import request_packed
from engine.runtime.executors import EXECUTORS
from engine.runtime.network import Network


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
        self.precision = precision_named(precision).name
        self.dtype = precision_named(precision).dtype
        self.allow_tf32 = precision_named(precision).tf32
        # plans[fold_bn]: folding batch norm into conv epilogues is only valid in
        # eval mode when no gradient is wanted (the fold treats BN as constants).
        self.plans = {fold: run_pipeline(spec.graph, training=not fold) for fold in (False, True)}
        self.step_clock: torch.Tensor | None = None  # the step clock's counters while a training step runs
        self._request_packed_weights()
        announce_interpreter()

    def _apply(self, fn, *args, **kwargs):
        # moving the network (`.to(device)`) may replace its parameters with new objects (the meta
        # device does): the requests travel with the parameter objects, so make them again
        out = super()._apply(fn, *args, **kwargs)
        self._request_packed_weights()
        return out

    def _request_packed_weights(self) -> None:
        """Ask the fused optimizer (built after the network) to keep each GEMM weight in the layout and
        dtype its kernels read (engine.kernels.params), so no step repacks or casts one: a linear
        weight in the compute dtype (fp32 reads the master), a conv weight in the forward's tap-major
        layout and, when its input has a gradient, the dgrad's (engine.kernels.conv.weights)."""
        linear = K_linear.weight_packing(self.dtype)
        for group in self.plans[False]:
            anchor = self.graph.node(group.anchor)
            if group.family is Family.LINEAR and linear is not None:
                request_packed(self.layer(anchor).weight, linear)
            elif group.family is Family.CONV:
                w = self.layer(anchor).weight
                request_packed(w, K_conv_weights.forward_packing(self.dtype))
                depthwise = w.shape[1] == 1 and anchor.attrs["groups"] > 1  # reads the forward's copy
                if not depthwise and anchor.inputs[0] != 0:  # node 0, the network input, has no gradient
                    request_packed(w, K_conv_weights.dgrad_packing(self.dtype))

    def kernel_plan(self, fold_bn: bool = False) -> Plan:
        return self.plans[fold_bn]

    def current_plan(self) -> Plan:
        """The plan `forward` runs now: folded batch norm when evaluating without gradients."""
        return self.plans[not self.training and not torch.is_grad_enabled()]

    def forward(self, x: torch.Tensor, taps: Sequence[str] = ()):
        plan = self.current_plan()
        p = self._run(x, plan, list(plan), taps)
        out = to_nchw(p.values[plan.graph.output.id])
        if taps:
            return out, {t: to_nchw(p.values[plan.graph.taps[t]]) for t in taps}
        return out

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(the output as the fused loss reads it, a factor for the loss to scale it by): the last
        group's value (NHWC or [N, K], compute dtype) and, when the network ends in a constant
        `scale` read by nothing else, the value before it with that factor (the loss kernel applies
        it, so the scale costs no launch). What the training step runs instead of `forward`."""
        plan = self.current_plan()
        groups, out_id, factor = list(plan), plan.graph.output.id, 1.0
        last = self.graph.node(groups[-1].anchor) if groups else None
        if (last is not None and groups[-1].family is Family.SCALE and groups[-1].output == out_id
                and plan.readers().get(last.inputs[0], 0) == 1):
            groups, out_id, factor = groups[:-1], last.inputs[0], float(last.attrs["factor"])
        p = self._run(x, plan, groups, ())
        return p.values[out_id], factor

    def _run(self, x: torch.Tensor, plan: Plan, groups: list[KernelGroup], taps: Sequence[str]) -> "Pass":
        self.check_input(x)
        p = Pass(self, plan, taps, x.device)
        p.values.put(0, to_nhwc(x, self.dtype))
        for group in groups:
            with p.running(group):
                p.values.put(group.output, EXECUTORS[group.family](p, group))
        return p

    def capture_blockers(self) -> list[str]:
        """Why a training step of this network cannot be captured in a CUDA graph (empty: it can)."""
        return [f"group g{k} ({g.family.value}) has a dropout epilogue that takes an integer seed"
                for k, g in enumerate(self.plans[False])
                if g.family is Family.CONV and g.epilogue.dropout is not None
                and self.graph.node(g.epilogue.dropout).attrs["p"] > 0]


def fused_train_step(net: TritonNetwork, opt, x: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0,
                     clock=None, clip_grad: float = 0.0, phase=None, detection=None) -> torch.Tensor:
    """One training step on fusenet's kernels: the network's `logits`, the fused loss (whose
    gradient comes out of its forward kernel: the backward starts at the logits), the backward
    and the fused optimizer. `clock` (engine.kernels.clock.StepClock): the loss adds to its sums
    and advances it. `phase(name)` is called as "loss", "backward", "optimizer" and "done" begin
    (engine.runtime.launches attributes launches with it). engine.training.step runs this.
    `detection` (dsl.train_config.DetectionConfig): the CenterNet loss (engine.kernels.centernet)
    against y, the batch's CenterNetTargets on the device, instead of the cross-entropy.
    Returns the mean loss (a 0-dim device tensor)."""
    from engine.kernels.loss import cross_entropy_step

    note = phase or (lambda name: None)
    opt.zero_grad(set_to_none=True)
    z, scale = net.logits(x)
    note("loss")
    if detection is not None:  # `loss centernet`: y holds the CenterNet targets
        from engine.kernels.centernet import centernet_step

        terms, dz = centernet_step(z, y, size_weight=detection.size_weight, offset_weight=detection.offset_weight,
                                   alpha=detection.alpha, beta=detection.beta, logit_scale=scale, clock=clock)
        loss = terms[3]
    else:
        loss, dz = cross_entropy_step(z, y, label_smoothing, logit_scale=scale, clock=clock)
    note("backward")
    torch.autograd.backward(z, dz)
    if clip_grad:
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], clip_grad)
    note("optimizer")
    opt.step()
    note("done")
    return loss


class Pass:
    """The state of one forward pass that executors share: the values computed so
    far, concat buffers their producers write into, batch-norm statistics
    emitted by conv epilogues and max pools for the bn that follows, and the
    backward hand-offs between a bn and its neighbouring conv."""

    # called with each group as it starts (engine.runtime.launches attributes launches with it)
    observer = None

    def __init__(self, net: TritonNetwork, plan: Plan, taps: Sequence[str] = (), device: torch.device = DEVICE):
        self.net, self.plan, self.graph = net, plan, plan.graph
        self.device = device
        self.training = net.training
        self.clock = net.step_clock if self.training else None  # device dropout seeds (a training step)
        reads = plan.readers()
        for t in taps:
            reads[plan.graph.taps[t]] = reads.get(plan.graph.taps[t], 0) + 1
        self.values = Values(reads, torch.is_grad_enabled())
        self.concat_buffers: dict[int, torch.Tensor] = {}
        self.bn_partials: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # producer output id -> (psum, psumsq)
        # backward hand-offs (engine.kernels.batchnorm.backward), by the id of the value between the two groups
        self.grad_links: dict[int, K_bn.BnGradLink] = {}  # a bn's output -> its link with the conv reading it
        self.pool_links: dict[int, K_bn.PoolGradLink] = {}  # a conv's pooled output -> its link with the bn
        self.apply_links: dict[int, K_bn.BnApplyLink] = {}  # a stem conv's output -> its link with the bn

    def running(self, group: KernelGroup):
        observer = Pass.observer
        return observer(self, group) if observer is not None else _nothing()

    def node_or_none(self, node_id: int | None) -> Node | None:
        return None if node_id is None else self.graph.node(node_id)

    def concat_buffer(self, concat_id: int, batch: int) -> torch.Tensor:
        buf = self.concat_buffers.get(concat_id)
        if buf is None:
            c, h, w = self.graph.node(concat_id).shape
            buf = torch.empty((batch, h, w, c), dtype=self.net.dtype, device=self.device)
            self.concat_buffers[concat_id] = buf
        return buf

    def concat_slice(self, group: KernelGroup, batch: int) -> torch.Tensor | None:
        """The buffer slice a producer writes into (None: a tensor of its own)."""
        if group.writes_into is None:
            return None
        slot = group.writes_into
        width = self.graph.node(group.output).shape[0]
        return self.concat_buffer(slot.concat, batch)[..., slot.channel:slot.channel + width]


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class Values:
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
