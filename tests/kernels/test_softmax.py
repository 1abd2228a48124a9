"""Softmax / log-softmax over the channel (last) dim, forward and backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DATA_MOVEMENT_OPS, OpRecorder, SHAPE_OPS, assert_close, check_against_torch

import engine.device
from engine.kernels import softmax as sm

ALLOWED_ATEN = DATA_MOVEMENT_OPS | SHAPE_OPS


OPS = {
    "softmax": (sm.softmax, lambda v: F.softmax(v, dim=-1)),
    "log_softmax": (sm.log_softmax, lambda v: F.log_softmax(v, dim=-1)),
}


@pytest.fixture
def looped(monkeypatch):
    """Force the multi-block (online) path and several row blocks."""
    monkeypatch.setattr(sm, "INTERP_MAX_BLOCK_C", 16)
    monkeypatch.setattr(sm, "INTERP_TILE", 256)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(37, 10), (2, 7, 9, 3), (1, 5, 3, 17), (3, 5, 7, 70), (5, 2000)])
def test_matches_torch(op, shape):
    ours, ref = OPS[op]
    x = (torch.randn(*shape) * 3).requires_grad_()
    check_against_torch(ours, ref, [x])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(37, 10), (2, 7, 9, 17), (3, 70), (4, 300)])
def test_looped_over_channel_blocks(op, shape, looped):
    ours, ref = OPS[op]
    x = (torch.randn(*shape) * 3).requires_grad_()
    check_against_torch(ours, ref, [x])


@pytest.mark.parametrize("op", OPS)
def test_gpu_tiles(op, monkeypatch):
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    monkeypatch.setattr(sm, "GPU_MAX_BLOCK_C", 64)  # C=70 -> two channel blocks
    ours, ref = OPS[op]
    x = torch.randn(37, 70).requires_grad_()
    check_against_torch(ours, ref, [x])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half(dtype):
    x = torch.randn(2, 7, 9, 17).to(dtype).requires_grad_()
    out, _ = check_against_torch(sm.softmax, lambda v: F.softmax(v, dim=-1), [x])
    assert out.dtype == dtype


@pytest.mark.parametrize("loop", [False, True])
def test_large_magnitudes_stable(loop, monkeypatch):
    if loop:
        monkeypatch.setattr(sm, "INTERP_MAX_BLOCK_C", 16)
    x = torch.randn(9, 70) * 1000 + 5000
    assert_close(sm.softmax(x), F.softmax(x.double(), -1))
    assert_close(sm.log_softmax(x), F.log_softmax(x.double(), -1))


@pytest.mark.parametrize("loop", [False, True])
def test_minus_inf_entries(loop, monkeypatch):
    if loop:
        monkeypatch.setattr(sm, "INTERP_MAX_BLOCK_C", 16)
    x = torch.randn(5, 40)
    x[:, :20] = float("-inf")  # first channel block of every row fully masked
    x[0, 25] = float("-inf")
    y = sm.softmax(x)
    assert torch.isfinite(y).all()
    assert_close(y, F.softmax(x.double(), -1))


def test_no_torch_compute_ops_forward_backward():
    x = torch.randn(2, 7, 9, 10, requires_grad=True)
    x2 = torch.randn(2, 7, 9, 10, requires_grad=True)
    g = torch.randn(2, 7, 9, 10)
    rec = OpRecorder()
    with rec:
        sm.softmax(x).backward(g)
        sm.log_softmax(x2).backward(g)
    bad = rec.ops - ALLOWED_ATEN
    assert not bad, f"torch compute ops used: {sorted(bad)}"
    assert x.grad is not None and x2.grad is not None
