"""Pointwise kernels: activations, add+act, scale, affine+act, channel-slice copy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (ACTIVATIONS, DATA_MOVEMENT_OPS, SHAPE_OPS, OpRecorder, assert_close,
                     check_against_torch, torch_act)

import engine.device
from engine.kernels import pointwise as pw
from engine.kernels.launch import recording

SLOPE = 0.2


ALLOWED_ATEN = DATA_MOVEMENT_OPS | SHAPE_OPS


@pytest.fixture
def small_blocks(monkeypatch):
    """Force several row and channel blocks on small tensors."""
    monkeypatch.setattr(pw, "INTERP_BLOCK_1D", 64)
    monkeypatch.setattr(pw, "INTERP_TILE", 256)


@pytest.fixture
def gpu_tiles(monkeypatch):
    """Run the GPU tile choice (and multi-iteration split reductions) interpreted."""
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    monkeypatch.setattr(pw, "GPU_TARGET_PARTIALS", 2)


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


# ---------------------------------------------------------------- affine_act
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_affine_act_every_activation(act):
    x = torch.randn(2, 7, 9, 17).requires_grad_()
    s = torch.randn(17).requires_grad_()
    t = torch.randn(17).requires_grad_()
    check_against_torch(
        lambda v, a, b: pw.affine_act(v, a, b, act, SLOPE), lambda v, a, b: torch_act(v * a + b, act, SLOPE), [x, s, t]
    )


@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 5, 3, 10), (1, 5, 7, 70), (37, 17)])
def test_affine_act_shapes_many_blocks(shape, small_blocks):
    C = shape[-1]
    x = torch.randn(*shape).requires_grad_()
    s = torch.randn(C).requires_grad_()
    t = torch.randn(C).requires_grad_()
    check_against_torch(lambda v, a, b: pw.affine_act(v, a, b, "silu"), lambda v, a, b: F.silu(v * a + b), [x, s, t])


def test_affine_act_gpu_tiles(gpu_tiles):
    x = torch.randn(2, 7, 9, 70).requires_grad_()  # M=126, BLOCK_M=32 -> 4 tiles, N_ITER=2
    s = torch.randn(70).requires_grad_()
    t = torch.randn(70).requires_grad_()
    check_against_torch(lambda v, a, b: pw.affine_act(v, a, b, "gelu"), lambda v, a, b: F.gelu(v * a + b), [x, s, t])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_affine_act_half(dtype):
    x = torch.randn(2, 7, 9, 10).to(dtype).requires_grad_()
    s = torch.randn(10).requires_grad_()
    t = torch.randn(10).requires_grad_()
    out = pw.affine_act(x, s, t, "relu")
    assert out.dtype == dtype
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g.to(dtype))
    xr, sr, tr = (v.detach().double().requires_grad_() for v in (x, s, t))
    ref = F.relu(xr * sr + tr)
    ref.backward(g)
    assert_close(out, ref, dtype)
    assert_close(x.grad, xr.grad, dtype)
    assert s.grad.dtype == torch.float32 and t.grad.dtype == torch.float32
    assert_close(s.grad, sr.grad, dtype)
    assert_close(t.grad, tr.grad, dtype)


def test_affine_act_param_grads_only():
    x = torch.randn(2, 7, 9, 10)
    s = torch.randn(10).requires_grad_()
    t = torch.randn(10).requires_grad_()
    check_against_torch(lambda v, a, b: pw.affine_act(v, a, b, "tanh"), lambda v, a, b: torch.tanh(v * a + b), [x, s, t])


def test_affine_act_validation():
    x = torch.randn(2, 3, 3, 4)
    with pytest.raises(ValueError, match="shape \\[4\\]"):
        pw.affine_act(x, torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="float32"):
        pw.affine_act(x, torch.randn(4, dtype=torch.float16), torch.randn(4))


def test_sum_partials_deterministic_fixed_order():
    p = torch.randn(300, 70)
    q = torch.randn(300, 70)
    a1, b1 = pw.sum_partials(p, q)
    a2, b2 = pw.sum_partials(p, q)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert_close(a1, p.double().sum(0))
    assert_close(b1, q.double().sum(0))


# ------------------------------------------------------------- copy / concat
def test_copy_into_concat_buffer_with_grads(small_blocks):
    a = torch.randn(2, 7, 9, 3).requires_grad_()
    b = torch.randn(2, 7, 9, 17).requires_grad_()

    def ours(u, v):
        buf = torch.empty(2, 7, 9, 20)
        pw.copy_into(buf[..., 0:3], u)
        pw.copy_into(buf[..., 3:20], v)
        return buf

    out, _ = check_against_torch(ours, lambda u, v: torch.cat([u, v], dim=-1), [a, b])
    assert out.is_contiguous()


def test_copy_into_grad_is_contiguous_slice():
    a = torch.randn(1, 3, 5, 10, requires_grad=True)
    buf = torch.empty(1, 3, 5, 17)
    pw.copy_into(buf[..., 4:14], a)
    g = torch.randn(1, 3, 5, 17)
    (ga,) = torch.autograd.grad(buf[..., 4:14], a, g[..., 4:14])
    assert ga.is_contiguous()
    assert torch.equal(ga, g[..., 4:14])


def test_copy_into_rejects_uncollapsible_view():
    buf = torch.empty(4, 6, 5)
    with pytest.raises(ValueError, match="collapse"):
        pw.copy_into(buf[:, :3, :], torch.randn(4, 3, 5))  # rows 0-2 of each of 4 groups


def test_copy_into_strided_rows():
    buf = torch.zeros(4, 6, 5)
    src = torch.randn(4, 3, 5)
    pw.copy_into(buf[:, ::2, :], src)  # rows of stride 10 collapse to one stride
    assert torch.equal(buf[:, ::2, :], src)
    assert torch.equal(buf[:, 1::2, :], torch.zeros(4, 3, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_concat_channels(dtype):
    xs = [torch.randn(2, 7, 9, c).to(dtype).requires_grad_() for c in (3, 10, 17)]
    check_against_torch(lambda *v: pw.concat_channels(v), lambda *v: torch.cat(v, dim=-1), xs)


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
        y = pw.affine_act(y, s, t, "silu")
        y = pw.add_act(y, r2)  # act none: shared gradient
        buf = torch.empty(2, 7, 9, 13)
        pw.copy_into(buf[..., :10], y)
        pw.copy_into(buf[..., 10:], c)
        z = pw.concat_channels([buf, c2])
        torch.autograd.backward([z], [gz])
    bad = rec.ops - ALLOWED_ATEN
    assert not bad, f"torch compute ops used: {sorted(bad)}"
    assert x.grad is not None and s.grad is not None and t.grad is not None and c.grad is not None
    assert r2.grad is not None and c2.grad is not None


def test_launch_records_specializations():
    x = torch.randn(2, 3, 3, 4)
    with recording() as specs:
        pw.affine_act(x, torch.randn(4), torch.randn(4), "relu")
    names = [sp.name for sp in specs]
    assert "_affine_act_fwd_kernel" in names
    spec = specs[names.index("_affine_act_fwd_kernel")]
    assert ("ACT", 1) in spec.constexprs


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
