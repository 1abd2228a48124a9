"""Tests for engine/kernels/conv/ (forward, backward, the autograd Function) against torch.nn.functional.conv2d (fp64).

Ours work on NHWC; the wrappers take NCHW inputs (what the fp64 reference sees)
and permute around our kernels, so gradients flow through plain copies.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import (ACTIVATIONS, DATA_MOVEMENT_OPS, SHAPE_OPS, OpRecorder, assert_close,
                     check_against_torch, torch_act)

import engine.device
import engine.kernels.conv.geometry as conv_geometry
from engine.kernels.conv import ConvOutput, conv2d, conv2d_dgrad, conv2d_forward, conv2d_wgrad
from engine.kernels.launch import recording

SLOPE = 0.1  # leaky_relu's, in these tests


def nhwc(t):
    return t.permute(0, 2, 3, 1).contiguous()


def nchw(t):
    return t.permute(0, 3, 1, 2)


def ours_fn(**kw):
    """conv2d (autograd Function) on NCHW inputs via permutes: (x, w[, bias[, residual]]) -> NCHW."""
    def f(x, w, b=None, res=None):
        return nchw(conv2d(nhwc(x), w, b, residual=None if res is None else nhwc(res), **kw))
    return f


def ref_fn(stride=1, padding=0, dilation=1, groups=1, act="none", scale=None, shift=None, **_):
    def f(x, w, b=None, res=None):
        z = F.conv2d(x, w, b, stride, padding, dilation, groups)
        if scale is not None:
            z = z * scale.double().view(1, -1, 1, 1)
        if shift is not None:
            z = z + shift.double().view(1, -1, 1, 1)
        if res is not None:
            z = z + res
        return torch_act(z, act, SLOPE)
    return f


def rand_inputs(N, Cin, H, W, Cout, k, groups=1, bias=True):
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(N, Cin, H, W, requires_grad=True)
    w = (torch.randn(Cout, Cin // groups, kh, kw) / (Cin // groups * kh * kw) ** 0.5).requires_grad_()
    b = torch.randn(Cout, requires_grad=True) if bias else None
    return x, w, b


# (N, Cin, H, W, Cout, kernel, conv kwargs)
GEOMETRIES = {
    "1x1": (2, 8, 5, 6, 24, 1, {}),
    "3x3_odd_hw_cout10": (2, 3, 7, 9, 10, 3, dict(padding=1)),
    "5x5": (1, 4, 8, 7, 16, 5, dict(padding=2)),
    "1x7": (2, 6, 7, 9, 10, (1, 7), dict(padding=(0, 3))),
    "stem_2x2_s2_cin3": (2, 3, 8, 10, 16, 2, dict(stride=2)),
    "3x3_s2": (2, 8, 9, 7, 24, 3, dict(stride=2, padding=1)),
    "1x1_s2": (2, 8, 7, 7, 16, 1, dict(stride=2)),
    "3x3_s3": (2, 5, 10, 11, 12, 3, dict(stride=3, padding=1)),
    "5x5_s3_pad2": (1, 4, 11, 9, 8, 5, dict(stride=3, padding=2)),
    "dilation2": (2, 6, 9, 9, 10, 3, dict(padding=2, dilation=2)),
    "s2_dilation2": (2, 4, 9, 10, 8, 3, dict(stride=2, padding=2, dilation=2)),
    "groups2": (2, 8, 7, 9, 24, 3, dict(padding=1, groups=2)),
    "depthwise": (2, 16, 7, 9, 16, 3, dict(padding=1, groups=16)),
    "depthwise_mult2_s2": (1, 6, 9, 8, 12, 3, dict(stride=2, padding=1, groups=6)),
    "cin1": (2, 1, 9, 9, 10, 3, dict(padding=1)),
    "batch1": (1, 8, 6, 5, 16, 3, dict(padding=1)),
    "big_batch_multi_tile": (6, 8, 16, 16, 24, 1, {}),  # M = 1536 > the 1024-row interpreter tile
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_forward_backward(name):
    N, Cin, H, W, Cout, k, kw = GEOMETRIES[name]
    x, w, b = rand_inputs(N, Cin, H, W, Cout, k, kw.get("groups", 1))
    check_against_torch(ours_fn(**kw), ref_fn(**kw), [x, w, b])


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_act_fused_into_backward(act):
    # no residual: act_grad is applied while dgrad/wgrad load dy
    kw = dict(padding=1, act=act, slope=SLOPE)
    x, w, b = rand_inputs(2, 6, 7, 5, 10, 3)
    check_against_torch(ours_fn(**kw), ref_fn(**kw), [x, w, b])


@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_residual_gradients(act):
    # with a residual needing grad, dz is materialised once (it is the residual's gradient)
    kw = dict(stride=2, padding=1, act=act)
    x, w, b = rand_inputs(2, 6, 9, 7, 10, 3)
    res = torch.randn(2, 10, 5, 4, requires_grad=True)
    check_against_torch(ours_fn(**kw), ref_fn(**kw), [x, w, b, res])


def test_residual_without_grad_keeps_fused_act():
    kw = dict(padding=1, act="silu")
    x, w, b = rand_inputs(2, 6, 7, 5, 10, 3)
    res = torch.randn(2, 10, 7, 5)
    check_against_torch(ours_fn(**kw), ref_fn(**kw), [x, w, b, res])


@pytest.mark.parametrize("groups", [1, 8])
def test_scale_shift_constants_in_function(groups):
    # folded BN: z = (conv + b) * scale + shift; scale/shift get no grad but scale the others'
    scale, shift = torch.rand(16) + 0.5, torch.randn(16)
    kw = dict(padding=1, groups=groups, act="relu", scale=scale, shift=shift)
    x, w, b = rand_inputs(2, 8, 6, 7, 16, 3, groups)

    def ref(x, w, b):
        return ref_fn(padding=1, groups=groups, act="relu", scale=scale, shift=shift)(x, w, b)

    check_against_torch(ours_fn(**kw), ref, [x, w, b])


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("depthwise", [False, True])
def test_forward_epilogue_all_flags(act, depthwise):
    C, groups = (12, 12) if depthwise else (10, 1)
    Cin = 12 if depthwise else 5
    x, w, b = rand_inputs(2, Cin, 7, 9, C, 3, groups)
    scale, shift = torch.rand(C) + 0.5, torch.randn(C)
    res = torch.randn(2, C, 7, 9)
    kw = dict(padding=1, groups=groups)

    def ours(x, w, b, res):
        o = conv2d_forward(nhwc(x), w, b, **kw, scale=scale, shift=shift, residual=nhwc(res), act=act,
                           slope=SLOPE, save_pre=True)
        assert isinstance(o, ConvOutput) and o.psum is None
        return nchw(o.y), nchw(o.z)

    def ref(x, w, b, res):
        z = ref_fn(**kw, scale=scale, shift=shift)(x, w, b, res)
        return torch_act(z, act, SLOPE), z

    check_against_torch(ours, ref, [x.detach(), w.detach(), b.detach(), res], grad=False)


@pytest.mark.parametrize("depthwise", [False, True])
def test_stats_partial_sums(depthwise, monkeypatch):
    # several M tiles, so the partials really are partial: cap BLOCK_M at 256
    big_tiles = conv_geometry.gemm_tiles
    monkeypatch.setattr(conv_geometry, "gemm_tiles",
                        lambda M, N, C, taps: replace(big_tiles(M, N, C, taps), block_m=min(256, M)))
    C, Cin, groups = (16, 16, 16) if depthwise else (10, 3, 1)
    x, w, b = rand_inputs(6, Cin, 15, 13, C, 3, groups)  # M = 1170 > one tile
    o = conv2d_forward(nhwc(x.detach()), w.detach(), b.detach(), padding=1, groups=groups, act="relu", stats=True)
    z = F.conv2d(x.double(), w.double(), b.double(), padding=1, groups=groups)
    assert o.psum.dtype == torch.float32 and o.psum.shape[1] == C and o.psum.shape[0] >= 2
    assert o.psum.shape == o.psumsq.shape
    assert_close(o.psum.sum(0), z.sum((0, 2, 3)), what="sum")
    assert_close(o.psumsq.sum(0), (z * z).sum((0, 2, 3)), what="sum of squares")


def test_out_channel_slice_view():
    x, w, b = rand_inputs(2, 5, 7, 9, 10, 3)
    buf = torch.full((2, 4, 5, 32), -7.0)  # concat buffer; we fill channels 16:26
    view = buf[..., 16:26]
    o = conv2d_forward(nhwc(x.detach()), w.detach(), b.detach(), stride=2, padding=1, act="tanh", out=view)
    assert o.y.data_ptr() == view.data_ptr()
    expected = torch.tanh(F.conv2d(x.double(), w.double(), b.double(), stride=2, padding=1))
    assert_close(nchw(buf[..., 16:26]), expected, what="slice")
    assert (buf[..., :16] == -7).all() and (buf[..., 26:] == -7).all()


def test_out_and_residual_strided():
    x, w, b = rand_inputs(1, 4, 6, 6, 8, 1)
    res_buf = torch.randn(1, 6, 6, 20)
    res = res_buf[..., 4:12]  # residual is a channel slice too
    out = torch.zeros(1, 6, 6, 24)[..., 8:16]
    conv2d_forward(nhwc(x.detach()), w.detach(), b.detach(), residual=res, out=out)
    expected = F.conv2d(x.double(), w.double(), b.double()) + nchw(res).double()
    assert_close(nchw(out), expected, what="out")


@pytest.mark.parametrize("x_shape,w_shape,dy_shape,groups,stride,splits", [
    ((4, 15, 13, 8), (12, 8, 3, 3), (4, 8, 7, 12), 1, 2, 3),
    ((3, 9, 10, 6), (12, 1, 3, 3), (3, 9, 10, 12), 6, 1, 4),  # depthwise
], ids=["dense", "depthwise"])
def test_wgrad_split_k_deterministic(x_shape, w_shape, dy_shape, groups, stride, splits):
    x, dy = torch.randn(*x_shape), torch.randn(*dy_shape)
    kw = dict(stride=stride, padding=1, dilation=1, groups=groups)
    a = conv2d_wgrad(x, dy, w_shape, need_bias=True, splits=splits, **kw)
    b = conv2d_wgrad(x, dy, w_shape, need_bias=True, splits=splits, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    wd = torch.zeros(w_shape, dtype=torch.float64, requires_grad=True)
    F.conv2d(x.double().permute(0, 3, 1, 2), wd, None, **kw).backward(dy.double().permute(0, 3, 1, 2))
    assert_close(a[0], wd.grad, what=f"dw split {splits}")
    assert_close(a[1], dy.double().sum((0, 1, 2)), what="db")
    one = conv2d_wgrad(x, dy, w_shape, splits=1, **kw)
    assert one[1] is None
    assert_close(one[0], wd.grad, what="dw split 1")


def test_wgrad_tail_sums_like_the_second_launch(monkeypatch):
    # GPU tiles, forced 16x16: 9 taps x 2 channel chunks x 3 Cout tiles = 54 output tiles, 5 splits racing
    # for each tile's ticket; the last sums the tile's partials in split order into PyTorch's layout (and
    # the bias). Same order as _sum_to_torch_kernel: bit-identical to it; twice: the counters reset.
    from engine.kernels import autotune, reduction
    from engine.kernels.conv import wgrad as conv_wgrad
    from engine.kernels.launch import launch_log
    from engine.kernels.tune_config import Config

    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    x, dy = torch.randn(2, 11, 9, 20), torch.randn(2, 11, 9, 40)
    w_shape, kw = (40, 20, 3, 3), dict(stride=1, padding=1, dilation=1, groups=1)
    runs = []
    for tail_bytes in (conv_wgrad.WGRAD_TAIL_BYTES, conv_wgrad.WGRAD_TAIL_BYTES, 0):
        monkeypatch.setattr(conv_wgrad, "WGRAD_TAIL_BYTES", tail_bytes)
        with autotune.forced(Config(16, 16, 16), kernels=["conv2d_wgrad"]), launch_log() as log:
            runs.append(conv2d_wgrad(x, dy, w_shape, need_bias=True, splits=5, **kw))
        assert log == (["_conv_wgrad_kernel"] if tail_bytes else
                       ["_conv_wgrad_kernel", "_sum_to_torch_kernel", "_sum_partials_kernel"])
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])
    ref = torch.nn.grad.conv2d_weight(x.double().permute(0, 3, 1, 2), w_shape, dy.double().permute(0, 3, 1, 2),
                                      padding=1)
    assert_close(runs[0][0], ref, what="dw")
    assert_close(runs[0][1], dy.double().sum((0, 1, 2)), what="db")
    assert not reduction.ticket_counters(x.device, 64).any()


def test_dgrad_direct_stride_phases():
    # 1x1 stride 2: three of four phases get no tap, so dx must be exactly 0 there
    dy = torch.randn(2, 4, 4, 6)
    w = torch.randn(6, 5, 1, 1)
    dx = conv2d_dgrad(dy, w, (2, 8, 7, 5), stride=2, padding=0, dilation=1, groups=1)
    assert (dx[:, 1::2] == 0).all() and (dx[:, :, 1::2] == 0).all()
    xd = torch.zeros(2, 5, 8, 7, dtype=torch.float64, requires_grad=True)
    F.conv2d(xd, w.double(), stride=2).backward(dy.double().permute(0, 3, 1, 2))
    assert_close(nchw(dx), xd.grad, what="dx")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_backward(dtype):
    kw = dict(stride=2, padding=1, act="relu")
    x, w, b = rand_inputs(2, 8, 9, 7, 16, 3)
    xl = x.detach().to(dtype).requires_grad_()

    def ours(x, w, b):
        return ours_fn(**kw)(x, w, b).float()

    def ref(x, w, b):
        # reference on the same rounded input, in fp64
        return ref_fn(**kw)(x, w, b)

    check_against_torch(ours, ref, [xl, w, b], tol=dtype)


def test_allow_tf32_runs():
    x, w, b = rand_inputs(2, 8, 6, 6, 16, 3)
    kw = dict(padding=1, allow_tf32=True)
    check_against_torch(ours_fn(**kw), ref_fn(padding=1), [x, w, b], tol="tf32")


@pytest.mark.parametrize("name", ["3x3_s2", "depthwise_mult2_s2", "groups2"])
def test_gpu_tile_config_under_interpreter(name, monkeypatch):
    # the GPU tiles (small blocks, split-K wgrad) must be correct too
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    N, Cin, H, W, Cout, k, kw = GEOMETRIES[name]
    x, w, b = rand_inputs(N, Cin, H, W, Cout, k, kw.get("groups", 1))
    check_against_torch(ours_fn(**kw, act="relu"), ref_fn(**kw, act="relu"), [x, w, b])


ALLOWED_ATEN = DATA_MOVEMENT_OPS | SHAPE_OPS | {
    # interpreter / bookkeeping that computes nothing on tensor values
    "_has_compatible_shallow_copy_type", "_local_scalar_dense", "_reshape_alias", "data_ptr",
    "is_nonzero", "is_pinned", "is_same_size", "result_type", "to", "transpose",
}


@pytest.mark.parametrize("groups,act,residual", [(1, "gelu", True), (1, "relu", False), (8, "silu", True)])
def test_only_allocation_view_copy_aten_ops(groups, act, residual):
    # forward + backward of the Function: nothing but allocation / view / copy aten ops
    x = torch.randn(2, 7, 9, 8, requires_grad=True)  # NHWC
    w = torch.randn(16, 8 // groups, 3, 3, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    res = torch.randn(2, 4, 5, 16, requires_grad=True) if residual else None
    dy = torch.randn(2, 4, 5, 16)
    rec = OpRecorder()
    with rec:
        conv2d(x, w, b, residual=res, stride=2, padding=1, groups=groups, act=act).backward(dy)
    assert x.grad is not None and w.grad is not None and b.grad is not None
    assert res is None or res.grad is not None
    bad = rec.ops - ALLOWED_ATEN
    assert not bad, f"torch compute ops in conv forward/backward: {sorted(bad)} (all: {sorted(rec.ops)})"


def test_launches_are_recorded():
    x, w, b = rand_inputs(1, 4, 6, 6, 8, 3)
    with recording() as specs:
        y = conv2d(nhwc(x), w, b, stride=2, padding=1, act="relu")
        y.backward(torch.ones_like(y))
    names = {s.name for s in specs}
    assert {"_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel"} <= names
    # a one-split wgrad writes dw and dbias itself: no partials to sum
    assert "_sum_partials_kernel" not in names


def test_errors():
    x = torch.randn(1, 6, 6, 4)
    w = torch.randn(8, 4, 3, 3)
    with pytest.raises(ValueError, match="contiguous NHWC"):
        conv2d_forward(x.permute(0, 2, 1, 3), w)
    with pytest.raises(ValueError, match="groups"):
        conv2d_forward(x, torch.randn(8, 3, 3, 3))
    with pytest.raises(ValueError, match="groups"):
        conv2d_forward(x, torch.randn(6, 2, 3, 3), groups=2 * 2)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        conv2d_forward(x.double(), w)
    with pytest.raises(ValueError, match="output would be"):
        conv2d_forward(x, torch.randn(8, 4, 7, 7))
    with pytest.raises(ValueError, match="bias"):
        conv2d_forward(x, w, torch.randn(7))
    with pytest.raises(ValueError, match="residual"):
        conv2d_forward(x, w, residual=torch.randn(1, 6, 6, 8))
    with pytest.raises(ValueError, match="out"):
        conv2d_forward(x, w, out=torch.randn(1, 4, 4, 9))
    with pytest.raises(ValueError, match="activation"):
        conv2d_forward(x, w, act="swish")
    with pytest.raises(ValueError, match="stride"):
        conv2d_forward(x, w, stride=0)
    with pytest.raises(ValueError, match="dy has shape"):
        conv2d_dgrad(torch.randn(1, 5, 4, 8), w, x.shape, stride=1, padding=0, dilation=1, groups=1)
    with pytest.raises(ValueError, match="pre-activation"):
        conv2d_wgrad(x, torch.randn(1, 4, 4, 8), w.shape, stride=1, padding=0, dilation=1, groups=1, act="relu")


@pytest.mark.parametrize("groups,act", [(1, "relu"), (1, "none"), (8, "gelu")])
def test_dropout_epilogue_matches_torch_with_the_same_mask(groups, act):
    from engine.kernels.dropout import dropout_forward

    p, seed = 0.3, 1234
    x, w, b = rand_inputs(2, 8, 7, 9, 8 if groups > 1 else 10, 3, groups)
    Cout = w.shape[0]
    # the mask the epilogue uses, read off the dropout kernel: dropout(ones) = mask / (1 - p)
    keep = nchw(dropout_forward(torch.ones(2, 7, 9, Cout), p, seed)).double()
    kw = dict(padding=1, groups=groups, act=act)

    def ours(x, w, b):
        return nchw(conv2d(nhwc(x), w, b, dropout_p=p, dropout_seed=seed, **kw))

    def ref(x, w, b):
        return ref_fn(**kw)(x, w, b) * keep

    check_against_torch(ours, ref, [x, w, b])
    assert 0.15 < float((keep == 0).double().mean()) < 0.45, "the mask should drop about p of the outputs"


def test_conv_writes_into_a_concat_buffer_with_gradients():
    # two convs write their outputs into channel slices of one buffer, in place;
    # gradients flow back through the buffer to both
    x1, w1, b1 = rand_inputs(2, 3, 7, 9, 10, 3)
    x2, w2, b2 = rand_inputs(2, 5, 7, 9, 6, 1)

    def ours(x1, w1, b1, x2, w2, b2):
        buf = torch.empty(2, 7, 9, 16)
        a = conv2d(nhwc(x1), w1, b1, padding=1, act="relu", out=buf[..., :10])
        c = conv2d(nhwc(x2), w2, b2, act="tanh", out=buf[..., 10:])
        assert a.data_ptr() == buf.data_ptr() and c.data_ptr() == buf[..., 10:].data_ptr()
        return nchw(buf)

    def ref(x1, w1, b1, x2, w2, b2):
        return torch.cat([torch.relu(F.conv2d(x1, w1, b1, padding=1)), torch.tanh(F.conv2d(x2, w2, b2))], 1)

    check_against_torch(ours, ref, [x1, w1, b1, x2, w2, b2])
