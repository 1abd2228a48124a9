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
