"""One training step, built once per run and called once per batch.

`TrainStep(x, y)` runs forward, loss, backward and the optimizer on one batch.
It is the single code path of a step: `fusenet train` runs it, the step audit
(engine.perf.audit) dry-runs its `body` on the meta device, and the bench's
fusenet contender times its `body` (captured by the bench harness).

Backend triton, per step (`body`):
- the network's `logits` (NHWC, compute dtype, a trailing scale left to the loss);
- the fused loss `cross_entropy_step`, which also adds the batch to the epoch's
  running sums, records the first non-finite loss and advances the step clock
  (engine.kernels.clock), then the backward from the logits with its gradient;
- the fused optimizer in device mode: the learning rate comes from a device
  table indexed by the clock, Adam's step count from the clock.
Nothing in the step reads a device value on the host, and no per-step value is
a Python scalar: the learning rate, step count and dropout seeds are device
tensors read by the kernels. So on CUDA the step is captured once in a CUDA
graph (after WARMUP_STEPS eager steps on a side stream, as torch.cuda.graph
requires) and replayed for every later batch, after copying the batch into the
graph's static input buffers. A network the capture cannot serve (a conv
epilogue dropout still takes integer seeds) runs eagerly and says why.

Detection (`loss centernet`, `detection=` a DetectionConfig): y is the batch's
CenterNet targets (engine.training.data.detection; each tensor copied to the
device, and to static buffers of their own for a capture) and the loss is
`centernet_step` (engine.kernels.centernet: the loss terms and the gradient in
one kernel, the term sums in the clock's `terms`); on the torch backend the
PyTorch reference (engine.training.detection.loss).

Backend torch (the PyTorch reference) runs the same structure eagerly with
torch.optim and F.cross_entropy; its running sums and NaN guard are kept on the
device with torch ops, so it too makes no host sync per step (except inside
torch's GradScaler, used for fp16 only).

The training loop reads the clock's stats (a sync) every GUARD_EVERY steps and
at the end of each epoch: the NaN/inf guard is a device flag holding the first
bad step and loss.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Callable

import torch
import torch.nn.functional as F

from engine.kernels import clock as C
from engine.kernels.params import discard_uploads, flush_uploads, upload
from engine.training.init import restore_buffers

GUARD_EVERY = 50  # steps between reads of the NaN/inf flag (a host sync); also read at every epoch end
WARMUP_STEPS = 2  # eager steps (JIT compiles, lazy optimizer state) before a CUDA graph is captured


class CudaGraphs:
    """The CUDA calls of a captured step, behind one small interface (tests substitute a fake
    to check the step's capture logic on machines without a GPU). torch >= 2.4 API."""

    def __init__(self, device: torch.device):
        self.device = device

    def on_side_stream(self, fn: Callable[[], None]) -> None:
        """Run fn on a side stream ordered after and before the current one (warm-up before capture)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, fn: Callable[[], None]):
        """A torch.cuda.CUDAGraph of fn (raises what the capture raises); `.replay()` runs it."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph):
            fn()
        return graph


def run_seed(seed: int) -> int:
    """The dropout base seed of a run: a fixed function of the spec's seed (resume reproduces it)."""
    return (int(seed) * 2654435761 + 97531) % 2**31


class TrainStep:
    """One training step of `raw` (see the module docstring).

    net: raw or its DistributedDataParallel wrapper; lr_of(k): the learning rate of
    global step k (0-based), for the `total_steps` of the run; start_step: the
    global index of the next step (a resumed run's progress).
    """

    def __init__(self, raw, opt, *, backend: str, device: torch.device, lr_of: Callable[[int], float],
                 total_steps: int, start_step: int = 0, seed: int = 0, label_smoothing: float = 0.0,
                 net=None, clip_grad: float = 0.0, autocast: torch.dtype | None = None, scaler=None,
                 frozen_buffers: dict | None = None, capture: bool = False, graphs=None, detection=None):
        self.raw, self.net, self.opt = raw, net if net is not None else raw, opt
        self.backend, self.device = backend, torch.device(device)
        self.lr_of, self.total_steps = lr_of, max(int(total_steps), 1)
        self.host_step = int(start_step)  # global index of the next step
        self.label_smoothing, self.clip_grad = float(label_smoothing), float(clip_grad or 0.0)
        self.detection = detection  # dsl.train_config.DetectionConfig: the CenterNet loss (y: its targets)
        self.autocast, self.scaler, self.frozen = autocast, scaler, frozen_buffers or {}
        self.clock = C.StepClock(self.device, run_seed(seed), self.host_step)
        self.capture = bool(capture) and backend == "triton" and (graphs is not None or self.device.type == "cuda")
        self.graphs = graphs if graphs is not None else (CudaGraphs(self.device) if self.capture else None)
        self.graph, self.executed, self.capture_error = None, 0, ""
        self.static_x = self.static_y = None
        self.lr_table = None
        if backend == "triton":
            self.lr_table = torch.empty(self.total_steps, dtype=torch.float32, device=self.device)
            self.update_lrs()
            opt.attach_clock(self.clock.counters, self.lr_table, self.host_step)
            raw.step_clock = self.clock.counters

    # -- host side ---------------------------------------------------------------
    def update_lrs(self) -> None:
        """Upload the learning rate of every step (again, after a plateau schedule changed it)."""
        if self.lr_table is not None:
            upload(self.lr_table, [self.lr_of(k) for k in range(self.total_steps)], torch.float32)

    def lr_at(self, k: int) -> float:
        return self.lr_of(min(max(k, 0), self.total_steps - 1))

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch on the device, as the step reads it: for the Triton backend in the compute
        dtype and channels-last, so the network's NHWC conversion is free (one copy, as any
        host-to-device transfer is)."""
        y = _to_device(y, self.device)
        if self.backend != "triton" or self.net is not self.raw:
            return x.to(self.device, non_blocking=True), y
        fmt = torch.channels_last if x.dim() == 4 else torch.contiguous_format
        return x.to(self.device, dtype=self.raw.dtype, memory_format=fmt, non_blocking=True), y

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One training step on a batch (host or device tensors)."""
        x, y = self.inputs(x, y)
        if self.graph is None and self.capture and self.executed >= WARMUP_STEPS:
            self._capture(x, y)
        if self.graph is not None:
            self.opt.refresh_packed()  # parameters changed in place (a load) since the last replay
            self.static_x.copy_(x, non_blocking=True)
            _copy_into(self.static_y, y)
            self.graph.replay()
        elif self.capture:  # warm-up before the capture, on a side stream as torch.cuda.graph wants
            self.graphs.on_side_stream(lambda: self.body(x, y))
        else:
            self.body(x, y)
        self.executed += 1
        self.host_step += 1
        if self.backend == "triton":
            self.opt.note_step()

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Capture `body` on static copies of the batch buffers (falls back to eager on failure)."""
        self.static_x, self.static_y = torch.empty_like(x), _empty_like(y)
        try:
            graph = self.graphs.capture(lambda: self.body(self.static_x, self.static_y))
        except Exception as e:  # noqa: BLE001 - a capture failure must not end the run: go on eagerly
            discard_uploads()
            self.capture = False
            self.capture_error = f"{type(e).__name__}: {e}"
            return
        flush_uploads()  # the addresses and tables the captured kernels read
        self.graph = graph

    # -- the step ----------------------------------------------------------------
    def body(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward, loss, backward, optimizer on device tensors: what a CUDA graph captures.
        Returns the batch's mean loss (a device tensor: reading it is a sync)."""
        loss = self._body_triton(x, y) if self.backend == "triton" else self._body_torch(x, y)
        if self.frozen:
            restore_buffers(self.raw, self.frozen)
        return loss

    def _body_triton(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from engine.kernels.loss import cross_entropy_step
        from engine.runtime.fused import fused_train_step

        if self.net is self.raw:
            return fused_train_step(self.raw, self.opt, x, y, label_smoothing=self.label_smoothing,
                                    clock=self.clock, clip_grad=self.clip_grad, detection=self.detection)
        # data parallel: DDP's forward must run (it prepares the gradient all-reduce)
        self.opt.zero_grad(set_to_none=True)
        z = self.net(x)
        if z.dim() == 4:
            z = z.permute(0, 2, 3, 1).contiguous()
        if self.detection is not None:
            from engine.kernels.centernet import centernet_step

            terms, dz = centernet_step(z, y, **detection_kwargs(self.detection), clock=self.clock)
            loss = terms[3]
        else:
            loss, dz = cross_entropy_step(z, y, self.label_smoothing, clock=self.clock)
        torch.autograd.backward(z, dz)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_([p for p in self.raw.parameters() if p.grad is not None], self.clip_grad)
        self.opt.step()
        return loss

    def _body_torch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        lr = self.lr_at(self.host_step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.net(x)
            if self.detection is not None:
                from engine.training.detection.loss import centernet_loss_reference

                terms = centernet_loss_reference(out, y, **detection_kwargs(self.detection))
                loss = terms[3]
            else:
                loss = F.cross_entropy(out.float(), y, label_smoothing=self.label_smoothing)
        scaler = self.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if self.clip_grad:
            if scaler is not None:
                scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_([p for p in self.raw.parameters() if p.grad is not None], self.clip_grad)
        if scaler is not None:
            scaler.step(self.opt)
            scaler.update()
        else:
            self.opt.step()
        if self.detection is not None:
            self._record_detection(terms.detach(), out.shape[0])
        else:
            self._record(loss.detach(), out.detach(), y)
        return loss.detach()

    @torch.no_grad()
    def _record(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        """What the fused loss does in its kernel, with torch ops: running sums, NaN guard, clock."""
        s, n = self.clock.stats, y.numel()
        loss = loss.double()
        s[C.LOSS_SUM:C.LOSS_SUM + 1].add_(loss * n)
        s[C.CORRECT:C.CORRECT + 1].add_((out.argmax(1) == y).sum())
        s[C.COUNT:C.COUNT + 1].add_(n)
        first = ~torch.isfinite(loss) & (s[C.BAD] == 0)
        s[C.BAD_STEP:C.BAD_STEP + 1].copy_(torch.where(first, float(self.host_step + 1), s[C.BAD_STEP]))
        s[C.BAD_LOSS:C.BAD_LOSS + 1].copy_(torch.where(first, loss, s[C.BAD_LOSS]))
        s[C.BAD:C.BAD + 1].copy_(torch.where(first, 1.0, s[C.BAD]))
        self.clock.counters[C.STEP:C.STEP + 1].add_(1)

    @torch.no_grad()
    def _record_detection(self, terms: torch.Tensor, images: int) -> None:
        """What the fused CenterNet loss does in its kernel: the sums (total and terms, per image),
        the NaN guard and the clock."""
        s, t = self.clock.stats, terms.double()
        s[C.LOSS_SUM:C.LOSS_SUM + 1].add_(t[3:4] * images)
        s[C.COUNT:C.COUNT + 1].add_(images)
        self.clock.terms.add_(t[:3] * images)
        loss = t[3]
        first = ~torch.isfinite(loss) & (s[C.BAD] == 0)
        s[C.BAD_STEP:C.BAD_STEP + 1].copy_(torch.where(first, float(self.host_step + 1), s[C.BAD_STEP]))
        s[C.BAD_LOSS:C.BAD_LOSS + 1].copy_(torch.where(first, loss, s[C.BAD_LOSS]))
        s[C.BAD:C.BAD + 1].copy_(torch.where(first, 1.0, s[C.BAD]))
        self.clock.counters[C.STEP:C.STEP + 1].add_(1)

    def close(self) -> None:
        """Detach the clock from the network (its eager forward goes back to host seeds)."""
        if getattr(self.raw, "step_clock", None) is self.clock.counters:
            self.raw.step_clock = None


def detection_kwargs(det) -> dict:
    """The CenterNet loss's keyword arguments from a DetectionConfig."""
    return dict(size_weight=det.size_weight, offset_weight=det.offset_weight, alpha=det.alpha, beta=det.beta)


# A batch's targets: a tensor (class labels) or a frozen dataclass of tensors (CenterNet targets,
# engine.training.data.detection.CenterNetTargets, or a DetectionBatch holding them).
def _targets(y):
    return getattr(y, "targets", y)


def _to_device(y, device: torch.device):
    y = _targets(y)
    if isinstance(y, torch.Tensor):
        return y.to(device, non_blocking=True)
    return replace(y, **{f.name: getattr(y, f.name).to(device, non_blocking=True) for f in fields(y)})


def _empty_like(y):
    if isinstance(y, torch.Tensor):
        return torch.empty_like(y)
    return replace(y, **{f.name: torch.empty_like(getattr(y, f.name)) for f in fields(y)})


def _copy_into(static, y) -> None:
    if isinstance(y, torch.Tensor):
        static.copy_(y, non_blocking=True)
        return
    for f in fields(y):
        getattr(static, f.name).copy_(getattr(y, f.name), non_blocking=True)
