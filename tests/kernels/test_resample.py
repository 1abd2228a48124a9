"""Resampling kernels (engine/kernels/resample.py): integer upsampling and blurpool, forward and input gradients."""
from __future__ import annotations

from math import comb

import pytest
import torch
import torch.nn.functional as F
from helpers import DATA_MOVEMENT_OPS, OpRecorder, SHAPE_OPS, check_against_torch

import engine.device
from engine.kernels import resample

ALLOWED_ATEN = DATA_MOVEMENT_OPS | SHAPE_OPS


def nhwc(fn):
    """Wrap an NHWC op so it takes and returns NCHW (permutes are copies, not arithmetic)."""

    def wrapped(x, *args, **kwargs):
        return fn(x.permute(0, 2, 3, 1).contiguous(), *args, **kwargs).permute(0, 3, 1, 2)

    return wrapped


def blurpool_ref(x: torch.Tensor, filt: int, stride: int) -> torch.Tensor:
    """Zhang 2019: reflect pad ((f-1)//2 before, f//2 after), depthwise normalised binomial filter."""
    a = torch.tensor([float(comb(filt - 1, k)) for k in range(filt)], dtype=x.dtype)
    w = torch.outer(a, a)
    w = w / w.sum()
    left, right = (filt - 1) // 2, filt // 2
    if left or right:
        x = F.pad(x, (left, right, left, right), mode="reflect")
    C = x.shape[1]
    return F.conv2d(x, w.expand(C, 1, filt, filt), stride=stride, groups=C)


UP_SHAPES = [(1, 3, 7, 9), (5, 10, 4, 5), (2, 17, 15, 15)]
# the usual shapes at factors 2 and 3, then other factors and tiny inputs
UP_CASES = [(s, f) for s in UP_SHAPES for f in (2, 3)] + [((2, 3, 1, 1), 2), ((1, 5, 2, 3), 4), ((1, 3, 3, 2), 1),
                                                         ((1, 2, 2, 2), 5)]


@pytest.mark.parametrize("shape,factor", UP_CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c))
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsample(shape, factor, mode):
    x = torch.randn(*shape, requires_grad=True)
    check_against_torch(
        nhwc(lambda v: resample.upsample(v, factor, mode)),
        lambda v: F.interpolate(v, scale_factor=factor, mode=mode),
        [x],
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsample_low_precision(dtype, mode):
    x = torch.randn(2, 10, 5, 7, dtype=dtype, requires_grad=True)
    check_against_torch(
        nhwc(lambda v: resample.upsample(v, 2, mode)),
        lambda v: F.interpolate(v, scale_factor=2, mode=mode),
        [x],
    )


BLUR_SHAPES = [(2, 10, 7, 9), (1, 3, 15, 15), (5, 17, 4, 5)]
# filters 1-5 at strides 1 and 2 on the usual shapes, then the large filters
BLUR_CASES = [(s, f, st) for s in BLUR_SHAPES for f in (1, 2, 3, 4, 5) for st in (1, 2)] + [
    ((2, 3, 9, 8), 6, 2), ((1, 5, 4, 11), 7, 3), ((1, 3, 5, 4), 7, 1)]


@pytest.mark.parametrize("shape,filt,stride", BLUR_CASES,
                         ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c))
def test_blurpool(shape, filt, stride):
    x = torch.randn(*shape, requires_grad=True)
    check_against_torch(
        nhwc(lambda v: resample.blurpool(v, filt, stride)),
        lambda v: blurpool_ref(v, filt, stride),
        [x],
    )


def test_blurpool_defaults():
    x = torch.randn(2, 10, 9, 8, requires_grad=True)
    check_against_torch(nhwc(resample.blurpool), lambda v: blurpool_ref(v, 3, 2), [x])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blurpool_low_precision(dtype):
    x = torch.randn(2, 10, 9, 8, dtype=dtype, requires_grad=True)
    check_against_torch(nhwc(lambda v: resample.blurpool(v, 4, 2)), lambda v: blurpool_ref(v, 4, 2), [x])


def test_blur_weights():
    assert resample.blur_weights(1) == [1.0]
    assert resample.blur_weights(3) == [0.25, 0.5, 0.25]
    for f in range(1, 8):
        w = resample.blur_weights(f)
        assert len(w) == f and abs(sum(w) - 1.0) < 1e-12 and w == w[::-1]


def test_gpu_tile_choice_is_correct(monkeypatch):
    """The GPU block sizes (many small programs) run correctly too."""
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    x = torch.randn(2, 10, 6, 5, requires_grad=True)
    for mode in ("nearest", "bilinear"):
        check_against_torch(
            nhwc(lambda v: resample.upsample(v, 2, mode)), lambda v: F.interpolate(v, scale_factor=2, mode=mode), [x]
        )
    check_against_torch(nhwc(lambda v: resample.blurpool(v, 3, 2)), lambda v: blurpool_ref(v, 3, 2), [x])


@pytest.mark.parametrize("which", ["bilinear", "blurpool"])
def test_backward_is_deterministic(which):
    x = torch.randn(2, 9, 8, 10, requires_grad=True)  # NHWC
    if which == "bilinear":
        op, g = (lambda v: resample.upsample(v, 3, "bilinear")), torch.randn(2, 27, 24, 10)
    else:
        op, g = (lambda v: resample.blurpool(v, 5, 2)), torch.randn(2, 5, 4, 10)
    grads = []
    for _ in range(2):
        x.grad = None
        op(x).backward(g)
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_only_allocation_view_and_copy_ops():
    ops = [
        (lambda v: resample.upsample(v, 2, "nearest"), (2, 12, 10, 3)),
        (lambda v: resample.upsample(v, 2, "bilinear"), (2, 12, 10, 3)),
        (lambda v: resample.blurpool(v, 3, 2), (2, 3, 3, 3)),
    ]
    xs = [torch.randn(2, 6, 5, 3, requires_grad=True) for _ in ops]  # NHWC, one leaf per op
    gs = [torch.randn(*s) for _, s in ops]
    rec = OpRecorder()
    with rec:
        for (op, _), x, g in zip(ops, xs, gs):
            op(x).backward(g)
    assert all(x.grad is not None for x in xs)
    assert rec.ops, "recorder saw nothing"
    assert rec.ops <= ALLOWED_ATEN, f"compute ops used: {sorted(rec.ops - ALLOWED_ATEN)}"


def test_errors():
    x = torch.randn(1, 3, 3, 2)
    with pytest.raises(ValueError, match="factor"):
        resample.upsample(x, 1.5)
    with pytest.raises(ValueError, match="mode"):
        resample.upsample(x, 2, "bicubic")
    with pytest.raises(ValueError, match="filter size"):
        resample.blurpool(x, 8)
    with pytest.raises(ValueError, match="reflect padding"):
        resample.blurpool(x, 7)  # pad 3 >= 3
    with pytest.raises(ValueError, match="stride"):
        resample.blurpool(x, 3, 0)
    with pytest.raises(ValueError, match="contiguous"):
        resample.blurpool(torch.randn(1, 4, 4, 2).transpose(1, 2), 3)
