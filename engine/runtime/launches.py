"""What each kernel group launches, recorded from the runtime itself.

The plan says which ops a group fuses; which Triton kernels that takes, forward
and backward, is decided by the kernel families' launchers (tile plans, stride
phases, split reductions, fan-out sums). Rather than restate those decisions,
`record_launches` runs one training step as a dry run (every launcher runs,
no kernel executes) and attributes each launch to the group that made it:
forward launches to the group the runtime is executing; backward launches to
the group whose autograd nodes are running (a pre-hook on every autograd node
a group's forward created). The loss and the optimizer get their own rows.

So the kernel lists `fusenet check --kernels` prints and the golden plan tests
pin come from the same code that launches them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from engine import device
from engine.kernels.launch import launch_log, recording
from engine.passes.plan import Plan, format_plan
from engine.runtime.fused import Pass, fused_train_step


@dataclass
class StepLaunches:
    """The kernels of one step, by who launched them, each in launch order."""

    plan: Plan
    forward: dict[int, list[str]] = field(default_factory=dict)  # group index -> kernel names
    backward: dict[int, list[str]] = field(default_factory=dict)
    loss: list[str] = field(default_factory=list)
    optimizer: list[str] = field(default_factory=list)
    unattributed: list[str] = field(default_factory=list)

    def by_group(self) -> dict[int, tuple[list[str], list[str]]]:
        return {k: (self.forward.get(k, []), self.backward.get(k, [])) for k in range(len(self.plan))}

    def all(self) -> list[str]:
        out = [n for k in sorted(self.forward) for n in self.forward[k]]
        out += [n for k in sorted(self.backward) for n in self.backward[k]]
        return out + self.loss + self.optimizer + self.unattributed

    def total(self) -> int:
        return len(self.all())


class _Attribution:
    """Routes each launch to the list of whoever runs now."""

    def __init__(self, log: list[str], launches: StepLaunches):
        self.log, self.launches, self.seen = log, launches, 0
        self.target = launches.unattributed
        self.claimed: set = set()

    def flush(self) -> None:
        self.target.extend(self.log[self.seen:])
        self.seen = len(self.log)

    def switch(self, target: list[str]) -> None:
        self.flush()
        self.target = target

    def claim(self, tensors, target: list[str]) -> None:
        """Pre-hook every autograd node reachable from `tensors` that no earlier group claimed."""
        stack = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is None or node in self.claimed or type(node).__name__ == "AccumulateGrad":
                continue
            self.claimed.add(node)
            node.register_prehook(lambda grad_outputs, target=target: self.switch(target))
            stack.extend(fn for fn, _ in node.next_functions)


@contextlib.contextmanager
def _attributing(launches: StepLaunches, log: list[str]):
    att = _Attribution(log, launches)
    index = {id(group): k for k, group in enumerate(launches.plan)}

    @contextlib.contextmanager
    def observe(p: Pass, group):
        k = index[id(group)]
        att.switch(launches.forward.setdefault(k, []))
        yield
        att.flush()
        value = p.values.store.get(group.output)
        att.claim([value, *p.values.aliases.get(group.output, [])], launches.backward.setdefault(k, []))
        att.switch(launches.unattributed)

    old, Pass.observer = Pass.observer, observe
    try:
        yield att
    finally:
        Pass.observer = old
        att.flush()


def record_launches(model, batch: int, training: bool = True, gpu_tiles: bool = True) -> StepLaunches:
    """Dry-run one step of `model` at `batch` and attribute every kernel launch.

    Training: the training step's own code (`fused_train_step`: logits, fused
    cross-entropy, backward, the fused SGD step of the examples in device mode,
    under a step clock); inference: the forward (batch norm folded). `gpu_tiles`
    makes launchers choose their GPU tiles (what a GPU would launch) even under
    the interpreter.
    """
    from engine.kernels.clock import StepClock
    from engine.kernels.optim import SGD

    was_training = model.training
    model.train(training)
    plan = model.kernel_plan(fold_bn=not training)
    launches = StepLaunches(plan)
    x = torch.zeros(batch, *model.input_shape, device=device.DEVICE)
    tiles = device.gpu_tiles() if gpu_tiles else contextlib.nullcontext()
    try:
        with tiles, recording(dry_run=True), launch_log() as log, _attributing(launches, log) as att:
            if not training:
                with torch.no_grad():
                    model(x)
                return launches
            out = model.output_shape
            det = getattr(getattr(model, "train_config", None), "detection", None)
            if det is not None:  # loss centernet: its kernels, on targets of the right shapes
                from engine.kernels.centernet import placeholder_targets

                y = placeholder_targets(batch, out, x.device)
            else:
                y = torch.zeros((batch,) if len(out) == 1 else (batch, *out[1:]), dtype=torch.int64, device=x.device)
            clock = StepClock(x.device)
            opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
            opt.attach_clock(clock.counters, torch.full((1,), 0.1, device=x.device), 0)
            model.step_clock = clock.counters
            targets = {"loss": launches.loss, "optimizer": launches.optimizer}
            fused_train_step(model, opt, x, y, label_smoothing=0.1, clock=clock, detection=det,
                             phase=lambda name: att.switch(targets.get(name, launches.unattributed)))
            model.zero_grad(set_to_none=True)
        return launches
    finally:
        model.step_clock = None
        model.train(was_training)


def format_launches(launches: StepLaunches) -> str:
    """The plan with each group's kernels under it, then the loss, optimizer and totals."""
    text = [format_plan(launches.plan, launches.by_group())]
    if launches.plan.training:
        text.append(f"  loss:      {', '.join(launches.loss) or '-'}")
        text.append(f"  optimizer: {', '.join(launches.optimizer) or '-'}")
    if launches.unattributed:
        text.append(f"  unattributed: {', '.join(launches.unattributed)}")
    fwd = sum(len(v) for v in launches.forward.values())
    bwd = sum(len(v) for v in launches.backward.values())
    what = (f"{fwd} forward + {bwd} backward + {len(launches.loss)} loss + {len(launches.optimizer)} optimizer"
            if launches.plan.training else f"{fwd} forward")
    text.append(f"{launches.total()} kernel launches per {'training step' if launches.plan.training else 'forward'}"
                f" ({what})")
    return "\n".join(text)

