"""Fused softmax cross-entropy (engine/kernels/loss.py) against F.cross_entropy in fp64."""
import pytest
import torch
import torch.nn.functional as F

from engine import device
from engine.kernels import launch as launch_mod
from engine.kernels.loss import cross_entropy, cross_entropy_forward
from helpers import DATA_MOVEMENT_OPS, OpRecorder, assert_close, check_against_torch

# Allocation, view and copy ops only. Besides the brief's list: empty_like/new_empty
# (allocation) and set_ (Triton's CPU interpreter aliases kernel arguments' storage).
ALLOWED_ATEN = DATA_MOVEMENT_OPS


def _ref(eps):
    return lambda x, t: F.cross_entropy(x, t, label_smoothing=eps)


def _ours(eps):
    return lambda x, t: cross_entropy(x, t, label_smoothing=eps)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("m,c", [(1, 10), (37, 10), (2000, 10), (1, 3), (37, 3), (2000, 3), (1, 1000), (37, 1000)])
def test_cross_entropy_fp32(m, c, eps):
    x = (torch.randn(m, c) * 3).requires_grad_()
    t = torch.randint(0, c, (m,))
    loss, _ = check_against_torch(_ours(eps), _ref(eps), [x, t])
    assert loss.shape == () and loss.dtype == torch.float32


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_large(eps):
    x = (torch.randn(500, 1000) * 3).requires_grad_()
    t = torch.randint(0, 1000, (500,))
    check_against_torch(_ours(eps), _ref(eps), [x, t])


def test_cross_entropy_loops_over_class_blocks():
    # C = 5000 > the interpreter's 4096-wide class block: online log-sum-exp over 2 blocks.
    x = (torch.randn(5, 5000) * 4).requires_grad_()
    t = torch.randint(0, 5000, (5,))
    check_against_torch(_ours(0.1), _ref(0.1), [x, t])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,c", [(37, 10), (300, 1000)])
def test_cross_entropy_half(dtype, m, c):
    x = (torch.randn(m, c) * 3).to(dtype).requires_grad_()
    t = torch.randint(0, c, (m,))
    check_against_torch(_ours(0.1), _ref(0.1), [x, t], tol=dtype)


def test_cross_entropy_extreme_logits_are_stable():
    x = torch.tensor([[1000.0, -1000.0, 0.0], [-500.0, -500.0, -499.0]]).requires_grad_()
    t = torch.tensor([1, 2])
    check_against_torch(_ours(0.1), _ref(0.1), [x, t])


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_segmentation_nhwc(eps):
    x = torch.randn(2, 5, 7, 3).requires_grad_()  # NHWC per-pixel logits
    t = torch.randint(0, 3, (2, 5, 7))
    check_against_torch(
        lambda x, t: cross_entropy(x, t, label_smoothing=eps),
        lambda x, t: F.cross_entropy(x.permute(0, 3, 1, 2), t, label_smoothing=eps),
        [x, t],
    )


def test_cross_entropy_gpu_blocks(monkeypatch):
    monkeypatch.setattr(device, "INTERPRETED", False)
    x = (torch.randn(37, 1500) * 3).requires_grad_()  # 1024-wide class blocks: 2 per row
    t = torch.randint(0, 1500, (37,))
    with launch_mod.recording() as specs:
        check_against_torch(_ours(0.1), _ref(0.1), [x, t])
    assert dict(specs[0].constexprs)["BLOCK_C"] == 1024


def test_cross_entropy_scales_by_upstream_grad_and_is_deterministic():
    x = torch.randn(300, 10).requires_grad_()
    t = torch.randint(0, 10, (300,))
    loss = cross_entropy(x, t)
    loss.backward(torch.tensor(2.5))
    xr = x.detach().double().requires_grad_()
    (F.cross_entropy(xr, t) * 2.5).backward()
    assert_close(x.grad, xr.grad, what="scaled grad")
    again, _ = cross_entropy_forward(x.detach(), t)
    assert torch.equal(again, loss.detach())


def test_cross_entropy_only_allocation_view_copy_aten_ops():
    x = torch.randn(2, 5, 7, 3).requires_grad_()
    t = torch.randint(0, 3, (2, 5, 7))
    up = torch.tensor(1.0)  # explicit upstream grad (.backward() alone would call ones_like)
    with OpRecorder() as rec:
        loss = cross_entropy(x, t, label_smoothing=0.1)
        loss.backward(up)
    assert x.grad is not None
    assert rec.ops <= ALLOWED_ATEN, f"compute aten ops used: {sorted(rec.ops - ALLOWED_ATEN)}"


