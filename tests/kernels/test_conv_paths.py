"""The conv kernels' alternative paths, each forced and checked against PyTorch (fp64):
padded input channels (the RGB stem), several taps per channel chunk, 64-bit
offsets (results identical to 32-bit), weight tiles through TMA descriptors,
the wgrad's pixel boxes and flat pixel chunks, and one dgrad launch for all
stride phases. Interpreted, GPU tiles where the path needs them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import engine.device
import engine.kernels.conv.dgrad as conv_dgrad_mod
import engine.kernels.conv.forward as conv_forward_mod
import engine.kernels.conv.geometry as conv_geometry
import engine.kernels.conv.wgrad as conv_wgrad_mod
import engine.kernels.conv.weights as conv_weights
from engine.kernels import autotune
from engine.kernels.conv import conv2d, conv2d_dgrad, conv2d_forward, conv2d_wgrad
from engine.kernels.launch import launch_log, recording
from engine.kernels.layout import pad_channels
from engine.kernels.tune_config import Config


def nhwc(t):
    return t.permute(0, 2, 3, 1).contiguous()


def nchw(t):
    return t.permute(0, 3, 1, 2)


def _ref_all(x, w, dy, **kw):
    """(y, dx, dw) of F.conv2d in fp64 on NHWC x/dy."""
    xd = nchw(x).double().requires_grad_()
    wd = w.double().requires_grad_()
    y = F.conv2d(xd, wd, **kw)
    y.backward(nchw(dy).double())
    return nhwc(y.detach()), nhwc(xd.grad), wd.grad


def _ours_all(x, w, dy, **kw):
    geo = dict(stride=kw.get("stride", 1), padding=kw.get("padding", 0), dilation=kw.get("dilation", 1),
               groups=kw.get("groups", 1))
    y = conv2d_forward(x, w, **geo).y
    dx = conv2d_dgrad(dy, w, x.shape, **geo)
    dw, _ = conv2d_wgrad(x, dy, w.shape, **geo)
    return y, dx, dw


def _check(x, w, dy, what, **kw):
    for got, ref, name in zip(_ours_all(x, w, dy, **kw), _ref_all(x, w, dy, **kw), ("y", "dx", "dw")):
        assert_close(got, ref, what=f"{what}: {name}")


def test_rgb_stem_is_padded_and_nobody_sees_it():
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    w = (torch.randn(16, 3, 2, 2) / 3).requires_grad_()
    with recording() as specs:
        y = conv2d(nhwc(x), w, None)
        y.backward(torch.ones_like(y))
    assert "_pad_channels_kernel" in {s.name for s in specs}
    assert y.shape == (2, 8, 7, 16) and x.grad.shape == x.shape and w.grad.shape == w.shape
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    F.conv2d(xd, wd).backward(torch.ones(2, 16, 8, 7, dtype=torch.float64))
    assert_close(w.grad, wd.grad, what="dw")
    assert_close(x.grad, xd.grad, what="dx")


def test_channels_argument_takes_a_padded_input():
    x = torch.randn(2, 7, 6, 3)
    w = torch.randn(8, 3, 3, 3)
    dy = torch.randn(2, 7, 6, 8)
    geo = dict(stride=1, padding=1, dilation=1, groups=1)
    xp = pad_channels(x, 8)
    assert xp.shape == (2, 7, 6, 8) and torch.equal(xp[..., :3], x) and not xp[..., 3:].any()
    y = conv2d_forward(xp, w, padding=1, channels=3).y
    dw, _ = conv2d_wgrad(xp, dy, w.shape, channels=3, **geo)
    assert dw.shape == w.shape
    y_ref, _, dw_ref = _ref_all(x, w, dy, padding=1)
    assert_close(y, y_ref, what="y")
    assert_close(dw, dw_ref, what="dw")
    for bad in (0, 9, 3.0):
        with pytest.raises(ValueError, match="channels"):
            conv2d_forward(xp, w, padding=1, channels=bad)
    with pytest.raises(ValueError, match="groups=1"):
        conv2d_forward(xp, torch.randn(8, 1, 3, 3), padding=1, channels=3, groups=3)


@pytest.mark.parametrize("k,block_k,dtype,pad", [(3, 64, torch.float32, 0), (2, 32, torch.float32, 0),
                                                 (3, 16, torch.float32, 0), (3, 64, torch.bfloat16, 0),
                                                 (3, 64, torch.float32, 1), (2, 32, torch.bfloat16, 1)])
def test_stem_taps_per_chunk(k, block_k, dtype, pad):
    # 3 channels stored as 16 bytes (4 fp32, 8 bf16): a chunk of block_k lanes holds whole taps;
    # unpadded, every tap of a real pixel is real (IN_BOUNDS: the mask is the row's); 144 or more
    # output pixels, so the last 32-row tile is partial
    ho, wo = 9 - k + 1 + 2 * pad, 10 - k + 1 + 2 * pad
    x, dy = torch.randn(2, 9, 10, 3, dtype=dtype), torch.randn(2, ho, wo, 24)
    w = torch.randn(24, 3, k, k) / 3
    with autotune.forced(Config(32, 32, block_k), kernels=["conv2d_fwd"]), recording() as specs:
        y = conv2d_forward(x, w, padding=pad).y
    (fwd,) = [s for s in specs if s.name == "_conv_fwd_kernel"]
    assert dict(fwd.constexprs)["TPC"] == block_k // (16 // x.element_size())
    assert dict(fwd.constexprs)["IN_BOUNDS"] == (pad == 0)
    ref = _ref_all(x.float(), w.to(dtype).float(), dy, padding=pad)[0]
    assert_close(y.float(), ref, tol=dtype, what=f"stem {k}x{k} chunks of {block_k}")


@pytest.mark.parametrize("stride", [1, 2])
def test_64_bit_offsets_give_identical_results(stride, monkeypatch):
    # the interpreter always takes 64-bit offsets (idx64); force 32-bit, then 64-bit, compare bits
    x, w = torch.randn(3, 9, 11, 16), torch.randn(24, 16, 3, 3) / 12
    dy = torch.randn(3, (9 + 2 - 3) // stride + 1, (11 + 2 - 3) // stride + 1, 24)
    kw = dict(stride=stride, padding=1)
    outs = []
    for big in (False, True):
        for mod in (conv_forward_mod, conv_dgrad_mod, conv_wgrad_mod):
            monkeypatch.setattr(mod, "idx64", lambda *t, big=big: big)
        with recording() as specs:
            outs.append(_ours_all(x, w, dy, **kw))
        assert all(dict(s.constexprs)["IDX64"] == big for s in specs if s.name.startswith("_conv_"))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    _check(x, w, dy, "idx64", **kw)


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 2)])
def test_weights_through_tma_descriptors(stride, groups, monkeypatch):
    monkeypatch.setattr(conv_weights, "TMA_MIN_N", 16)
    x, w = torch.randn(2, 9, 8, 16), torch.randn(32, 16 // groups, 3, 3) / 8
    dy = torch.randn(2, (9 + 2 - 3) // stride + 1, (8 + 2 - 3) // stride + 1, 32)
    kw = dict(stride=stride, padding=1, groups=groups)
    with recording() as specs:
        _check(x, w, dy, "tma", **kw)
    tma = {s.name for s in specs if dict(s.constexprs).get("W_TMA")}
    assert tma == {"_conv_fwd_kernel", "_conv_dgrad_kernel"}
    assert any(t.startswith("tensordesc") for s in specs for _, t in s.signature)


@pytest.mark.parametrize("box", [True, False], ids=["boxes", "flat"])
@pytest.mark.parametrize("shape,stride", [((3, 7, 9, 16), 1), ((2, 9, 10, 8), 2)])
def test_wgrad_pixel_boxes_and_flat_chunks(box, shape, stride, monkeypatch):
    # GPU tiles: small pixel chunks, several splits and trips per split
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    monkeypatch.setattr(conv_geometry, "WGRAD_BOX_MIN", 0.0 if box else 2.0)
    monkeypatch.setattr(conv_geometry, "WGRAD_BOX_MIN_NARROW", 0.0 if box else 2.0)
    x = torch.randn(*shape)
    Ho, Wo = (shape[1] + 2 - 3) // stride + 1, (shape[2] + 2 - 3) // stride + 1
    dy = torch.randn(shape[0], Ho, Wo, 24)
    geo = dict(stride=stride, padding=1, dilation=1, groups=1)
    with autotune.forced(Config(16, 32, 16, split=3)), recording() as specs:
        dw, db = conv2d_wgrad(x, dy, (24, shape[3], 3, 3), need_bias=True, **geo)
    (k,) = [s for s in specs if s.name == "_conv_wgrad_kernel"]
    assert (dict(k.constexprs)["TH"] > 0) == box
    _, _, ref = _ref_all(x, torch.randn(24, shape[3], 3, 3), dy, stride=stride, padding=1)
    assert_close(dw, ref, what="dw")
    assert_close(db, dy.double().sum((0, 1, 2)), what="db")


@pytest.mark.parametrize("stride", [2, 3, (2, 1)])
def test_dgrad_is_one_launch_for_every_stride_phase(stride):
    x, w = torch.randn(2, 10, 9, 8), torch.randn(12, 8, 3, 3) / 8
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    dy = torch.randn(2, (10 + 2 - 3) // sh + 1, (9 + 2 - 3) // sw + 1, 12)
    with launch_log() as log:
        dx = conv2d_dgrad(dy, w, x.shape, stride=stride, padding=1, dilation=1, groups=1)
    assert log.count("_conv_dgrad_kernel") == 1
    assert_close(dx, _ref_all(x, w, dy, stride=stride, padding=1)[1], what=f"dx stride {stride}")


@pytest.mark.parametrize("shape,block_p,full", [
    ((3, 7, 9, 16), 128, (True, True, True)),  # one box per image: every mask loop-invariant
    ((3, 7, 9, 16), 256, (True, True, False)),  # two images a box, 3 images: the last box half real
    ((2, 6, 20, 8), 16, (False, False, True)),  # boxes narrower than a row: stepped along it
])
def test_wgrad_box_masks_hoisted_when_a_box_spans_an_axis(shape, block_p, full, monkeypatch):
    # GPU tiles, boxes forced: FULL_W / FULL_H / EVEN_B drop the checks a box's position cannot fail
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    monkeypatch.setattr(conv_geometry, "WGRAD_BOX_MIN", 0.0)
    monkeypatch.setattr(conv_geometry, "WGRAD_BOX_MIN_NARROW", 0.0)
    x = torch.randn(*shape)
    dy = torch.randn(shape[0], shape[1], shape[2], 24)  # 3x3, stride 1, padding 1: same size
    geo = dict(stride=1, padding=1, dilation=1, groups=1)
    with autotune.forced(Config(16, 32, block_p, split=2)), recording() as specs:
        dw, db = conv2d_wgrad(x, dy, (24, shape[3], 3, 3), need_bias=True, **geo)
    (k,) = [dict(s.constexprs) for s in specs if s.name == "_conv_wgrad_kernel"]
    assert (k["FULL_W"], k["FULL_H"], k["EVEN_B"]) == full and k["TH"] > 0
    _, _, ref = _ref_all(x, torch.randn(24, shape[3], 3, 3), dy, stride=1, padding=1)
    assert_close(dw, ref, what="dw")
    assert_close(db, dy.double().sum((0, 1, 2)), what="db")


@pytest.mark.parametrize("tile", [(128, 64, 4), (64, 64, 4)])
def test_conv_128_channel_chunks(tile):
    # the GPU heuristic's 128-channel chunks of 64-wide tiles (tune_config.WIDE_CHUNK_TILES): one
    # chunk per tap (128 channels) and two (256), odd pixel counts, forward and dgrad
    bm, bn, warps = tile
    for cin, cout in ((128, 256), (256, 128)):
        x, w = torch.randn(1, 5, 3, cin), torch.randn(cout, cin, 3, 3) / 24
        dy = torch.randn(1, 5, 3, cout)
        with autotune.forced(Config(bm, bn, 128, num_warps=warps, num_stages=3),
                             kernels=["conv2d_fwd", "conv2d_dgrad"]), recording() as specs:
            y = conv2d_forward(x, w, padding=1).y
            dx = conv2d_dgrad(dy, w, x.shape, stride=1, padding=1, dilation=1, groups=1)
        assert {dict(s.constexprs)["BLOCK_K"] for s in specs if s.name in ("_conv_fwd_kernel",
                                                                         "_conv_dgrad_kernel")} == {128}
        ref_y, ref_dx, _ = _ref_all(x, w, dy, padding=1)
        assert_close(y, ref_y, what=f"y {cin}->{cout}")
        assert_close(dx, ref_dx, what=f"dx {cin}->{cout}")
