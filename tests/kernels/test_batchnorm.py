"""Batch norm (training and eval) fused with activations, and the per-channel
affine + activation of eval mode, forward and backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (ACTIVATIONS, DATA_MOVEMENT_OPS, SHAPE_OPS, OpRecorder, assert_close,
                     check_against_torch, torch_act)

import engine.device
from engine.kernels import batchnorm as bn
from engine.kernels.batchnorm import backward as bn_backward
from engine.kernels.batchnorm import training as bn_training
from engine.kernels import common, reduction
from engine.kernels.launch import launch_log, recording


SLOPE = 0.2


ALLOWED_ATEN = DATA_MOVEMENT_OPS | SHAPE_OPS


def to_nchw(t):
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t


def to_nhwc(t):
    return t.permute(0, 2, 3, 1) if t.dim() == 4 else t


def ref_train(act, rm=None, rv=None, momentum=0.1, eps=1e-5):
    def f(x, w, b):
        y = F.batch_norm(to_nchw(x), rm, rv, w, b, training=True, momentum=momentum, eps=eps)
        return to_nhwc(torch_act(y, act, SLOPE))

    return f


def ours_train(act, rm=None, rv=None, **kw):
    return lambda x, w, b: bn.batch_norm_train(x, w, b, rm, rv, act=act, slope=SLOPE, **kw)


def inputs(shape, dtype=torch.float32):
    C = shape[-1]
    x = (torch.randn(*shape) * 1.5 + 0.3).to(dtype).requires_grad_()
    w = (torch.rand(C) + 0.5).requires_grad_()
    b = torch.randn(C).requires_grad_()
    return x, w, b


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(common, "INTERP_TILE", 1024)  # C=70: 8-row tiles; C=17: 32-row tiles


@pytest.fixture
def tiny_blocks(monkeypatch):
    monkeypatch.setattr(common, "INTERP_TILE", 256)  # C=70: 2-row tiles; C=3: 64-row tiles


@pytest.fixture
def gpu_tiles(monkeypatch):
    """Run the GPU tile choice (and multi-iteration split reductions) interpreted."""
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    monkeypatch.setattr(common, "GPU_TARGET_PARTIALS", 2)


# ------------------------------------------------------------------- training
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_train_every_activation(act):
    x, w, b = inputs((2, 7, 9, 10))
    check_against_torch(ours_train(act), ref_train(act), [x, w, b])


@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 5, 3, 17), (3, 5, 7, 70), (37, 10)])
def test_train_shapes_many_blocks(shape, small_blocks):
    x, w, b = inputs(shape)
    check_against_torch(ours_train("relu"), ref_train("relu"), [x, w, b])


def test_train_gpu_tiles(monkeypatch):
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    monkeypatch.setattr(common, "GPU_TARGET_PARTIALS", 2)  # N_ITER > 1 in the split reductions
    x, w, b = inputs((2, 7, 9, 70))
    check_against_torch(ours_train("silu"), ref_train("silu"), [x, w, b])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_train_half(dtype):
    x, w, b = inputs((2, 7, 9, 17), dtype)
    out, _ = check_against_torch(ours_train("relu"), ref_train("relu"), [x, w, b])
    assert out.dtype == dtype


def test_train_affine_free():
    x = torch.randn(2, 7, 9, 10).requires_grad_()
    check_against_torch(
        lambda v: bn.batch_norm_train(v, None, None, None, None, act="gelu"),
        lambda v: to_nhwc(F.gelu(F.batch_norm(to_nchw(v), None, None, training=True))),
        [x],
    )


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_stats_two_steps(momentum):
    C = 17
    rm, rv, nbt = torch.randn(C), torch.rand(C) + 0.5, torch.tensor(3, dtype=torch.int64)
    rm_ref, rv_ref, nbt_ref = rm.double(), rv.double(), 3
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    for step in range(2):
        x = torch.randn(2, 7, 9, C) * 2 + 1
        bn.batch_norm_train(x, w, b, rm, rv, momentum=momentum, num_batches_tracked=nbt, act="relu")
        nbt_ref += 1
        m = momentum if momentum is not None else 1.0 / nbt_ref
        F.batch_norm(to_nchw(x.double()), rm_ref, rv_ref, w.double(), b.double(), training=True, momentum=m)
    assert nbt.item() == 5 and nbt.dtype == torch.int64
    assert_close(rm, rm_ref, what="running_mean")
    assert_close(rv, rv_ref, what="running_var")


def test_running_stats_match_nn_module():
    mod = torch.nn.BatchNorm2d(10, momentum=None).double()
    rm, rv, nbt = torch.zeros(10), torch.ones(10), torch.tensor(0)
    for _ in range(2):
        x = torch.randn(1, 5, 3, 10)
        bn.batch_norm_train(x, None, None, rm, rv, momentum=None, num_batches_tracked=nbt)
        mod(to_nchw(x.double()))
    assert nbt.item() == mod.num_batches_tracked.item()
    assert_close(rm, mod.running_mean)
    assert_close(rv, mod.running_var)


def test_train_with_grads_and_running_stats(small_blocks):
    C = 17
    rm, rv = torch.zeros(C), torch.ones(C)
    rm_ref, rv_ref = rm.double(), rv.double()
    x, w, b = inputs((2, 7, 9, C))
    check_against_torch(ours_train("leaky_relu", rm, rv), ref_train("leaky_relu", rm_ref, rv_ref), [x, w, b])
    assert_close(rm, rm_ref)
    assert_close(rv, rv_ref)


def test_supplied_partials_match():
    x, w, b = inputs((2, 7, 9, 10))
    xd = x.detach()
    rows = xd.reshape(-1, 10).double()
    psum = torch.stack([rows[:50].sum(0), rows[50:].sum(0)]).float().contiguous()
    psumsq = torch.stack([(rows[:50] ** 2).sum(0), (rows[50:] ** 2).sum(0)]).float().contiguous()
    rm1, rv1, rm2, rv2 = torch.zeros(10), torch.ones(10), torch.zeros(10), torch.ones(10)
    check_against_torch(
        lambda v, ww, bb: bn.batch_norm_train(v, ww, bb, rm1, rv1, act="tanh", partials=(psum, psumsq)),
        ref_train("tanh"), [x, w, b],
    )
    bn.batch_norm_train(xd, w.detach(), b.detach(), rm2, rv2)
    assert_close(rm1, rm2)
    assert_close(rv1, rv2)


def test_backward_deterministic(small_blocks):
    x, w, b = inputs((3, 5, 7, 70))  # 14 row blocks
    dy = torch.randn(3, 5, 7, 70)
    grads = []
    for _ in range(2):
        xx, ww, bb = (t.detach().clone().requires_grad_() for t in (x, w, b))
        bn.batch_norm_train(xx, ww, bb, None, None, act="gelu").backward(dy)
        grads.append((xx.grad, ww.grad, bb.grad))
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


def test_train_validation():
    x = torch.randn(1, 1, 1, 4)
    with pytest.raises(ValueError, match="more than 1 value"):
        bn.batch_norm_train(x, None, None, None, None)
    x = torch.randn(2, 3, 3, 4)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bn.batch_norm_train(x, None, None, torch.zeros(4), torch.ones(4), momentum=None)
    with pytest.raises(ValueError, match="both"):
        bn.batch_norm_train(x, None, None, torch.zeros(4), None)
    with pytest.raises(ValueError, match="shape \\[4\\]"):
        bn.batch_norm_train(x, torch.ones(3), None, None, None)
    with pytest.raises(ValueError, match="partials"):
        bn.batch_norm_train(x, None, None, None, None, partials=(torch.zeros(2, 3), torch.zeros(2, 3)))


# ----------------------------------------------------------------------- eval
def test_eval_scale_shift_values():
    C = 10
    w, b, rm, rv = torch.randn(C), torch.randn(C), torch.randn(C), torch.rand(C) + 0.1
    s, t = bn.bn_eval_scale_shift(w, b, rm, rv, 1e-3)
    s_ref = w.double() / torch.sqrt(rv.double() + 1e-3)
    assert_close(s, s_ref)
    assert_close(t, b.double() - rm.double() * s_ref)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_eval_every_activation_with_grads(act):
    C = 17
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    x, w, b = inputs((2, 7, 9, C))
    check_against_torch(
        lambda v, ww, bb: bn.batch_norm_eval(v, ww, bb, rm, rv, 1e-5, act, SLOPE),
        lambda v, ww, bb: to_nhwc(torch_act(
            F.batch_norm(to_nchw(v), rm.double(), rv.double(), ww, bb, training=False), act, SLOPE)),
        [x, w, b],
    )


@pytest.mark.parametrize("shape", [(1, 5, 3, 3), (3, 5, 7, 70)])
def test_eval_shapes_many_blocks(shape, small_blocks):
    C = shape[-1]
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    x, w, b = inputs(shape)
    check_against_torch(
        lambda v, ww, bb: bn.batch_norm_eval(v, ww, bb, rm, rv, act="relu"),
        lambda v, ww, bb: to_nhwc(F.relu(F.batch_norm(to_nchw(v), rm.double(), rv.double(), ww, bb))),
        [x, w, b],
    )


def test_eval_affine_free():
    rm, rv = torch.randn(10), torch.rand(10) + 0.5
    x = torch.randn(2, 3, 5, 10).requires_grad_()
    check_against_torch(
        lambda v: bn.batch_norm_eval(v, None, None, rm, rv),
        lambda v: to_nhwc(F.batch_norm(to_nchw(v), rm.double(), rv.double())),
        [x],
    )


# ----------------------------------------------------------------- affine_act
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_affine_act_every_activation(act):
    x = torch.randn(2, 7, 9, 17).requires_grad_()
    s = torch.randn(17).requires_grad_()
    t = torch.randn(17).requires_grad_()
    check_against_torch(
        lambda v, a, b: bn.affine_act(v, a, b, act, SLOPE), lambda v, a, b: torch_act(v * a + b, act, SLOPE), [x, s, t]
    )


@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 5, 3, 10), (1, 5, 7, 70), (37, 17)])
def test_affine_act_shapes_many_blocks(shape, tiny_blocks):
    C = shape[-1]
    x = torch.randn(*shape).requires_grad_()
    s = torch.randn(C).requires_grad_()
    t = torch.randn(C).requires_grad_()
    check_against_torch(lambda v, a, b: bn.affine_act(v, a, b, "silu"), lambda v, a, b: F.silu(v * a + b), [x, s, t])


def test_affine_act_gpu_tiles(gpu_tiles):
    x = torch.randn(2, 7, 9, 70).requires_grad_()  # M=126, BLOCK_M=32 -> 4 tiles, N_ITER=2
    s = torch.randn(70).requires_grad_()
    t = torch.randn(70).requires_grad_()
    check_against_torch(lambda v, a, b: bn.affine_act(v, a, b, "gelu"), lambda v, a, b: F.gelu(v * a + b), [x, s, t])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_affine_act_half(dtype):
    x = torch.randn(2, 7, 9, 10).to(dtype).requires_grad_()
    s = torch.randn(10).requires_grad_()
    t = torch.randn(10).requires_grad_()
    out = bn.affine_act(x, s, t, "relu")
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
    check_against_torch(lambda v, a, b: bn.affine_act(v, a, b, "tanh"), lambda v, a, b: torch.tanh(v * a + b), [x, s, t])


def test_affine_act_validation():
    x = torch.randn(2, 3, 3, 4)
    with pytest.raises(ValueError, match="shape \\[4\\]"):
        bn.affine_act(x, torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="float32"):
        bn.affine_act(x, torch.randn(4, dtype=torch.float16), torch.randn(4))

    x = torch.randn(2, 3, 3, 4)
    with recording() as specs:
        bn.affine_act(x, torch.randn(4), torch.randn(4), "relu")
    names = [sp.name for sp in specs]
    assert "_affine_act_fwd_kernel" in names
    spec = specs[names.index("_affine_act_fwd_kernel")]
    assert ("ACT", 1) in spec.constexprs



# --------------------------------------------------------------- torch ops
def test_no_torch_compute_ops_forward_backward():
    C = 10
    x = torch.randn(2, 7, 9, C, requires_grad=True)
    x2 = torch.randn(2, 7, 9, C, requires_grad=True)
    w = torch.rand(C, requires_grad=True)
    b = torch.randn(C, requires_grad=True)
    w2 = torch.rand(C, requires_grad=True)
    b2 = torch.randn(C, requires_grad=True)
    rm, rv, nbt = torch.zeros(C), torch.ones(C), torch.tensor(0)
    dy = torch.randn(2, 7, 9, C)
    rec = OpRecorder()
    with rec:
        y = bn.batch_norm_train(x, w, b, rm, rv, momentum=None, num_batches_tracked=nbt, act="gelu")
        y.backward(dy)
        y2 = bn.batch_norm_eval(x2, w2, b2, rm, rv, act="relu")
        y2.backward(dy)
    bad = rec.ops - ALLOWED_ATEN
    assert not bad, f"torch compute ops used: {sorted(bad)}"
    assert all(t.grad is not None for t in (x, w, b, x2, w2, b2))
    assert nbt.item() == 1


@pytest.mark.parametrize("momentum", [0.1, None])
def test_many_conv_partial_rows_fold_and_finalize_in_one_launch(momentum, monkeypatch):
    # a conv epilogue's per-tile sums: more rows than FOLD_ROWS are folded in parallel (T2 row programs per
    # channel block) and the last fold program of each channel block finalises it; num_batches_tracked
    # counts once per launch. Two launches: the ticket counters are back at 0 after each.
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    monkeypatch.setattr(common, "GPU_TARGET_PARTIALS", 5)  # 468 rows -> 5 folded rows of 94
    monkeypatch.setattr(bn_training, "FOLD_ROWS", 100)
    C = 150  # 3 channel blocks of 64
    rm, rv, nbt = torch.randn(C), torch.rand(C) + 0.5, torch.tensor(4, dtype=torch.int64)
    rm_ref, rv_ref, nbt_ref = rm.double(), rv.double(), 4
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    for step in range(2):
        x = torch.randn(4, 9, 13, C) * 1.5 + 0.5
        rows = x.reshape(-1, C)
        psum, psumsq = rows.contiguous(), (rows * rows).contiguous()  # one partial row per pixel: 468 rows
        with launch_log() as log:
            y, mean, rstd = bn.bn_train_forward(x, w, b, rm, rv, momentum=momentum, num_batches_tracked=nbt,
                                                act="relu", partials=(psum, psumsq))
        assert log == ["_bn_fold_finalize_kernel", "_bn_apply_kernel"]
        nbt_ref += 1
        m = momentum if momentum is not None else 1.0 / nbt_ref
        ref = F.batch_norm(to_nchw(x.double()), rm_ref, rv_ref, w.double(), b.double(), training=True, momentum=m)
        assert_close(y, to_nhwc(F.relu(ref)), what=f"step {step} y")
        assert nbt.item() == nbt_ref
        assert not reduction.ticket_counters(x.device, 8).any()
    assert_close(rm, rm_ref, what="running_mean")
    assert_close(rv, rv_ref, what="running_var")
    again = bn.bn_train_forward(x, w, b, None, None, partials=(psum, psumsq))
    assert torch.equal(again[1], bn.bn_train_forward(x, w, b, None, None, partials=(psum, psumsq))[1])


@pytest.mark.parametrize("momentum", [0.1, None])
def test_count_once_with_many_finalize_programs(momentum, gpu_tiles):
    # GPU tiles: C=70 is 3 finalize programs; num_batches_tracked += 1 by exactly one of them (the
    # cumulative average reads it in all three first), in the finalize launch itself
    C = 70
    rm, rv, nbt = torch.zeros(C), torch.ones(C), torch.tensor(0, dtype=torch.int64)
    rm_ref, rv_ref = rm.double(), rv.double()
    for step in range(2):
        x = torch.randn(2, 5, 3, C) + 0.25
        with launch_log() as log:
            bn.bn_train_forward(x, None, None, rm, rv, momentum=momentum, num_batches_tracked=nbt)
        assert log == ["_bn_stats_kernel", "_bn_finalize_kernel", "_bn_apply_kernel"]
        F.batch_norm(to_nchw(x.double()), rm_ref, rv_ref, training=True,
                     momentum=momentum if momentum is not None else 1.0 / (step + 1))
        assert nbt.item() == step + 1
    assert_close(rm, rm_ref)
    assert_close(rv, rv_ref)


@pytest.mark.parametrize("fold_rows", [512, 3])
def test_backward_sums_in_the_reduce_launch(fold_rows, gpu_tiles, monkeypatch):
    # GPU tiles, 2 row tiles per program: C=300 is 3 channel blocks of 128, M=945 rows 15 row programs
    # racing for each block's ticket; the last sums the block's partial rows (no second launch). Partials
    # taller than FOLD_ROWS take reduction.sum_partials instead.
    monkeypatch.setattr(bn_backward, "FOLD_ROWS", fold_rows)
    monkeypatch.setattr(common, "GPU_TARGET_PARTIALS", 16)
    x, w, b = inputs((3, 7, 45, 300))
    dy = torch.randn(3, 7, 45, 300)
    grads = []
    for _ in range(2):
        xx, ww, bb = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = bn.batch_norm_train(xx, ww, bb, None, None, act="leaky_relu", slope=SLOPE)
        with launch_log() as log:
            y.backward(dy)
        grads.append((xx.grad, ww.grad, bb.grad))
    tail = ["_bn_bwd_reduce_kernel", "_bn_bwd_apply_kernel"]
    assert log == (tail if fold_rows == 512 else ["_bn_bwd_reduce_kernel", "_sum_partials_kernel",
                                                  "_bn_bwd_apply_kernel"])
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref_train("leaky_relu")(xr, wr, br).backward(dy.double())
    for ours, ref, what in zip(grads[0], (xr.grad, wr.grad, br.grad), ("dx", "dweight", "dbias")):
        assert_close(ours, ref, what=what)
    assert not reduction.ticket_counters(x.device, 8).any()
