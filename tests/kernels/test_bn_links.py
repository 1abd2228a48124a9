"""Tests for the batch-norm backward hand-offs (engine/kernels/batchnorm/backward.py) against
PyTorch (fp64): a training batch norm (+ act) read only by a conv, whose dgrad epilogue makes the
batch norm's dz and gradient sums (BnGradLink), and a conv with a fused max pool whose pooled output
feeds a training batch norm, whose backward writes the conv's full-resolution gradient through the
argmax (PoolGradLink). Awkward shapes: odd H/W with dropped pool rows, channels off 16, strided
convs, several folds of partial rows, GPU tiles, fp16."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import check_against_torch, torch_act

import engine.device
import engine.kernels.batchnorm.backward as bn_backward
import engine.kernels.common as common
import engine.kernels.conv.function as conv_function
import engine.kernels.conv.geometry as conv_geometry
from engine.kernels.batchnorm import BnApplyLink, BnGradLink, PoolGradLink, batch_norm_train
from engine.kernels.conv import conv2d
from engine.kernels.launch import recording


def nhwc(t):
    return t.permute(0, 2, 3, 1).contiguous()


def nchw(t):
    return t.permute(0, 3, 1, 2)


def bn_params(C, dtype=torch.float32):
    return (1 + 0.3 * torch.randn(C, dtype=dtype)).requires_grad_(), (0.2 * torch.randn(C, dtype=dtype)).requires_grad_()


def conv_weight(Cout, Cin, k):
    return (torch.randn(Cout, Cin, k, k) / (Cin * k * k) ** 0.5).requires_grad_()


def ours_bn_conv(act, link, **conv_kw):
    """act(bn(x)) -> conv, the conv's dgrad making the bn's dz and sums when `link`."""
    def f(x, g, b, w):
        grad_link = BnGradLink() if link else None
        C = x.shape[1]
        h = batch_norm_train(nhwc(x), g, b, torch.zeros(C), torch.ones(C), act=act, grad_link=grad_link)
        return nchw(conv2d(h, w, grad_link=grad_link, **conv_kw))
    return f


def ref_bn_conv(act, stride=1, padding=0):
    def f(x, g, b, w):
        h = torch_act(F.batch_norm(x, None, None, g, b, training=True, eps=1e-5), act, 0.01)
        return F.conv2d(h, w, None, stride, padding)
    return f


# (N, C, H, W, Cout, kernel, conv kwargs, act)
BN_CONV = {
    "gelu_odd": (3, 24, 7, 9, 20, 3, dict(padding=1), "gelu"),
    "relu_stride2": (2, 10, 9, 8, 12, 3, dict(stride=2, padding=1), "relu"),
    "no_act_1x1": (4, 5, 5, 3, 7, 1, dict(), "none"),
}


@pytest.mark.parametrize("name", list(BN_CONV))
def test_dgrad_makes_the_bn_gradient(name):
    N, C, H, W, Cout, k, kw, act = BN_CONV[name]
    x = torch.randn(N, C, H, W).mul(2).add(0.5).requires_grad_()
    g, b = bn_params(C)
    w = conv_weight(Cout, C, k)
    with recording() as rec:
        check_against_torch(ours_bn_conv(act, True, **kw), ref_bn_conv(act, **kw), [x, g, b, w])
    names = [s.name for s in rec]
    assert "_bn_bwd_reduce_kernel" not in names and "_sum_partials_kernel" not in names, names
    assert names.count("_bn_bwd_apply_kernel") == 1, names


def test_sums_fold_in_several_groups(monkeypatch):
    # tiny tiles and fold limits: many partial rows, folded in several groups and summed by the last
    monkeypatch.setattr(common, "FOLD_ROWS", 4)
    monkeypatch.setattr(common, "GPU_TARGET_PARTIALS", 3)
    import engine.kernels.batchnorm.backward as bn_backward
    monkeypatch.setattr(bn_backward, "FOLD_ROWS", 4)
    tiles = conv_geometry.gemm_tiles
    monkeypatch.setattr(conv_geometry, "gemm_tiles",
                        lambda M, N, K, taps: replace(tiles(M, N, K, taps), block_m=16, block_n=16))
    N, C, H, W, Cout, k, kw, act = BN_CONV["gelu_odd"]
    x = torch.randn(N, C, H, W).requires_grad_()
    g, b = bn_params(C)
    w = conv_weight(Cout, C, k)
    check_against_torch(ours_bn_conv(act, True, **kw), ref_bn_conv(act, **kw), [x, g, b, w])


def test_link_matches_the_unlinked_backward():
    # the same step with and without the hand-off: the same gradients (up to summation order)
    N, C, H, W, Cout, k, kw, act = BN_CONV["relu_stride2"]
    x = torch.randn(N, C, H, W).requires_grad_()
    g, b = bn_params(C)
    w = conv_weight(Cout, C, k)
    dy = torch.randn(N, Cout, 5, 4)
    grads = []
    for link in (False, True):
        for t in (x, g, b, w):
            t.grad = None
        ours_bn_conv(act, link, **kw)(x, g, b, w).backward(dy)
        grads.append([t.grad.clone() for t in (x, g, b, w)])
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def ours_conv_pool_bn(act, pool, link, next_conv=None, **conv_kw):
    """conv -> K x K max pool (fused) -> bn + act [-> conv], the bn's backward writing the first conv's
    full-resolution gradient when `link`."""
    def f(x, w, cb, g, b, *w2):
        pool_link = PoolGradLink() if link else None
        grad_link = BnGradLink() if link and w2 else None
        y, partials = conv2d(nhwc(x), w, cb, pool=pool, stats=True, pool_link=pool_link, **conv_kw)
        C = y.shape[-1]
        h = batch_norm_train(y, g, b, torch.zeros(C, dtype=torch.float32), torch.ones(C, dtype=torch.float32),
                             act=act, partials=partials, pool_link=pool_link, grad_link=grad_link)
        if w2:
            h = conv2d(h, w2[0], padding=1, grad_link=grad_link)
        return nchw(h)
    return f


def ref_conv_pool_bn(act, pool, stride=1, padding=0):
    def f(x, w, cb, g, b, *w2):
        y = F.max_pool2d(F.conv2d(x, w, cb, stride, padding), pool)
        h = torch_act(F.batch_norm(y, None, None, g, b, training=True, eps=1e-5), act, 0.01)
        return F.conv2d(h, w2[0], None, 1, 1) if w2 else h
    return f


# (N, Cin, H, W, Cout, kernel, conv kwargs, pool, act)
CONV_POOL_BN = {
    "odd_hw_gelu": (3, 5, 11, 9, 10, 3, dict(padding=1), 2, "gelu"),  # 11x9 -> 5x4, a row and column dropped
    "stride2_relu": (2, 16, 13, 10, 24, 3, dict(stride=2, padding=1), 2, "relu"),
    "pool4": (2, 8, 10, 11, 6, 2, dict(), 4, "none"),  # 9x10 -> 2x2
}


@pytest.mark.parametrize("chained", [False, True], ids=["bn_last", "then_conv"])
@pytest.mark.parametrize("name", list(CONV_POOL_BN))
def test_bn_backward_expands_the_pool(name, chained):
    N, Cin, H, W, Cout, k, kw, pool, act = CONV_POOL_BN[name]
    x = torch.randn(N, Cin, H, W).requires_grad_()
    w, cb = conv_weight(Cout, Cin, k), torch.randn(Cout)  # its gradient is 0 before a bn
    g, b = bn_params(Cout)
    extra = [conv_weight(7, Cout, 3)] if chained else []
    with recording() as rec:
        check_against_torch(ours_conv_pool_bn(act, pool, True, **kw), ref_conv_pool_bn(act, pool, **kw),
                            [x, w, cb, g, b, *extra])
    names = [s.name for s in rec]
    assert "_max_pool_bwd_kernel" not in names and "_max_pool_fwd_kernel" not in names, names
    assert ("_bn_bwd_reduce_kernel" in names) != chained, names  # the second conv's dgrad made the sums


@pytest.mark.parametrize("block_m", [4, 64, 256])
def test_pool_expansion_tiles(block_m, monkeypatch):
    # the bn's backward writes the full-resolution gradient in tiles of image rows: a row's pixels in
    # several tiles (4), several rows a tile wrapping into the next image (64: 4 of 11 rows), whole images
    monkeypatch.setattr(bn_backward, "tile_2d", lambda M, C: (block_m, 16, 4))
    N, Cin, H, W, Cout, k, kw, pool, act = CONV_POOL_BN["odd_hw_gelu"]
    x = torch.randn(N, Cin, H, W).requires_grad_()
    w, cb = conv_weight(Cout, Cin, k), torch.randn(Cout)  # its gradient is 0 before a bn
    g, b = bn_params(Cout)
    with recording() as rec:
        check_against_torch(ours_conv_pool_bn(act, pool, True, **kw), ref_conv_pool_bn(act, pool, **kw),
                            [x, w, cb, g, b])
    apply = [dict(s.constexprs) for s in rec if s.name == "_bn_bwd_apply_kernel"]
    assert apply and all(c["POOL"] == 2 and c["BLOCK_M"] <= block_m for c in apply), apply


def test_operand_expansion_ignores_the_pool_link(monkeypatch):
    # FUSENET_POOL_GRAD=operand: the conv expands in its loads, the bn hands back the pooled gradient
    monkeypatch.setattr(conv_function, "POOL_GRAD", "operand")
    N, Cin, H, W, Cout, k, kw, pool, act = CONV_POOL_BN["odd_hw_gelu"]
    x = torch.randn(N, Cin, H, W).requires_grad_()
    w, cb = conv_weight(Cout, Cin, k), torch.randn(Cout)  # its gradient is 0 before a bn
    g, b = bn_params(Cout)
    check_against_torch(ours_conv_pool_bn(act, pool, True, **kw), ref_conv_pool_bn(act, pool, **kw),
                        [x, w, cb, g, b])


def test_gpu_tiles_under_interpreter(monkeypatch):
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    N, Cin, H, W, Cout, k, kw, pool, act = CONV_POOL_BN["odd_hw_gelu"]
    x = torch.randn(N, Cin, H, W).requires_grad_()
    w, cb = conv_weight(Cout, Cin, k), torch.randn(Cout)  # its gradient is 0 before a bn
    g, b = bn_params(Cout)
    check_against_torch(ours_conv_pool_bn(act, pool, True, **kw), ref_conv_pool_bn(act, pool, **kw),
                        [x, w, cb, g, b, conv_weight(16, Cout, 3)])


def test_half_precision():
    N, C, H, W, Cout, k, kw, act = BN_CONV["gelu_odd"]
    x = torch.randn(N, C, H, W).to(torch.float16).requires_grad_()
    g, b = bn_params(C)
    w = conv_weight(Cout, C, k).detach().to(torch.float16).requires_grad_()

    def ours(x, g, b, w):
        return ours_bn_conv(act, True, **kw)(x, g, b, w).float()

    check_against_torch(ours, ref_bn_conv(act, **kw), [x, g, b, w], tol=torch.float16)


def test_a_missing_gradient_is_an_error():
    link = PoolGradLink()
    with pytest.raises(RuntimeError, match="left no full-resolution gradient"):
        link.take_grad()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("pool", [0, 2])
def test_conv_kernel_finishes_the_bn_statistics(momentum, pool, monkeypatch):
    # the conv's last programs fold its per-tile sums (several folds: tiny tiles and limits) and finish
    # the bn's statistics: mean, rstd, the running statistics, num_batches_tracked once per launch;
    # twice in a row (the ticket counters are back at 0 after each)
    from engine.kernels import reduction
    from engine.kernels.batchnorm import StatsTail

    monkeypatch.setattr(common, "FOLD_ROWS", 4)
    monkeypatch.setattr(common, "GPU_TARGET_PARTIALS", 3)
    tiles = conv_geometry.gemm_tiles
    monkeypatch.setattr(conv_geometry, "gemm_tiles",
                        lambda M, N, K, taps: replace(tiles(M, N, K, taps), block_m=16, block_n=16))
    C = 20  # two channel blocks of 16
    rm, rv, nbt = torch.randn(C), torch.rand(C) + 0.5, torch.tensor(3, dtype=torch.int64)
    rm_ref, rv_ref = rm.double().clone(), rv.double().clone()
    w = conv_weight(C, 6, 3).detach()
    for step in range(2):
        x = torch.randn(3, 6, 11, 9)
        y, stats = conv2d(nhwc(x), w, padding=1, stats=True, pool=pool,
                          stats_tail=StatsTail(rm, rv, nbt, momentum, 1e-5))
        ref = F.conv2d(x.double(), w.double(), padding=1)
        ref = F.max_pool2d(ref, pool) if pool else ref
        mean, var = ref.mean((0, 2, 3)), ref.var((0, 2, 3), unbiased=False)
        n = ref.numel() // C
        f = momentum if momentum is not None else 1 / (4 + step)
        rm_ref, rv_ref = (1 - f) * rm_ref + f * mean, (1 - f) * rv_ref + f * var * n / (n - 1)
        torch.testing.assert_close(stats.mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.rstd.double(), 1 / torch.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rm.double(), rm_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rv.double(), rv_ref, rtol=1e-5, atol=1e-5)
        assert int(nbt) == 4 + step
    assert not reduction.ticket_counters(x.device, 64).any()


@pytest.mark.parametrize("window", [(3, 2, 1), (2, 2, 0), (3, 3, 0)], ids=["overlap_pad", "2x2", "3x3_drops"])
def test_pool_backward_makes_the_bn_gradient(window):
    # act(bn(x)) -> max pool: the pool's backward gather forms the bn's dz and its sums (no reduce pass)
    from engine.kernels.pool import max_pool2d

    k, s, pad = window
    x = torch.randn(3, 12, 7, 8).mul(1.5).add(0.3).requires_grad_()
    g, b = bn_params(12)

    def ours(x, g, b):
        link = BnGradLink()
        h = batch_norm_train(nhwc(x), g, b, torch.zeros(12), torch.ones(12), act="gelu", grad_link=link)
        return nchw(max_pool2d(h, k, s, pad, grad_link=link))

    def ref(x, g, b):
        h = torch_act(F.batch_norm(x, None, None, g, b, training=True, eps=1e-5), "gelu", 0.01)
        return F.max_pool2d(h, k, s, pad)

    with recording() as rec:
        check_against_torch(ours, ref, [x, g, b])
    names = [r.name for r in rec]
    assert "_bn_bwd_reduce_kernel" not in names and names.count("_max_pool_bwd_kernel") == 1, names


def ours_stem_bn(act, **conv_kw):
    """conv -> training bn + act -> conv (padding 1), the bn's apply left to the first conv's wgrad."""
    def f(x, w, g, b, w2):
        apply_link, grad_link = BnApplyLink(), BnGradLink()
        y, partials = conv2d(nhwc(x), w, stats=True, apply_link=apply_link, **conv_kw)
        C = y.shape[-1]
        h = batch_norm_train(y, g, b, torch.zeros(C), torch.ones(C), act=act, partials=partials,
                             grad_link=grad_link, apply_link=apply_link)
        return nchw(conv2d(h, w2, padding=1, grad_link=grad_link))
    return f


def ref_stem_bn(act, stride=1, padding=0):
    def f(x, w, g, b, w2):
        h = torch_act(F.batch_norm(F.conv2d(x, w, None, stride, padding), None, None, g, b, training=True,
                                   eps=1e-5), act, 0.01)
        return F.conv2d(h, w2, None, 1, 1)
    return f


# (dtype, input needs a gradient, conv kwargs, kernel): fp16 2x2 unpadded RGB: the folded wgrad takes the
# bn's dx from dz, X^T X and X^T 1; fp32 / padded: one apply launch first; x's gradient: the dgrad reads dx too
STEM_CASES = {
    "folded_fp16": (torch.float16, False, dict(), 2),
    "folded_stride2": (torch.float16, False, dict(stride=2), 2),
    "padded_fp16": (torch.float16, False, dict(padding=1), 3),
    "fp32": (torch.float32, False, dict(), 2),
    "x_grad": (torch.float16, True, dict(), 2),
}


@pytest.mark.parametrize("name", list(STEM_CASES))
def test_stem_wgrad_forms_the_bn_dx(name):
    dtype, x_grad, kw, k = STEM_CASES[name]
    x = torch.randn(3, 3, 11, 10).to(dtype).requires_grad_(x_grad)
    w, g, b, w2 = conv_weight(16, 3, k), *bn_params(16), conv_weight(8, 16, 3)
    with recording() as rec:
        check_against_torch(ours_stem_bn("gelu", **kw), ref_stem_bn("gelu", **kw), [x, w, g, b, w2], tol=dtype)
    folded = [dict(s.constexprs) for s in rec if s.name == "_conv_wgrad_folded_kernel"]
    applies = [s for s in rec if s.name == "_bn_bwd_apply_kernel"]
    fused = name.startswith("folded")
    assert bool(folded) == (name not in ("padded_fp16", "fp32")), [s.name for s in rec]
    assert all(c["BN_APPLY"] == fused for c in folded), folded
    assert len(applies) == (0 if fused else 1), [s.name for s in rec]


def test_stem_apply_link_refuses_a_conv_bias():
    # the wgrad's formula takes the conv's output as X W: a bias before the bn is not in it
    x, w = torch.randn(2, 3, 6, 6), conv_weight(16, 3, 2)
    with pytest.raises(ValueError, match="apply_link needs the plain conv output"):
        conv2d(nhwc(x), w, torch.randn(16), stats=True, apply_link=BnApplyLink())

