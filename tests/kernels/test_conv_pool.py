"""Tests for the conv with a fused K x K / stride K max pool (engine/kernels/conv, pool=K) against
torch.nn.functional.conv2d + max_pool2d (fp64): the pooled output, its one-byte argmax, the
batch statistics of the pooled output, and dx / dw / db through the pool (dgrad and wgrad
expand the pooled gradient in their loads) on awkward shapes: odd H/W (a floor-mode pool
drops the last row/column), channels off 16, batch 1-3, strided convs, GPU tiles.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, check_against_torch

import engine.device
import engine.kernels.conv.function as conv_function
import engine.kernels.conv.geometry as conv_geometry
from engine.kernels.conv import conv2d, conv2d_dgrad, conv2d_forward, conv2d_wgrad
from engine.kernels.launch import recording


def nhwc(t):
    return t.permute(0, 2, 3, 1).contiguous()


def nchw(t):
    return t.permute(0, 3, 1, 2)


def rand_inputs(N, Cin, H, W, Cout, k, bias=True, dtype=torch.float32):
    x = torch.randn(N, Cin, H, W).to(dtype).requires_grad_()
    w = (torch.randn(Cout, Cin, k, k) / (Cin * k * k) ** 0.5).requires_grad_()
    b = torch.randn(Cout, requires_grad=True) if bias else None
    return x, w, b


# (N, Cin, H, W, Cout, kernel, conv kwargs, pool)
CASES = {
    "odd_hw_bias": (3, 5, 11, 9, 10, 3, dict(padding=1), 2),  # 11x9 -> 5x4: a row and a column dropped
    "batch1_stride2": (1, 16, 13, 10, 24, 3, dict(stride=2, padding=1), 2),  # dgrad's 4 stride phases
    "pool4_no_pad": (2, 8, 10, 11, 6, 2, dict(), 4),  # 9x10 -> 2x2
}


def ours_fn(pool, **kw):
    def f(x, w, b=None):
        return nchw(conv2d(nhwc(x), w, b, pool=pool, **kw))
    return f


def ref_fn(pool, stride=1, padding=0, **_):
    def f(x, w, b=None):
        return F.max_pool2d(F.conv2d(x, w, b, stride, padding), pool)
    return f


@pytest.fixture
def operand_expansion(monkeypatch):
    """The backward that expands the pooled gradient inside the dgrad/wgrad loads."""
    monkeypatch.setattr(conv_function, "POOL_GRAD", "operand")


@pytest.mark.parametrize("pool_grad", ["kernel", "operand"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_vs_torch(name, pool_grad, monkeypatch):
    monkeypatch.setattr(conv_function, "POOL_GRAD", pool_grad)
    N, Cin, H, W, Cout, k, kw, pool = CASES[name]
    x, w, b = rand_inputs(N, Cin, H, W, Cout, k, bias=name != "batch1_stride2")
    inputs = [x, w] + ([b] if b is not None else [])
    with recording() as rec:
        check_against_torch(ours_fn(pool, **kw), ref_fn(pool, **kw), inputs)
    names = [s.name for s in rec]
    # the forward pools in the conv epilogue; the backward expands the pooled gradient either in
    # the dgrad/wgrad loads (no full-res dy) or with one gather kernel
    assert "_max_pool_fwd_kernel" not in names
    assert names.count("_max_pool_bwd_kernel") == (pool_grad == "kernel"), names


def test_argmax_is_the_pools_tap_code():
    x, w, b = rand_inputs(2, 7, 9, 11, 12, 3)
    o = conv2d_forward(nhwc(x.detach()), w.detach(), b.detach(), padding=1, pool=2)
    z = F.conv2d(x.detach().double(), w.detach().double(), b.detach().double(), padding=1)  # [2, 12, 9, 11]
    ref, ind = F.max_pool2d(z, 2, return_indices=True)  # ind: flat h*W + w in the 9x11 plane
    hh, ww = ind // z.shape[3], ind % z.shape[3]
    tap = (hh % 2) * 2 + ww % 2  # engine.kernels.pool's code: dy*K + dx
    assert o.idx.dtype == torch.uint8 and o.idx.shape == (2, 4, 5, 12)
    assert torch.equal(nchw(o.idx).long(), tap)
    assert_close(nchw(o.y), ref, what="pooled y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pooled_values_and_taps_are_exact(dtype):
    # the fused pool is max_pool2d of the unfused conv's output, winners and ties (the first tap)
    # included; negative values and zeros too. The two launches tile M differently, so their GEMMs
    # may round an output 1 ulp apart (the interpreter's numpy matmul blocks by shape): values are
    # compared to that, and taps wherever a window's winner stands clear of that rounding, or is an
    # exact tie of zeros (zero patches give exact zero outputs in both)
    x, w, b = rand_inputs(2, 8, 11, 13, 24, 3, dtype=dtype)
    xs = torch.relu(nhwc(x.detach()))
    full = conv2d_forward(xs, w.detach(), padding=1).y.float()  # [2, 11, 13, 24]
    o = conv2d_forward(xs, w.detach(), padding=1, pool=2)
    ref, ind = F.max_pool2d(nchw(full), 2, return_indices=True)
    tap = (ind // 13 % 2) * 2 + ind % 13 % 2
    assert_close(nchw(o.y.float()), ref, dtype, what="pooled y")
    windows = F.unfold(nchw(full).reshape(-1, 1, 11, 13)[..., :10, :12], 2, stride=2)  # [B*C, 4, 5*6]
    top2 = windows.topk(2, dim=1).values  # [B*C, 2, 30]
    gap = (top2[:, 0] - top2[:, 1]).reshape(ref.shape)
    zero_tie = (top2[:, 0] == 0).reshape(ref.shape) & (gap == 0)
    clear = (gap > 1e-2 * ref.abs().max()) | zero_tie
    assert clear.float().mean() > 0.9
    assert torch.equal(nchw(o.idx).long()[clear], tap[clear])


def test_stats_of_the_pooled_output(monkeypatch):
    # several M tiles (BLOCK_M 64), so the partials really are partial
    big_tiles = conv_geometry.gemm_tiles
    monkeypatch.setattr(conv_geometry, "gemm_tiles",
                        lambda M, N, C, taps: replace(big_tiles(M, N, C, taps), block_m=min(64, M)))
    x, w, b = rand_inputs(3, 3, 15, 13, 10, 3)
    o = conv2d_forward(nhwc(x.detach()), w.detach(), b.detach(), padding=1, pool=2, stats=True)
    p = F.max_pool2d(F.conv2d(x.detach().double(), w.detach().double(), b.detach().double(), padding=1), 2)
    assert o.psum.shape[0] >= 2 and o.psum.shape == o.psumsq.shape == (o.psum.shape[0], 10)
    assert_close(o.psum.sum(0), p.sum((0, 2, 3)), what="sum")
    assert_close(o.psumsq.sum(0), (p * p).sum((0, 2, 3)), what="sum of squares")


def test_half_precision():
    N, Cin, H, W, Cout, k, kw, pool = CASES["odd_hw_bias"]
    x, w, b = rand_inputs(N, Cin, H, W, Cout, k, dtype=torch.float16)

    def ours(x, w, b):
        return ours_fn(pool, **kw)(x, w, b).float()

    check_against_torch(ours, ref_fn(pool, **kw), [x, w, b], tol=torch.float16)


def test_gpu_tiles_under_interpreter(monkeypatch, operand_expansion):
    # the GPU tile choices (small BLOCK_M windows, split-K boxed wgrad) must be correct too
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    x, w, b = rand_inputs(2, 16, 9, 17, 32, 3)  # 9x17 -> 4x8
    check_against_torch(ours_fn(2, padding=1), ref_fn(2, padding=1), [x, w, b])


@pytest.mark.parametrize("block_m,num_warps,order", [(16, 4, (8, 4)), (64, 4, (8, 4)), (64, 8, (8, 4)),
                                                     (128, 4, (64, 8)), (256, 4, (128, 8)), (128, 8, (8, 4))])
def test_window_row_orders(block_m, num_warps, order, monkeypatch):
    # each order in which the forward lays a tile's 2x2 windows out over its rows (forward.window_rows:
    # the taps of a window in as few lanes of the MMA accumulator as the tile allows), partial last tile
    monkeypatch.setattr(conv_geometry, "gemm_tiles",
                        lambda M, N, C, taps: conv_geometry.Config(block_m, 16, 16, num_warps=num_warps))
    x, w, b = rand_inputs(2, 5, 11, 19, 10, 3)  # 11x19 -> 5x9: 90 windows, 360 rows
    with recording() as rec:
        check_against_torch(ours_fn(2, padding=1), ref_fn(2, padding=1), [x, w, b])
    fwd = [dict(s.constexprs) for s in rec if s.name == "_conv_fwd_kernel"]
    assert fwd and all((c["TAP_S1"], c["TAP_S0"]) == order for c in fwd)


@pytest.mark.parametrize("stride", [1, 2])
def test_backward_of_a_cropped_gradient(stride):
    # dgrad/wgrad given only the output rows a floor-mode pool read (extent): the same as the full
    # gradient with zeros past them, in torch's reference
    N, Cin, H, W, Cout = 2, 6, 11, 9, 10
    x = torch.randn(N, Cin, H, W, dtype=torch.float64)
    w = torch.randn(Cout, Cin, 3, 3, dtype=torch.float64) / 7
    kw = dict(stride=(stride, stride), padding=(1, 1), dilation=(1, 1), groups=1)
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    Hd, Wd = Ho // 2 * 2, Wo // 2 * 2
    assert (Hd, Wd) != (Ho, Wo)
    dy = torch.randn(N, Cout, Hd, Wd, dtype=torch.float64)
    full = F.pad(dy, (0, Wo - Wd, 0, Ho - Hd))
    x32, w32, dy32 = nhwc(x).float(), w.float(), nhwc(dy).float()
    dx = conv2d_dgrad(dy32, w32, tuple(x32.shape), extent=(Hd, Wd), **kw)
    dw, db = conv2d_wgrad(x32, dy32, tuple(w.shape), need_bias=True, extent=(Hd, Wd), **kw)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.conv2d(xr, wr, None, stride, 1).backward(full)
    assert_close(nchw(dx), xr.grad, what="dx")
    assert_close(dw, wr.grad, what="dw")
    assert_close(db, full.sum((0, 2, 3)), what="db")
    with pytest.raises(ValueError, match="within"):
        conv2d_dgrad(dy32, w32, tuple(x32.shape), extent=(Ho + 1, Wd), **kw)
    with pytest.raises(ValueError, match="cropped"):
        conv2d_wgrad(x32, dy32, tuple(w.shape), extent=(Hd, Wd), act="relu", z=dy32, **kw)


def test_inference_epilogue_before_the_pool():
    # folded bn and an activation precede the max (inference: no backward through them)
    x, w, b = rand_inputs(2, 6, 9, 7, 10, 3)
    scale, shift = torch.rand(10) + 0.5, torch.randn(10)
    with torch.no_grad():
        y = conv2d(nhwc(x), w, b, padding=1, act="gelu", scale=scale, shift=shift, pool=2)
    z = F.conv2d(x.detach().double(), w.detach().double(), b.detach().double(), padding=1)
    z = F.gelu(z * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
    assert_close(nchw(y), F.max_pool2d(z, 2), what="pooled act(bn(conv))")


def test_refusals():
    x, w, b = rand_inputs(1, 4, 8, 8, 8, 3)
    with pytest.raises(ValueError, match="no backward"):
        conv2d(nhwc(x), w, b, padding=1, act="relu", pool=2)
    with pytest.raises(ValueError, match="power of two"):
        conv2d_forward(nhwc(x.detach()), w.detach(), padding=1, pool=3)
    with pytest.raises(ValueError, match="no residual"):
        conv2d_forward(nhwc(x.detach()), w.detach(), padding=1, pool=2, residual=torch.zeros(1, 8, 8, 8))


def test_int64_offsets(monkeypatch, operand_expansion):
    # the IDX64 switch (a tensor of 2**31 elements or more) forced on small tensors
    import engine.kernels.conv.dgrad as dgrad
    import engine.kernels.conv.forward as forward
    import engine.kernels.conv.wgrad as wgrad
    for mod in (forward, dgrad, wgrad):
        monkeypatch.setattr(mod, "idx64", lambda *ts: True)
    N, Cin, H, W, Cout, k, kw, pool = CASES["odd_hw_bias"]
    x, w, b = rand_inputs(N, Cin, H, W, Cout, k)
    check_against_torch(ours_fn(pool, **kw), ref_fn(pool, **kw), [x, w, b])


@pytest.mark.parametrize("box", [True, False], ids=["boxed", "flat"])
def test_wgrad_pixel_orders(box, monkeypatch):
    # both reduction orders of the wgrad (pixel boxes of whole windows, flat window-major chunks),
    # split in three, with the bias gradient
    from engine.kernels.conv import conv2d_wgrad
    boxes = conv_geometry.wgrad_box
    monkeypatch.setattr(conv_geometry, "wgrad_box",
                        lambda *a: boxes(*a) if box else (0, 0, 0))
    monkeypatch.setattr(conv_geometry, "wgrad_tiles",
                        lambda C, N, P, taps, e=2, **_: conv_geometry.Config(16, 16, 16))
    x, w, b = rand_inputs(3, 5, 11, 9, 10, 3)
    o = conv2d_forward(nhwc(x.detach()), w.detach(), b.detach(), padding=1, pool=2)
    dp = torch.randn(o.y.shape)
    dw, db = conv2d_wgrad(nhwc(x.detach()), dp, tuple(w.shape), stride=1, padding=1, dilation=1, groups=1,
                          need_bias=True, splits=3, pool=2, pool_idx=o.idx)
    wd, bd = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    F.max_pool2d(F.conv2d(x.detach().double(), wd, bd, padding=1), 2).backward(nchw(dp).double())
    assert_close(dw, wd.grad, what="dw")
    assert_close(db, bd.grad, what="db")