def test_cross_entropy_shape_errors():
    with pytest.raises(ValueError):
        cross_entropy(torch.randn(4, 3), torch.randint(0, 3, (5,)))
    with pytest.raises(ValueError):
        cross_entropy(torch.randn(2, 4, 4, 3), torch.randint(0, 3, (2, 4, 5)))
    with pytest.raises(ValueError):
        cross_entropy(torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ValueError):
        cross_entropy(torch.randn(4, 3, 2), torch.randint(0, 3, (4,)))


# ----------------------------------------------------------------------------- the training step's loss


def _launches(fn):
    calls = []
    with launch_mod.observing(lambda kernel, args: calls.append(launch_mod.kernel_name(kernel))):
        out = fn()
    return calls, out


def test_classification_loss_is_one_launch_and_large_logits_two(monkeypatch):
    from engine.kernels.loss import cross_entropy_step

    monkeypatch.setattr(device, "INTERPRETED", False)  # the GPU plan: one program up to 2**16 logits
    with launch_mod.recording(dry_run=True):
        calls, _ = _launches(lambda: cross_entropy_step(torch.randn(1024, 10), torch.zeros(1024, dtype=torch.int64)))
        assert calls == ["_xent_fwd_kernel"]
        calls, _ = _launches(lambda: cross_entropy(torch.randn(1024, 10).requires_grad_(),
                                                   torch.zeros(1024, dtype=torch.int64)).backward(torch.tensor(1.0)))
        assert calls == ["_xent_fwd_kernel", "_scale_by_scalar_kernel"]  # the autograd path: at most 2
        big = torch.randn(4 * 64 * 64, 21)  # per-pixel logits: partials, then the finishing program
        calls, _ = _launches(lambda: cross_entropy_step(big, torch.zeros(big.shape[0], dtype=torch.int64)))
        assert calls == ["_xent_fwd_kernel", "_xent_finish_kernel"]


@pytest.mark.parametrize("one_program", [True, False])
def test_step_loss_gradient_scale_sums_and_clock(monkeypatch, one_program):
    """The step's loss: the gradient of the mean loss of `s * logits` w.r.t. the logits, and
    with a clock the epoch sums (loss * rows, correct rows, rows), the step advanced."""
    from engine.kernels.clock import StepClock
    from engine.kernels.loss import cross_entropy_step

    if not one_program:
        monkeypatch.setattr("engine.kernels.loss._xent_plan", lambda M, C: (16, 8, 4, 32))  # 10 programs
    x = torch.randn(300, 7) * 3
    t = torch.randint(0, 7, (300,))
    clock = StepClock(x.device, base_seed=5, step=10)
    loss, grad = cross_entropy_step(x, t, 0.1, logit_scale=0.5, clock=clock)
    xr = x.double().requires_grad_()
    ref = F.cross_entropy(xr * 0.5, t, label_smoothing=0.1)
    ref.backward()
    assert_close(loss, ref.detach(), what="loss")
    assert_close(grad, xr.grad, what="gradient")
    st = clock.read()
    assert st["count"] == 300 and st["correct"] == float((x.argmax(1) == t).sum())
    assert st["loss_sum"] == pytest.approx(float(loss) * 300, rel=1e-12)
    assert not st["bad"] and clock.step() == 11


def test_step_loss_is_deterministic_across_program_counts(monkeypatch):
    from engine.kernels.loss import cross_entropy_step

    x, t = torch.randn(300, 7), torch.randint(0, 7, (300,))
    a, ga = cross_entropy_step(x, t)
    b, gb = cross_entropy_step(x, t)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    monkeypatch.setattr("engine.kernels.loss._xent_plan", lambda M, C: (16, 8, 4, 32))
    c, gc = cross_entropy_step(x, t)
    assert torch.equal(gc, ga) and abs(float(c) - float(a)) <= 1e-6 * abs(float(a))


def test_nan_guard_flag_keeps_the_first_bad_step():
    from engine.kernels.clock import StepClock
    from engine.kernels.loss import cross_entropy_step

    x, t = torch.randn(8, 3), torch.randint(0, 3, (8,))
    clock = StepClock(x.device, step=0)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.warns(RuntimeWarning) if device.INTERPRETED else _nothing():
        for logits in (x, x, bad, x, bad * float("inf")):  # global steps 1..5: the first bad is step 3
            cross_entropy_step(logits, t, clock=clock)
    st = clock.read()
    assert st["bad"] and st["bad_step"] == 3 and st["bad_loss"] != st["bad_loss"] and clock.step() == 5
    clock.reset_sums()
    assert clock.read()["count"] == 0 and clock.read()["bad"]  # the guard survives the epoch's reset


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
