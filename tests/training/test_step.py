"""The training step (engine/training/step.py): against PyTorch, deterministic and
resumable, free of host syncs and of per-step host scalars (what makes a CUDA
graph of it valid), and its capture logic, on CPU with a stand-in for the CUDA
calls and on a GPU for real (gpu tier)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import engine
from engine.kernels.launch import observing, recording
from engine.kernels.optim import SGD, Adam
from engine.perf.audit import StepAudit, _DeviceOps, fusenet_step
from engine.training.step import WARMUP_STEPS, TrainStep
from helpers import OpRecorder, assert_close

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

DROPOUT_NET = """
network drop {
    input 1x8x8
    conv 8 kernel=3 pad=1 -> bn -> relu
    maxpool 2
    flatten
    dropout 0.2
    linear 24 -> relu -> dropout 0.3
    linear 10
    scale 0.5
}
"""


def _batch(model, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *model.input_shape, generator=gen)
    y = torch.randint(0, model.output_shape[0], (n,), generator=gen)
    return x, y


def _detection_targets(model, n: int, seed: int = 0):
    """CenterNet targets of n images: a few objects each at random cells (engine.kernels.centernet.Targets)."""
    from engine.kernels.centernet import Targets

    c, ho, wo = model.output_shape
    gen = torch.Generator().manual_seed(seed)
    heat = torch.rand(n, ho, wo, c - 4, generator=gen) * 0.5
    index = torch.randint(0, ho * wo, (n, 3), generator=gen, dtype=torch.int32)
    for b in range(n):
        for k in range(3):
            heat[b, int(index[b, k]) // wo, int(index[b, k]) % wo, k % (c - 4)] = 1.0
    return Targets(heat, index, torch.rand(n, 3, 2, generator=gen) * 4, torch.rand(n, 3, 2, generator=gen),
                   torch.ones(n, 3))


def _step(model, opt, lrs, **kw) -> TrainStep:
    return TrainStep(model, opt, backend="triton", device=torch.device("cpu"), lr_of=lambda k: lrs[k],
                     total_steps=len(lrs), **kw)


# Adam runs on lenet5 (no batch norm): a conv bias before training-mode batch norm has a
# gradient that is rounding noise, which Adam's normalisation turns into full-size steps.
@pytest.mark.parametrize("name,opt_name", [("digits", "sgd"), ("lenet5", "adam")])
def test_the_step_tracks_pytorch_with_a_changing_learning_rate(name, opt_name):
    """4 steps against torch.optim + F.cross_entropy in fp64: the learning rate comes from the
    device table by the clock (Adam's step count too), the loss adds up the epoch's sums."""
    tri = engine.compile(EXAMPLES / f"{name}.cnn")
    ref = engine.compile(EXAMPLES / f"{name}.cnn", backend="torch").double()
    ref.load_state_dict(tri.state_dict())
    lrs = [0.05, 0.02, 0.04, 0.01]
    if opt_name == "sgd":
        ours = SGD(tri.parameters(), lr=1.0, momentum=0.9, nesterov=True, weight_decay=5e-4)
        theirs = torch.optim.SGD(ref.parameters(), lr=1.0, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        ours, theirs = Adam(tri.parameters(), lr=1.0), torch.optim.Adam(ref.parameters(), lr=1.0)
        lrs = [lr / 10 for lr in lrs]
    step = _step(tri, ours, lrs, label_smoothing=0.1)
    total, n = 0.0, 0
    for k, lr in enumerate(lrs):
        x, y = _batch(tri, 16, k)
        step(x, y)
        for g in theirs.param_groups:
            g["lr"] = lr
        theirs.zero_grad()
        loss = F.cross_entropy(ref(x.double()), y, label_smoothing=0.1)
        loss.backward()
        theirs.step()
        total, n = total + float(loss.detach()) * 16, n + 16
    st = step.clock.read()
    assert st["count"] == n and abs(st["loss_sum"] - total) <= 1e-4 * total and not st["bad"]
    for (key, pt), (_, pr) in zip(tri.state_dict().items(), ref.state_dict().items()):
        if pr.is_floating_point():
            assert_close(pt, pr, "network_fp32", what=f"{key} after {len(lrs)} steps", scale=pr.abs().max().item() + 1)
    step.close()


def _train(steps: int, start: int = 0, state=None):
    torch.manual_seed(3)
    model = engine.compile(DROPOUT_NET, precision="bf16")
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    if state is not None:
        model.load_state_dict(state[0])
        opt.load_state_dict(state[1])
    step = _step(model, opt, [0.1, 0.08, 0.06, 0.04], start_step=start, seed=7)
    for k in range(start, start + steps):
        step(*_batch(model, 8, k))
    step.close()
    return model, opt


def test_the_step_is_deterministic_and_a_resumed_run_continues_bit_for_bit():
    """Dropout masks come from (run seed, global step, site) on the device: a run cut after
    2 steps and resumed from its state matches the uninterrupted one exactly."""
    full, _ = _train(4)
    again, _ = _train(4)
    cut, opt = _train(2)
    resumed, _ = _train(2, start=2, state=({k: v.clone() for k, v in cut.state_dict().items()}, opt.state_dict()))
    for key, v in full.state_dict().items():
        assert torch.equal(v, again.state_dict()[key]), f"{key}: two identical runs differ"
        assert torch.equal(v, resumed.state_dict()[key]), f"{key}: the resumed run differs"


def _recorded_step(step, x, y):
    """(per launch: kernel name and every non-tensor argument; the torch ops) of one body."""
    launches, audit = [], StepAudit("probe")

    def note(kernel, args):
        launches.append((getattr(kernel, "__name__", str(kernel)),
                         tuple(a for a in args if not isinstance(a, torch.Tensor))))

    with observing(note), _DeviceOps(audit):
        step.body(x, y)
    return launches, dict(audit.torch_ops), dict(audit.host_syncs)


@pytest.mark.parametrize("name", ["resnet_small", "airbench94", "unet_tiny", "detect_shapes"])
def test_steady_state_steps_launch_the_same_arguments_and_sync_nothing(name, tmp_path):
    """What a CUDA graph replays is what the capture recorded: two steady-state steps with different
    learning rates, step counts and dropout masks launch the same kernels with the same host
    arguments and the same torch ops, and read nothing back (meta device, GPU tiles)."""
    from engine import device

    spec = engine.load(EXAMPLES / f"{name}.cnn")
    step, x, y = fusenet_step(spec, 2, "bf16")
    step.lr_of = lambda k: 0.1 / (k + 1)
    step.update_lrs()
    with device.gpu_tiles(), recording(dry_run=True):
        step.body(x, y)  # the first step sets up the optimizer's state
        first = _recorded_step(step, x, y)
        second = _recorded_step(step, x, y)
    step.close()
    assert first == second
    assert not first[2], f"host syncs: {first[2]}"


@pytest.mark.parametrize("name", ["lenet5", "detect_shapes"])
def test_a_whole_step_dispatches_no_pytorch_arithmetic(name):
    """detect_shapes: the CenterNet loss (engine.kernels.centernet) is fusenet's too."""
    tri = engine.compile(EXAMPLES / f"{name}.cnn", precision="bf16")
    det = tri.train_config.detection
    step = _step(tri, SGD(tri.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4), [0.1] * 3,
                 detection=det)
    x, y = _batch(tri, 2, 0) if det is None else (torch.randn(2, *tri.input_shape), _detection_targets(tri, 2))
    x, y = step.inputs(x, y)
    step(x, y)
    with OpRecorder() as rec:
        step.body(x, y)
    compute = {"mm", "convolution", "add", "add_", "mul", "mul_", "sum", "div", "where", "argmax", "eq"}
    assert not compute & rec.ops, sorted(compute & rec.ops)
    step.close()


class FakeGraphs:
    """The CUDA calls of a captured step, on CPU: the warm-up runs fn; the capture records fn's
    launches without running them (a dry run: nothing executes, as in a real capture) and a
    replay runs fn."""

    def __init__(self, fail: bool = False):
        self.fail, self.side, self.captures, self.replays = fail, 0, 0, 0

    def on_side_stream(self, fn):
        self.side += 1
        fn()

    def capture(self, fn):
        self.captures += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        with recording(dry_run=True):
            fn()
        graphs = self

        class Graph:
            def replay(self):
                graphs.replays += 1
                fn()

        return Graph()


def test_capture_logic_warms_up_then_captures_once_and_replays_on_static_buffers():
    torch.manual_seed(0)
    eager = engine.compile(EXAMPLES / "digits.cnn")
    graphed = engine.compile(EXAMPLES / "digits.cnn")
    graphed.load_state_dict(eager.state_dict())
    lrs = [0.1, 0.05, 0.08, 0.02, 0.06]
    steps = [_step(m, SGD(m.parameters(), lr=1.0, momentum=0.9), lrs, capture=c, graphs=g)
             for m, c, g in ((eager, False, None), (graphed, True, FakeGraphs()))]
    fake = steps[1].graphs
    for k in range(len(lrs)):
        for s in steps:
            s(*_batch(eager, 8, k))
    assert (fake.side, fake.captures, fake.replays) == (WARMUP_STEPS, 1, len(lrs) - WARMUP_STEPS)
    assert steps[1].static_x is not None and steps[1].host_step == len(lrs) == steps[1].clock.step()
    for key, v in eager.state_dict().items():
        assert torch.equal(v, graphed.state_dict()[key]), key
    assert steps[1].clock.read() == steps[0].clock.read()


DETECT_NET = """
network det {
    input 3x16x16
    conv 8 kernel=3 stride=2 pad=1 -> bn -> relu
    conv 7 kernel=3 stride=2 pad=1
}
train {
    loss centernet
}
"""


def test_a_captured_detection_step_replays_on_static_target_buffers():
    """The CenterNet targets (a dataclass of tensors) get static copies too: replays read each batch's."""
    eager, graphed = engine.compile(DETECT_NET), engine.compile(DETECT_NET)
    graphed.load_state_dict(eager.state_dict())
    det = eager.train_config.detection
    lrs = [0.1, 0.05, 0.08, 0.02]
    steps = [_step(m, SGD(m.parameters(), lr=1.0, momentum=0.9), lrs, capture=c, graphs=g, detection=det)
             for m, c, g in ((eager, False, None), (graphed, True, FakeGraphs()))]
    for k in range(len(lrs)):
        x = torch.randn(2, *eager.input_shape, generator=torch.Generator().manual_seed(k))
        for s in steps:
            s(x, _detection_targets(eager, 2, seed=k))
    assert steps[1].graphs.replays == len(lrs) - WARMUP_STEPS
    assert steps[1].static_y.heatmap.shape == (2, 4, 4, 3)
    for key, v in eager.state_dict().items():
        assert torch.equal(v, graphed.state_dict()[key]), key
    assert steps[1].clock.read() == steps[0].clock.read()


def test_a_failed_capture_falls_back_to_eager_steps():
    torch.manual_seed(0)
    model = engine.compile(EXAMPLES / "digits.cnn")
    step = _step(model, SGD(model.parameters(), lr=0.1), [0.1] * 4, capture=True, graphs=FakeGraphs(fail=True))
    for k in range(4):
        step(*_batch(model, 8, k))
    assert step.graph is None and not step.capture and "capturing" in step.capture_error
    assert step.clock.step() == 4 and step.clock.read()["count"] == 32


def test_a_network_with_conv_epilogue_dropout_is_not_captured():
    net = engine.compile("network n {\n input 1x8x8\n conv 4 kernel=3 -> relu -> dropout 0.2\n flatten\n"
                         " linear 3\n}\n")
    assert net.capture_blockers() and "integer seed" in net.capture_blockers()[0]
    assert not engine.compile(EXAMPLES / "airbench94.cnn").capture_blockers()


# ----------------------------------------------------------------------------- on a GPU


def _cuda_pair():
    torch.manual_seed(0)
    a = engine.compile(EXAMPLES / "digits.cnn", precision="bf16").cuda()
    b = engine.compile(EXAMPLES / "digits.cnn", precision="bf16").cuda()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.gpu
def test_captured_steps_match_eager_steps_on_cuda():
    eager, graphed = _cuda_pair()
    lrs = [0.1, 0.05, 0.08, 0.02, 0.06, 0.04]
    steps = [TrainStep(m, SGD(m.parameters(), lr=1.0, momentum=0.9, nesterov=True), backend="triton",
                       device=torch.device("cuda"), lr_of=lambda k: lrs[k], total_steps=len(lrs), capture=c)
             for m, c in ((eager, False), (graphed, True))]
    for k in range(len(lrs)):
        for s in steps:
            s(*_batch(eager, 64, k))
    assert steps[1].graph is not None, steps[1].capture_error
    torch.cuda.synchronize()
    for key, v in eager.state_dict().items():
        assert torch.allclose(v.float(), graphed.state_dict()[key].float(), rtol=1e-5, atol=1e-6), key
    assert steps[0].clock.read()["count"] == steps[1].clock.read()["count"] == 64 * len(lrs)


@pytest.mark.gpu
def test_captured_detection_steps_match_eager_steps_on_cuda():
    """detect_shapes: the CenterNet loss under the step clock, captured once and replayed on
    static target buffers, against eager steps (and the loss terms' running sums)."""
    torch.manual_seed(0)
    eager = engine.compile(EXAMPLES / "detect_shapes.cnn", precision="bf16").cuda()
    graphed = engine.compile(EXAMPLES / "detect_shapes.cnn", precision="bf16").cuda()
    graphed.load_state_dict(eager.state_dict())
    det = eager.train_config.detection
    lrs = [0.01, 0.005, 0.008, 0.002, 0.006]
    steps = [TrainStep(m, SGD(m.parameters(), lr=1.0, momentum=0.9), backend="triton",
                       device=torch.device("cuda"), lr_of=lambda k: lrs[k], total_steps=len(lrs), capture=c,
                       detection=det)
             for m, c in ((eager, False), (graphed, True))]
    for k in range(len(lrs)):
        x = torch.randn(16, *eager.input_shape, generator=torch.Generator().manual_seed(k))
        for s in steps:
            s(x, _detection_targets(eager, 16, seed=k))
    assert steps[1].graph is not None, steps[1].capture_error
    torch.cuda.synchronize()
    for key, v in eager.state_dict().items():
        assert torch.allclose(v.float(), graphed.state_dict()[key].float(), rtol=1e-5, atol=1e-6), key
    a, b = steps[0].clock.read(), steps[1].clock.read()
    assert a["count"] == b["count"] == 16 * len(lrs)
    assert a["terms"] == pytest.approx(b["terms"], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("capture", [False, True])
def test_steady_state_steps_make_no_host_sync_on_cuda(capture):
    model, _ = _cuda_pair()
    step = TrainStep(model, SGD(model.parameters(), lr=0.1, momentum=0.9), backend="triton",
                     device=torch.device("cuda"), lr_of=lambda k: 0.1, total_steps=10, capture=capture)
    batches = [step.inputs(*_batch(model, 64, k)) for k in range(6)]
    for x, y in batches[:WARMUP_STEPS + 1]:
        step(x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches[WARMUP_STEPS + 1:]:
            step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (step.graph is not None) == capture


def test_the_bench_times_the_training_step_of_fusenet_train(monkeypatch):
    from engine.perf.bench.contenders import InputPool, build

    source = str(EXAMPLES / "digits.cnn")
    spec = engine.load(source)
    pool = InputPool.make(spec, 4, 1, torch.device("cpu"))
    c = build("fusenet", source, engine.compile(source, backend="torch").state_dict(), "fp32", pool)
    calls = []
    real = TrainStep.body
    monkeypatch.setattr(TrainStep, "body", lambda self, x, y: (calls.append(x.is_contiguous(
        memory_format=torch.channels_last)), real(self, x, y))[1])
    c.train(True)
    loss = c.step(0)
    assert calls == [True] and loss.dim() == 0 and torch.isfinite(loss)
