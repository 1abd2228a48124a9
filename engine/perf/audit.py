"""The step audit: what one training step launches and moves, read from a dry run
on PyTorch's meta device (no GPU needed, nothing computed, no memory used).

For fusenet, every Triton launch is intercepted (engine.kernels.launch.observing:
the launch is counted and its distinct tensor arguments' bytes added up, then
skipped) and so is every torch op that would run on the device (a
TorchDispatchMode: copies, casts, fills, and any arithmetic). For PyTorch eager
(the reference network in the spec's precision, channels_last, F.cross_entropy,
torch.optim.SGD with foreach) every device op is counted the same way.

On the meta device a read of a device value on the host (`.item()`, `float(t)`,
a tensor in an `if`) cannot happen silently: the audit counts each one as a
host sync. Ops on CPU tensors (the dropout seed drawn from torch's CPU
generator) are host work and are not counted.

Bytes are the sizes of the distinct tensors an op or kernel touches: an upper
bound on what it moves, the measure the launch-count and traffic targets use
(plus the gradients the fused optimizer reads through its address table).

The fusenet step audited is the one `fusenet train` runs (engine.training.step,
without the CUDA-graph capture), in its steady state: one step runs unaudited
first (lazy optimizer state), then one is counted.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that allocate, view or describe memory: no device work of their own
_NO_WORK = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view",
    "_reshape_alias", "as_strided", "permute", "expand", "slice", "select", "t", "transpose", "unsqueeze",
    "squeeze", "detach", "alias", "lift_fresh", "set_", "split", "split_with_sizes", "unbind", "view_as_real",
    "resolve_conj", "resolve_neg", "_record_function_enter_new", "_record_function_exit", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
    "result_type", "is_pinned", "_to_dense", "unflatten", "reshape", "flatten", "contiguous", "view_as",
    "expand_as",
})
_HOST_SYNC = frozenset({"_local_scalar_dense", "is_nonzero", "item", "equal", "nonzero"})


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.device.type == "meta" and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@dataclass
class StepAudit:
    name: str
    triton_launches: int = 0
    triton_bytes: int = 0
    torch_ops: Counter = field(default_factory=Counter)  # device ops by aten name
    torch_bytes: int = 0
    host_syncs: Counter = field(default_factory=Counter)  # device->host reads by aten name

    @property
    def launches(self) -> int:
        return self.triton_launches + sum(self.torch_ops.values())

    @property
    def bytes(self) -> int:
        return self.triton_bytes + self.torch_bytes

    def as_dict(self) -> dict:
        return {"name": self.name, "launches": self.launches, "triton_launches": self.triton_launches,
                "torch_ops": sum(self.torch_ops.values()), "torch_ops_by_name": dict(self.torch_ops),
                "triton_bytes": self.triton_bytes, "torch_bytes": self.torch_bytes, "bytes": self.bytes,
                "host_syncs": sum(self.host_syncs.values())}


class _DeviceOps(TorchDispatchMode):
    """Counts the aten ops that would run on the device (meta tensors) and the host syncs."""

    def __init__(self, audit: StepAudit):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        ins = _tensors(args) + _tensors(kwargs)
        on_device = any(t.device.type == "meta" for t in ins)
        if name in _HOST_SYNC and on_device:
            self.audit.host_syncs[name] += 1
            return False if name in ("is_nonzero", "equal") else 0
        out = func(*args, **kwargs)
        on_device = on_device or any(t.device.type == "meta" for t in _tensors(out))
        if on_device and name not in _NO_WORK:
            self.audit.torch_ops[name] += 1
            self.audit.torch_bytes += _nbytes(ins + _tensors(out))
        return out


def fusenet_step(spec, batch: int, precision: str | None = None, device: str = "meta"):
    """The training step `fusenet train` runs (engine.training.step.TrainStep, without capture) for
    `spec` on `device`, with the spec's optimizer, loss and seed, and a batch of its inputs as the
    step reads them (compute dtype, channels-last) with class-0 labels: (step, x, y)."""
    from engine.runtime.fused import TritonNetwork
    from engine.training.optimizer_and_loss import build_optimizer
    from engine.training.step import TrainStep

    cfg = spec.train
    model = TritonNetwork(spec, precision=precision or cfg.precision).to(device).train()
    opt, _ = build_optimizer(model.parameters(), cfg.optimizer, "triton")
    step = TrainStep(model, opt, backend="triton", device=torch.device(device), lr_of=lambda k: cfg.optimizer.lr,
                     total_steps=4, seed=cfg.seed, label_smoothing=cfg.label_smoothing, clip_grad=cfg.clip_grad,
                     detection=cfg.detection)
    shape = (batch, *model.input_shape)
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    x = torch.empty(shape, device=device, dtype=model.dtype).contiguous(memory_format=fmt)
    out = model.output_shape
    if cfg.detection is not None:  # loss centernet
        from engine.kernels.centernet import placeholder_targets

        return step, x, placeholder_targets(batch, out, device)
    y = torch.zeros((batch,) if len(out) == 1 else (batch, *out[1:]), dtype=torch.int64, device=device)
    return step, x, y


def audit_fusenet(spec, batch: int, precision: str | None = None) -> StepAudit:
    """One steady-state fusenet training step on the meta device: the real step of `fusenet train`
    (engine.training.step: forward, fused loss, backward, the spec's fused optimizer), after one
    unaudited step (lazy optimizer state, first-step tables)."""
    from engine import device
    from engine.kernels.launch import observing, recording

    audit = StepAudit("fusenet")

    def count(kernel, args) -> None:
        audit.triton_launches += 1
        audit.triton_bytes += _nbytes(_tensors(list(args)))

    step, x, y = fusenet_step(spec, batch, precision)
    with device.gpu_tiles(), recording(dry_run=True):
        step.body(x, y)
        with observing(count), _DeviceOps(audit):
            step.body(x, y)
    step.close()
    # the optimizer reads the gradients through a table of addresses: not arguments, still traffic
    audit.triton_bytes += sum(fg.indirect_bytes() for fg in step.opt._flat)
    return audit


def audit_eager(spec, batch: int, precision: str | None = None) -> StepAudit:
    """The same step in PyTorch eager: the reference network in the compute dtype,
    channels_last, F.cross_entropy and torch.optim.SGD (foreach), on the meta device."""
    from engine.precision import precision as precision_named
    from engine.runtime.reference import ReferenceNetwork

    audit = StepAudit("PyTorch eager")
    dtype = precision_named(precision or spec.train.precision).dtype
    model = ReferenceNetwork(spec).to(device="meta", dtype=dtype).train()
    shape = (batch, *model.input_shape)
    x = torch.empty(shape, device="meta", dtype=dtype)
    if x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          foreach=True)
    out_shape = model.output_shape
    det = spec.train.detection
    if det is not None:  # loss centernet: the PyTorch reference loss
        from engine.kernels.centernet import placeholder_targets
        from engine.training.detection.loss import centernet_loss_reference

        target = placeholder_targets(batch, out_shape, "meta")
    else:
        target = torch.zeros((batch, *out_shape[1:]), dtype=torch.int64, device="meta")
    with _DeviceOps(audit):
        out = model(x)
        if det is not None:
            centernet_loss_reference(out, target, size_weight=det.size_weight, offset_weight=det.offset_weight,
                                     alpha=det.alpha, beta=det.beta)[3].backward()
        else:
            torch.nn.functional.cross_entropy(out.float(), target, label_smoothing=0.1).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return audit


def audit_step(spec, batch: int, precision: str | None = None) -> list[StepAudit]:
    return [audit_fusenet(spec, batch, precision), audit_eager(spec, batch, precision)]


def format_audit(audits: list[StepAudit], title: str) -> str:
    head = ("", "Triton kernels", "torch device ops", "launches", "kernel GB", "torch-op GB", "host syncs")
    rows = [head]
    for a in audits:
        rows.append((a.name, str(a.triton_launches) if a.triton_launches else "-", str(sum(a.torch_ops.values())),
                     str(a.launches), f"{a.triton_bytes / 1e9:.3f}" if a.triton_launches else "-",
                     f"{a.torch_bytes / 1e9:.3f}", str(sum(a.host_syncs.values()))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out = [title]
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("-" * len(out[-1]))
    for a in audits:
        if a.torch_ops:
            ops = ", ".join(f"{k} {v}" for k, v in a.torch_ops.most_common())
            out.append(f"{a.name} torch device ops: {ops}")
    return "\n".join(out)
