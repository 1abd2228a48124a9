"""Pooling kernels (engine/kernels/pool.py, global_pool.py) against torch.nn.functional, forward and input gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DATA_MOVEMENT_OPS, OpRecorder, SHAPE_OPS, check_against_torch

import engine.device
from engine.kernels import global_pool as gpool
from engine.kernels import pool

ALLOWED_ATEN = DATA_MOVEMENT_OPS | SHAPE_OPS


def nhwc(fn):
    """Wrap an NHWC op so it takes and returns NCHW (permutes are copies, not arithmetic)."""

    def wrapped(x, *args, **kwargs):
        y = fn(x.permute(0, 2, 3, 1).contiguous(), *args, **kwargs)
        return y.permute(0, 3, 1, 2) if y.dim() == 4 else y

    return wrapped


def distinct(shape, dtype=torch.float32):
    """Values without ties (a scaled random permutation), exact in `dtype`."""
    n = 1
    for s in shape:
        n *= s
    v = torch.randperm(n).to(torch.float64)
    limit = {torch.float32: 1 << 24, torch.float16: 2048, torch.bfloat16: 256}[dtype]
    assert n <= limit, "too many elements to be distinct in this dtype"
    return (v / n - 0.5).reshape(shape).to(dtype).requires_grad_()


# (N, C, H, W, kernel, stride, padding)
POOL_CASES = [
    (1, 3, 7, 9, 2, 2, 0),
    (5, 10, 15, 15, 3, 2, 1),
    (2, 17, 31, 31, 3, 1, 1),
    (2, 10, 7, 9, 3, None, 0),
    (1, 3, 8, 11, (2, 3), (1, 2), (1, 0)),
    (5, 3, 15, 15, 3, 1, 1),
    (2, 5, 10, 11, 2, 3, 1),  # disjoint windows with gaps and padding (the backward's one-gather path)
]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-k{c[4]}s{c[5]}p{c[6]}")
def test_max_pool2d(case):
    N, C, H, W, k, s, p = case
    x = distinct((N, C, H, W))
    check_against_torch(
        nhwc(lambda v: pool.max_pool2d(v, k, s, p)),
        lambda v: F.max_pool2d(v, k, s, p),
        [x],
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_max_pool2d_low_precision(dtype):
    x = distinct((1, 3, 9, 7), dtype)
    check_against_torch(nhwc(lambda v: pool.max_pool2d(v, 3, 2, 1)), lambda v: F.max_pool2d(v, 3, 2, 1), [x])


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_max_pool2d_ties_follow_pytorch(k, s, p):
    """Many ties (including all-equal windows): the gradient must go where PyTorch sends it."""
    x = torch.randint(0, 3, (2, 5, 9, 8)).float()
    x[0, :, :4, :4] = 1.0  # whole windows of equal values
    x.requires_grad_()
    ours, ref = nhwc(lambda v: pool.max_pool2d(v, k, s, p)), (lambda v: F.max_pool2d(v, k, s, p))
    xo, xr = x.detach().clone().requires_grad_(), x.detach().double().requires_grad_()
    yo, yr = ours(xo), ref(xr)
    g = torch.randn(yr.shape, dtype=torch.float64)
    yo.backward(g.float())
    yr.backward(g)
    assert torch.equal(yo.detach().double(), yr.detach())
    # every gradient value is one dy or a sum of a few: compare to fp32 rounding
    torch.testing.assert_close(xo.grad.double(), xr.grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(xo.grad != 0, xr.grad != 0)


def test_max_pool2d_nan_and_inf():
    x = distinct((1, 2, 6, 6)).detach().clone()
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 2:4, 2:4] = float("-inf")
    x[0, 1, 0, 0] = float("inf")
    y = nhwc(lambda v: pool.max_pool2d(v, 2, 2))(x)
    ref = F.max_pool2d(x, 2, 2)
    torch.testing.assert_close(y, ref, equal_nan=True)


def test_max_pool2d_nan_gradient_goes_where_pytorch_sends_it():
    x = torch.randn(1, 1, 4, 4)
    for i, j in ((0, 0), (1, 1), (2, 3), (3, 2)):  # two NaNs in two windows
        x[0, 0, i, j] = float("nan")
    xr, xo = x.clone().requires_grad_(), x.permute(0, 2, 3, 1).contiguous().requires_grad_()
    F.max_pool2d(xr, 2, 2).backward(torch.ones(1, 1, 2, 2))
    pool.max_pool2d(xo, 2, 2).backward(torch.ones(1, 2, 2, 1))
    assert torch.equal(xo.grad.permute(0, 3, 1, 2), xr.grad)


# Awkward max-pool geometries for the compact tap index (N, C, H, W, kernel, stride, padding):
# odd sizes, padding, stride != kernel, C = 1 and 3, 1x1 outputs, a window over 16 taps.
COMPACT_CASES = [
    (2, 1, 7, 9, 3, 2, 1),
    (3, 3, 9, 7, (2, 3), (3, 1), (1, 1)),
    (2, 3, 5, 5, 5, 5, 0),  # one window covers the image: 1x1 outputs
    (1, 1, 3, 4, 3, 2, 1),
    (2, 3, 11, 13, (5, 4), 3, 2),  # 20 taps
    (1, 3, 17, 17, 17, 1, 0),  # 289 taps: only the int32 index fits
]


@pytest.mark.parametrize("wide", [False, True], ids=["uint8", "int32"])
@pytest.mark.parametrize("case", COMPACT_CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-k{c[4]}s{c[5]}p{c[6]}")
def test_max_pool2d_tap_index_widths(case, wide):
    """Forward and gradient against PyTorch with each width of the saved tap forced."""
    N, C, H, W, k, s, p = case
    taps = (k[0] * k[1]) if isinstance(k, tuple) else k * k
    if not wide and taps > pool.NARROW_TAPS:
        with pytest.raises(ValueError, match="one-byte"):
            pool.max_pool2d(torch.randn(N, H, W, C), k, s, p, wide_idx=False)
        return
    x = distinct((N, C, H, W))
    check_against_torch(nhwc(lambda v: pool.max_pool2d(v, k, s, p, wide_idx=wide)),
                        lambda v: F.max_pool2d(v, k, s, p), [x])
    res = pool.max_pool2d_forward(x.detach().permute(0, 2, 3, 1).contiguous(), k, s, p, wide_idx=wide)
    assert res.idx.dtype == (torch.int32 if wide else torch.uint8)
    # the default: one byte whenever the taps fit
    auto = pool.max_pool2d_forward(x.detach().permute(0, 2, 3, 1).contiguous(), k, s, p).idx.dtype
    assert auto == (torch.int32 if taps > pool.NARROW_TAPS else torch.uint8)


@pytest.mark.parametrize("wide", [False, True], ids=["uint8", "int32"])
@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 1), ((2, 3), (3, 1), (1, 1))])
def test_max_pool2d_ties_with_each_index_width(k, s, p, wide):
    x = torch.randint(0, 3, (2, 3, 9, 8)).float()
    x[0, :, :4, :4] = 1.0
    xo, xr = x.permute(0, 2, 3, 1).contiguous().requires_grad_(), x.double().requires_grad_()
    yo, yr = pool.max_pool2d(xo, k, s, p, wide_idx=wide), F.max_pool2d(xr, k, s, p)
    assert torch.equal(yo.detach().permute(0, 3, 1, 2).double(), yr.detach())
    g = torch.randn(yr.shape, dtype=torch.float64)
    yo.backward(g.permute(0, 2, 3, 1).float())
    yr.backward(g)
    torch.testing.assert_close(xo.grad.permute(0, 3, 1, 2).double(), xr.grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(xo.grad.permute(0, 3, 1, 2) != 0, xr.grad != 0)


def test_max_pool2d_backward_checks_the_index():
    dy = torch.randn(1, 2, 2, 3)
    with pytest.raises(ValueError, match="uint8 or int32"):
        pool.max_pool2d_backward(dy, torch.zeros(1, 2, 2, 3, dtype=torch.int64), (1, 4, 4, 3), 2)
    with pytest.raises(ValueError, match="uint8 idx"):
        pool.max_pool2d_backward(torch.randn(1, 1, 1, 3), torch.zeros(1, 1, 1, 3, dtype=torch.uint8),
                                 (1, 17, 17, 3), 17)


def _stats_ref(y):
    """fp64 per-channel sum and sum of squares of NHWC y."""
    y = y.double().reshape(-1, y.shape[-1])
    return y.sum(0), (y * y).sum(0)


@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["interp-tiles", "gpu-tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(2, 3, 7, 9, 3, 2, 1), (2, 17, 13, 15, 2, 2, 0), (1, 1, 5, 5, 5, 5, 0),
                                  (2, 70, 5, 7, (2, 3), (3, 1), (1, 1))],
                         ids=lambda c: "x".join(map(str, c[:4])) + f"-k{c[4]}s{c[5]}p{c[6]}")
def test_max_pool2d_statistics(case, dtype, gpu_tiles, monkeypatch):
    """stats=True: the partial sums of y and y*y add up to the pooled tensor's own sums (each
    program walking several pixel tiles on the GPU path), and y, idx and the gradient are
    those of the plain forward."""
    if gpu_tiles:
        monkeypatch.setattr(engine.device, "INTERPRETED", False)
        monkeypatch.setattr(pool, "FOLD_ROWS", 2)  # several pixel tiles per program, a tail past P
    N, C, H, W, k, s, p = case
    x = torch.randn(N, H, W, C).to(dtype)
    plain = pool.max_pool2d_forward(x, k, s, p)
    res = pool.max_pool2d_forward(x, k, s, p, stats=True)
    assert torch.equal(res.y, plain.y) and torch.equal(res.idx, plain.idx)
    assert res.psum.dtype == res.psumsq.dtype == torch.float32 and res.psum.shape == res.psumsq.shape
    assert res.psum.shape[1] == C
    if gpu_tiles:
        assert res.psum.shape[0] <= 2
    s_ref, ss_ref = _stats_ref(plain.y)
    torch.testing.assert_close(res.psum.double().sum(0), s_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(res.psumsq.double().sum(0), ss_ref, rtol=1e-5, atol=1e-4)
    # differentiable as before; the statistics carry no gradient
    xo = x.clone().requires_grad_()
    y, (ps, pss) = pool.max_pool2d(xo, k, s, p, stats=True)
    assert not ps.requires_grad and not pss.requires_grad
    g = torch.randn(y.shape).to(dtype)
    y.backward(g)
    assert torch.equal(xo.grad, pool.max_pool2d_backward(g, plain.idx, x.shape, k, s, p))


def test_max_pool2d_statistics_feed_batch_norm():
    """The partials are the batch norm's: batch_norm_train(partials=...) gives torch's output."""
    from engine.kernels.batchnorm import batch_norm_train

    x = torch.randn(3, 9, 11, 6)
    y, partials = pool.max_pool2d(x, 3, 2, 1, stats=True)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    rm, rv = torch.zeros(6), torch.ones(6)
    out = batch_norm_train(y, w, b, rm, rv, partials=partials, act="relu")
    yr = F.max_pool2d(x.permute(0, 3, 1, 2).double(), 3, 2, 1)
    rmr, rvr = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    ref = F.relu(F.batch_norm(yr, rmr, rvr, w.double(), b.double(), training=True))
    torch.testing.assert_close(out.permute(0, 3, 1, 2).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm.double(), rmr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double(), rvr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-k{c[4]}s{c[5]}p{c[6]}")
def test_avg_pool2d(case):
    N, C, H, W, k, s, p = case
    x = torch.randn(N, C, H, W, requires_grad=True)
    check_against_torch(nhwc(lambda v: pool.avg_pool2d(v, k, s, p)), lambda v: F.avg_pool2d(v, k, s, p), [x])


def test_avg_pool2d_exclude_pad():
    x = torch.randn(2, 10, 7, 9, requires_grad=True)
    check_against_torch(
        nhwc(lambda v: pool.avg_pool2d(v, 3, 2, 1, count_include_pad=False)),
        lambda v: F.avg_pool2d(v, 3, 2, 1, count_include_pad=False),
        [x],
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_avg_pool2d_low_precision(dtype):
    x = torch.randn(2, 10, 9, 7, dtype=dtype, requires_grad=True)
    check_against_torch(nhwc(lambda v: pool.avg_pool2d(v, 3, 2, 1)), lambda v: F.avg_pool2d(v, 3, 2, 1), [x])


GLOBAL_SHAPES = [(1, 3, 7, 9), (5, 17, 15, 15), (2, 10, 31, 31)]


def _chunk(shape, splits):
    """Rows per split giving about `splits` partial reductions (None: the launcher's choice)."""
    return None if splits is None else -(-shape[2] * shape[3] // splits)


@pytest.mark.parametrize("shape", GLOBAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("splits", [None, 3, 7])
def test_global_avg_pool(shape, splits):
    chunk = _chunk(shape, splits)
    x = torch.randn(*shape, requires_grad=True)
    check_against_torch(
        nhwc(lambda v: gpool.global_avg_pool(v, chunk)), lambda v: F.adaptive_avg_pool2d(v, 1).flatten(1), [x]
    )


@pytest.mark.parametrize("shape", GLOBAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("splits", [None, 3, 7])
def test_global_max_pool(shape, splits):
    chunk = _chunk(shape, splits)
    x = distinct(shape)
    check_against_torch(
        nhwc(lambda v: gpool.global_max_pool(v, chunk)), lambda v: F.adaptive_max_pool2d(v, 1).flatten(1), [x]
    )


@pytest.mark.parametrize("chunk", [None, 8, 20])
def test_global_max_pool_ties_go_to_first_max(chunk):
    x = torch.randint(0, 4, (3, 6, 7, 9)).float()
    x[1, 2] = 5.0  # a whole channel tied
    x.requires_grad_()
    check_against_torch(
        nhwc(lambda v: gpool.global_max_pool(v, chunk)), lambda v: F.adaptive_max_pool2d(v, 1).flatten(1), [x]
    )


def test_global_max_pool_nan():
    x = torch.randn(2, 3, 5, 5)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 4, 4] = float("nan")
    for chunk in (None, 4):
        y = nhwc(lambda v: gpool.global_max_pool(v, chunk))(x)
        torch.testing.assert_close(y, F.adaptive_max_pool2d(x, 1).flatten(1), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_global_pools_low_precision(dtype):
    x = torch.randn(2, 10, 9, 7, dtype=dtype, requires_grad=True)
    check_against_torch(
        nhwc(lambda v: gpool.global_avg_pool(v, 16)), lambda v: F.adaptive_avg_pool2d(v, 1).flatten(1), [x]
    )
    check_against_torch(
        nhwc(lambda v: gpool.global_max_pool(v, 16)), lambda v: F.adaptive_max_pool2d(v, 1).flatten(1), [x]
    )


def test_gpu_tile_choice_is_correct(monkeypatch):
    """The GPU block sizes (many small programs) run correctly too."""
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    x = distinct((2, 10, 9, 7))
    check_against_torch(nhwc(lambda v: pool.max_pool2d(v, 3, 2, 1)), lambda v: F.max_pool2d(v, 3, 2, 1), [x])
    check_against_torch(nhwc(lambda v: pool.avg_pool2d(v, 3, 1, 1)), lambda v: F.avg_pool2d(v, 3, 1, 1), [x])
    check_against_torch(nhwc(gpool.global_max_pool), lambda v: F.adaptive_max_pool2d(v, 1).flatten(1), [x])
    check_against_torch(nhwc(gpool.global_avg_pool), lambda v: F.adaptive_avg_pool2d(v, 1).flatten(1), [x])


def test_backward_is_deterministic():
    x = torch.randn(2, 15, 15, 10, requires_grad=True)  # NHWC
    g = torch.randn(2, 15, 15, 10)
    grads = []
    for _ in range(2):
        x.grad = None
        pool.max_pool2d(x, 3, 1, 1).backward(g)
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])


def _record_ops(ops, gshapes):
    xs = [torch.randn(2, 9, 7, 10, requires_grad=True) for _ in ops]  # NHWC, one leaf per op
    gs = [torch.randn(*s) for s in gshapes]
    rec = OpRecorder()
    with rec:
        for op, x, g in zip(ops, xs, gs):
            op(x).backward(g)
    assert all(x.grad is not None for x in xs)
    assert rec.ops, "recorder saw nothing"
    return rec.ops


def test_only_allocation_view_and_copy_ops_2d():
    ops = [lambda v: pool.max_pool2d(v, 3, 2, 1), lambda v: pool.avg_pool2d(v, 3, 2, 1),
           lambda v: pool.max_pool2d(v, 3, 2, 1, stats=True)[0], lambda v: pool.max_pool2d(v, 3, 2, 1, wide_idx=True)]
    used = _record_ops(ops, [(2, 5, 4, 10)] * 4)
    assert used <= ALLOWED_ATEN, f"compute ops used: {sorted(used - ALLOWED_ATEN)}"


def test_only_allocation_view_and_copy_ops_global():
    ops = [gpool.global_avg_pool, gpool.global_max_pool, lambda v: gpool.global_avg_pool(v, 8),
           lambda v: gpool.global_max_pool(v, 8)]
    used = _record_ops(ops, [(2, 10)] * 4)
    assert used <= ALLOWED_ATEN, f"compute ops used: {sorted(used - ALLOWED_ATEN)}"


def test_errors():
    x = torch.randn(1, 8, 8, 3)
    with pytest.raises(ValueError, match="padding"):
        pool.max_pool2d(x, 2, 2, 2)
    with pytest.raises(ValueError, match="contiguous"):
        pool.avg_pool2d(x.permute(0, 2, 1, 3), 2)
    with pytest.raises(ValueError, match="4-D"):
        gpool.global_avg_pool(x[0])
    with pytest.raises(ValueError, match="float32"):
        pool.max_pool2d(x.double(), 2)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        pool.max_pool2d(torch.randn(1, 2, 2, 3), 3)
