"""Pointwise kernels: activations, add+act, scale, fan-out, pointwise chains."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (ACTIVATIONS, DATA_MOVEMENT_OPS, SHAPE_OPS, OpRecorder, assert_close,
                     check_against_torch, torch_act)

from engine.kernels import batchnorm as bn
from engine.kernels import common
from engine.kernels import concat as cc
from engine.kernels import pointwise as pw

SLOPE = 0.2


ALLOWED_ATEN = DATA_MOVEMENT_OPS | SHAPE_OPS


@pytest.fixture
def small_blocks(monkeypatch):
    """Force several row and channel blocks on small tensors."""
    monkeypatch.setattr(common, "INTERP_BLOCK_1D", 64)


# ----------------------------------------------------------------- activation
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_matches_torch(act):
    x = (torch.randn(2, 7, 9, 17) * 2).requires_grad_()
    check_against_torch(lambda v: pw.activation(v, act, SLOPE), lambda v: torch_act(v, act, SLOPE), [x])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_activation_half(dtype, act):
    x = torch.randn(1, 5, 3, 10).to(dtype).requires_grad_()
    out, _ = check_against_torch(lambda v: pw.activation(v, act), lambda v: torch_act(v, act, SLOPE), [x])
    assert out.dtype == dtype


def test_activation_many_blocks_2d(small_blocks):
    x = torch.randn(37, 70).requires_grad_()  # [N, F], 2590 elements, 41 blocks
    check_against_torch(lambda v: pw.activation(v, "tanh"), torch.tanh, [x])


def test_activation_none_is_identity():
    x = torch.randn(3, 4)
    assert pw.activation(x, "none") is x


# ------------------------------------------------------------------- add_act
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_add_act_matches_torch(act):
    a = torch.randn(2, 7, 9, 10).requires_grad_()
    b = torch.randn(2, 7, 9, 10).requires_grad_()
    check_against_torch(lambda u, v: pw.add_act(u, v, act, SLOPE), lambda u, v: torch_act(u + v, act, SLOPE), [a, b])


def test_add_act_half_and_blocks(small_blocks):
    a = torch.randn(1, 3, 5, 70, dtype=torch.float16).requires_grad_()
    b = torch.randn(1, 3, 5, 70, dtype=torch.float16).requires_grad_()
    check_against_torch(lambda u, v: pw.add_act(u, v, "relu"), lambda u, v: F.relu(u + v), [a, b])


def test_add_none_shares_gradient_tensor():
    a = torch.randn(2, 3, 3, 4, requires_grad=True)
    b = torch.randn(2, 3, 3, 4, requires_grad=True)
    y = pw.add_act(a, b)
    g = torch.randn_like(y)
    ga, gb = torch.autograd.grad(y, (a, b), g)
    assert ga.data_ptr() == gb.data_ptr()
    assert_close(ga, g)


def test_add_act_validation():
    with pytest.raises(ValueError, match="shapes differ"):
        pw.add_act(torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="dtypes differ"):
        pw.add_act(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="unknown activation"):
        pw.add_act(torch.randn(2, 3), torch.randn(2, 3), "swish")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        pw.activation(torch.randn(2, 3, dtype=torch.float64))


# --------------------------------------------------------------------- scale
@pytest.mark.parametrize("factor", [-1.5, 0.0, 3.0])
def test_scale_matches_torch(factor):
    x = torch.randn(2, 7, 9, 3).requires_grad_()
    check_against_torch(lambda v: pw.scale(v, factor), lambda v: v * factor, [x])



# ------------------------------------------------------- recording / torch ops
def test_no_torch_compute_ops_forward_backward():
    x = torch.randn(2, 7, 9, 10, requires_grad=True)
    r = torch.randn(2, 7, 9, 10, requires_grad=True)
    s = torch.randn(10, requires_grad=True)
    t = torch.randn(10, requires_grad=True)
    c = torch.randn(2, 7, 9, 3, requires_grad=True)
    r2 = torch.randn(2, 7, 9, 10, requires_grad=True)
    c2 = torch.randn(2, 7, 9, 3, requires_grad=True)
    gz = torch.randn(2, 7, 9, 16)
    rec = OpRecorder()
    with rec:
        y = pw.activation(x, "gelu")
        y = pw.add_act(y, r, "relu")
        y = pw.scale(y, 0.5)
        y = bn.affine_act(y, s, t, "silu")
        y = pw.add_act(y, r2)  # act none: shared gradient
        buf = torch.empty(2, 7, 9, 13)
        cc.copy_into(buf[..., :10], y)
        cc.copy_into(buf[..., 10:], c)
        z = cc.concat_channels([buf, c2])
        torch.autograd.backward([z], [gz])
    bad = rec.ops - ALLOWED_ATEN
    assert not bad, f"torch compute ops used: {sorted(bad)}"
    assert x.grad is not None and s.grad is not None and t.grad is not None and c.grad is not None
    assert r2.grad is not None and c2.grad is not None



# --------------------------------------------------------------- fan-out
def test_fan_out_sums_consumer_gradients():
    x = torch.randn(2, 5, 7, 3, requires_grad=True)
    one = torch.ones(2, 5, 7, 3)

    def ours(x):
        a, b, c = pw.fan_out(x, 3)
        return pw.activation(a, "tanh"), pw.scale(b, 2.5), pw.add_act(c, one, "relu")

    def ref(x):
        return torch.tanh(x), x * 2.5, torch.relu(x + 1)

    check_against_torch(ours, ref, [x])


def test_fan_out_backward_is_triton_only():
    x = torch.randn(3, 4, 5, 6, requires_grad=True)
    dys = [torch.randn(3, 4, 5, 6) for _ in range(3)]
    with OpRecorder() as rec:
        outs = [pw.activation(v, "relu") for v in pw.fan_out(x, 3)]
        torch.autograd.backward(outs, dys)
    assert "add" not in rec.ops and rec.ops <= ALLOWED_ATEN, sorted(rec.ops - ALLOWED_ATEN)


def test_fan_out_unused_branch_passes_gradient_through():
    x = torch.randn(3, 4, 5, 6, requires_grad=True)
    dy = torch.randn(3, 4, 5, 6)
    a, _, _ = pw.fan_out(x, 3)
    pw.activation(a, "relu").backward(dy)
    assert torch.equal(x.grad, torch.where(x > 0, dy, torch.zeros(())))
    with pytest.raises(ValueError):
        pw.fan_out(x, 1)


# --------------------------------------------------------------- pointwise chains
CHAINS = [
    [("tanh", 0), ("scale", 0.5), ("leaky_relu", 0.1)],
    [("scale", -2.0), ("relu", 0)],
    [("gelu", 0), ("silu", 0), ("sigmoid", 0), ("scale", 3.0)],
    [("sigmoid", 0)],
]


@pytest.mark.parametrize("ops", CHAINS)
def test_pointwise_chain_matches_torch(ops):
    x = torch.randn(3, 5, 7, 17, requires_grad=True)

    def ref(x):
        for name, c in ops:
            x = x * c if name == "scale" else (F.leaky_relu(x, c) if name == "leaky_relu" else torch_act(x, name, SLOPE))
        return x

    check_against_torch(lambda x: pw.pointwise_chain(x, ops), ref, [x])


def test_pointwise_chain_is_one_kernel_and_triton_only():
    from engine.kernels.launch import recording

    x = torch.randn(4, 6, requires_grad=True)
    dy = torch.randn(4, 6)
    with recording() as specs, OpRecorder() as rec:
        pw.pointwise_chain(x, CHAINS[2]).backward(dy)
    assert [s.name for s in specs] == ["_chain_kernel", "_chain_kernel"]  # forward, backward
    assert rec.ops <= ALLOWED_ATEN, sorted(rec.ops - ALLOWED_ATEN)
    with pytest.raises(ValueError):
        pw.pointwise_chain(x, CHAINS[2] + [("relu", 0)])


@pytest.mark.parametrize("act", ACTIVATIONS[1:])
def test_every_activation_links_into_a_chain_between_scales(act):
    """Each activation of the table as a chain link next to constant scales: a new
    activation joins this test by itself, and can never be taken for a scale."""
    ops = [("scale", -1.5), (act, SLOPE), ("scale", 0.75)]
    x = torch.randn(2, 3, 5, 9, requires_grad=True)

    def ref(x):
        return torch_act(x * -1.5, act, SLOPE) * 0.75

    check_against_torch(lambda x: pw.pointwise_chain(x, ops), ref, [x])
