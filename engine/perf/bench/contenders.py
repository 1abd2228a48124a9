"""The contenders of a benchmark: fusenet and the PyTorch baselines it must beat.

Every contender builds the same network (one spec, one set of weights, copied
from fusenet's initialisation) and exposes the two things that are timed:
- `forward(slot)`: inference (eval mode, no autograd), on input slot `slot`;
- `step(slot)`: one training step: forward, loss, backward, optimizer step.

Baselines (design section 5):
- eager: the torch.nn reference network in channels_last, cuDNN with
  `cudnn.benchmark`, autocast to the spec's precision (tf32 through the tf32
  switches, fp32 with them off, so fp32 means fp32 on both sides);
- compile: `torch.compile` of the eager model, mode "default";
- compile-max: `torch.compile`, mode "max-autotune-no-cudagraphs".
CUDA graphs are applied by the harness to every contender the same way (whole
step captured with torch.cuda.graph), so "with graphs" compares like with like;
torch.compile's "reduce-overhead" modes would graph only the compiled part.
The optimizer is the spec's: fusenet's fused single-launch one, torch.optim
(foreach) for the baselines.

fusenet's training step is the one `fusenet train` runs and captures
(engine.training.step.TrainStep's body: logits, the fused loss under the step
clock, backward, the optimizer reading its learning rate from the device), fed
its inputs as that step reads them (compute dtype, channels-last, as the
training loop's host-to-device copy delivers them); the harness captures it in
a CUDA graph as it does the baselines.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.perf.bench.roster import LABELS
from engine.precision import autocast_dtype, uses_tf32



@contextlib.contextmanager
def matmul_precision(precision: str):
    """tf32 on for "tf32", off otherwise (PyTorch's cuDNN default would use tf32 in fp32)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = uses_tf32(precision)
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = old


@dataclass
class InputPool:
    """`slots` batches of inputs and labels on the device, rotated through."""

    x: list[torch.Tensor]
    y: list[torch.Tensor]

    @staticmethod
    def shapes(spec, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(input shape, label shape) of one slot: NCHW fp32 inputs; int64 class
        labels per image, or per pixel for a segmentation network."""
        out_shape = spec.graph.output.shape
        return (batch, *spec.graph.nodes[0].shape), ((batch,) if len(out_shape) == 1 else (batch, *out_shape[1:]))

    @staticmethod
    def slot_bytes(spec, batch: int) -> int:
        x_shape, y_shape = InputPool.shapes(spec, batch)
        return 4 * math.prod(x_shape) + 8 * math.prod(y_shape)

    @staticmethod
    def make(spec, batch: int, slots: int, device: torch.device, seed: int = 0) -> "InputPool":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x_shape, y_shape = InputPool.shapes(spec, batch)
        classes = spec.graph.output.shape[0]
        xs = [torch.randn(x_shape, generator=gen).to(device) for _ in range(slots)]
        if spec.train.detection is not None:  # loss centernet: CenterNet targets of the right shapes
            from engine.kernels.centernet import placeholder_targets

            ys = [placeholder_targets(batch, spec.graph.output.shape, device) for _ in range(slots)]
        else:
            ys = [torch.randint(0, classes, y_shape, generator=gen).to(device) for _ in range(slots)]
        return InputPool(xs, ys)


@dataclass
class Contender:
    name: str  # fusenet | eager | compile | compile-max
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    precision: str
    pool: InputPool
    notes: list[str] = field(default_factory=list)
    train_step: object = None  # fusenet: engine.training.step.TrainStep

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def _autocast(self):
        dtype = autocast_dtype(self.precision)
        if self.name == "fusenet" or dtype is None:
            return contextlib.nullcontext()
        # no weight-cast cache: each step re-casts, as it must under CUDA graph capture
        return torch.autocast(self.pool.x[0].device.type, dtype=dtype, cache_enabled=False)

    def _input(self, slot: int) -> torch.Tensor:
        return self.pool.x[slot % len(self.pool.x)]

    def output(self, slot: int) -> torch.Tensor:
        """Eval-mode output in fp32 NCHW, for checking against fusenet."""
        self.model.eval()
        with torch.no_grad(), self._autocast(), matmul_precision(self.precision):
            return self.model(self._input(slot)).float()

    def forward(self, slot: int) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return self.model(self._input(slot))

    def step(self, slot: int) -> torch.Tensor:
        if self.train_step is not None:  # fusenet: the training loop's own step
            return self.train_step.body(self._input(slot), self.pool.y[slot % len(self.pool.y)])
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.model(self._input(slot))
        loss = self.loss(out, self.pool.y[slot % len(self.pool.y)])
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def train(self, training: bool) -> None:
        self.model.train(training)


def build(name: str, source: str, state: dict, precision: str, pool: InputPool, *, graphs: bool = False) -> Contender:
    """Contender `name` for the network in `source`, with weights `state`."""
    import engine
    from engine.training.optimizer_and_loss import build_optimizer, loss_fn

    spec = engine.load(source)
    device = pool.x[0].device
    if name == "fusenet":
        model = engine.compile(source, backend="triton", precision=precision).to(device)
        backend = "triton"
    else:
        model = engine.compile(source, backend="torch").to(device)
        backend = "torch"
    model.load_state_dict(state)
    notes = []
    if name != "fusenet":
        model = model.to(memory_format=torch.channels_last)
        pool = InputPool([x.contiguous(memory_format=torch.channels_last) for x in pool.x], pool.y)
    opt, _ = build_optimizer(model.parameters(), spec.train.optimizer, backend)
    train_step = None
    if name == "fusenet":
        from engine.training.step import TrainStep

        fmt = torch.channels_last if pool.x[0].dim() == 4 else torch.contiguous_format
        pool = InputPool([x.to(dtype=model.dtype, memory_format=fmt) for x in pool.x], pool.y)
        t = spec.train
        train_step = TrainStep(model, opt, backend="triton", device=device, lr_of=lambda k: t.optimizer.lr,
                               total_steps=1, seed=t.seed, label_smoothing=t.label_smoothing, clip_grad=t.clip_grad,
                               detection=t.detection)
    if graphs and backend == "torch" and "capturable" in opt.defaults:
        for group in opt.param_groups:  # Adam's step counter must live on the GPU to be captured
            group["capturable"] = True
    if name in ("compile", "compile-max"):
        mode = "default" if name == "compile" else "max-autotune-no-cudagraphs"
        model = torch.compile(model, mode=mode)
        notes.append(f"torch.compile mode={mode}")
    loss = loss_fn(backend, spec.train.label_smoothing)
    det = spec.train.detection
    if det is not None:  # loss centernet: PyTorch contenders run the reference loss
        from engine.training.detection.loss import centernet_loss_reference

        def loss(out, y):
            return centernet_loss_reference(out, y, size_weight=det.size_weight, offset_weight=det.offset_weight,
                                            alpha=det.alpha, beta=det.beta)[3]
    return Contender(name, model, opt, loss, precision, pool, notes, train_step)
