"""Dropout: counter-based mask regenerated in the backward, and the fusable device function."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from helpers import DATA_MOVEMENT_OPS, OpRecorder, SHAPE_OPS, assert_close

from engine.kernels import common
from engine.kernels import dropout as dr
from engine.kernels.launch import launch

ALLOWED_ATEN = DATA_MOVEMENT_OPS | SHAPE_OPS


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_mask_fraction_and_scale(p):
    x = torch.ones(16, 7, 9, 70)  # 70560 elements: std of the fraction <= 0.0019
    y = dr.dropout(x, p, seed=1234)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 0.01, dropped
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1.0 / (1.0 - p)))


def test_backward_uses_same_mask():
    x = (torch.rand(2, 7, 9, 17) + 0.5).requires_grad_()  # nonzero inputs
    y = dr.dropout(x, 0.4, seed=7)
    g = torch.randn_like(y)
    y.backward(g)
    ratio = y.detach() / x.detach()  # 0 where dropped, 1/(1-p) where kept
    assert_close(x.grad, g * ratio)
    assert ((y == 0) == (x.grad == 0)).all()


def test_many_blocks(monkeypatch):
    monkeypatch.setattr(common, "INTERP_BLOCK_1D", 128)
    x = torch.randn(3, 5, 7, 10)
    y_small = dr.dropout(x, 0.3, seed=99)
    monkeypatch.setattr(common, "INTERP_BLOCK_1D", 1 << 16)
    y_big = dr.dropout(x, 0.3, seed=99)
    assert torch.equal(y_small, y_big)  # mask depends only on (seed, flat index)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half(dtype):
    x = torch.randn(2, 7, 9, 10).to(dtype)
    y = dr.dropout(x, 0.5, seed=3)
    y32 = dr.dropout(x.float(), 0.5, seed=3)
    assert y.dtype == dtype
    assert torch.equal(y == 0, y32 == 0)
    assert_close(y, y32.to(torch.float64), dtype)


def test_identity_cases():
    x = torch.randn(2, 3, 3, 5, requires_grad=True)
    assert dr.dropout(x, 0.0, seed=1) is x
    assert dr.dropout(x, 0.5, seed=1, training=False) is x


def test_p_one_gives_zeros():
    x = torch.randn(2, 3, 3, 5, requires_grad=True)
    y = dr.dropout(x, 1.0, seed=1)
    assert (y == 0).all()
    y.backward(torch.ones_like(y))
    assert (x.grad == 0).all()


def test_same_seed_same_output_different_seed_differs():
    x = torch.randn(2, 7, 9, 17)
    a = dr.dropout(x, 0.5, seed=11)
    b = dr.dropout(x, 0.5, seed=11)
    c = dr.dropout(x, 0.5, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_validation():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="probability"):
        dr.dropout(x, 1.5, seed=0)
    with pytest.raises(ValueError, match="seed"):
        dr.dropout(x, 0.5, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        dr.dropout(x, 0.5, seed=2**31)


@triton.jit
def _fused_epilogue_kernel(x_ptr, y_ptr, M, C, seed, p, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # what a conv/linear epilogue does with its [BLOCK_M, BLOCK_C] output tile
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < M) & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]  # int32 flat index in the contiguous output
    acc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = dr.dropout_mask_scale(acc, seed, offs, p)
    tl.store(y_ptr + offs, acc, mask=mask)


def test_fused_device_function_matches_standalone():
    x = torch.randn(2, 7, 9, 17)
    M, C = 2 * 7 * 9, 17
    y = torch.empty_like(x)
    launch(_fused_epilogue_kernel, (triton.cdiv(M, 32), triton.cdiv(C, 8)), x, y, M, C, 5, 0.25,
           BLOCK_M=32, BLOCK_C=8)
    assert torch.equal(y, dr.dropout(x, 0.25, seed=5))


def test_no_torch_compute_ops_forward_backward():
    x = torch.randn(2, 7, 9, 10, requires_grad=True)
    g = torch.randn(2, 7, 9, 10)
    rec = OpRecorder()
    with rec:
        dr.dropout(x, 0.3, seed=21).backward(g)
    bad = rec.ops - ALLOWED_ATEN
    assert not bad, f"torch compute ops used: {sorted(bad)}"
    assert x.grad is not None


# ----------------------------------------------------------------------------- seeds from the step clock


def _clock(base: int, step: int) -> torch.Tensor:
    return torch.tensor([base, step], dtype=torch.int64)


def test_clock_seed_draws_per_step_and_site_and_backward_uses_the_recorded_seed():
    x = (torch.rand(2, 7, 9, 17) + 0.5).requires_grad_()
    counters = _clock(123, 4)
    seed = dr.ClockSeed(counters, site=3)
    y = dr.dropout(x, 0.4, seed)
    drawn = int(seed.used.item())
    assert 0 <= drawn < 2**31 and torch.equal(y, dr.dropout(x.detach(), 0.4, drawn))  # the mask of the drawn seed
    counters[1] += 1  # the loss advances the clock between forward and backward
    g = torch.randn_like(y)
    y.backward(g)
    assert_close(x.grad, g * (y.detach() / x.detach()), what="backward mask")
    # the same (base, step, site) draws the same seed; another step or site another one
    again = dr.ClockSeed(_clock(123, 4), 3)
    assert torch.equal(dr.dropout_forward(x.detach(), 0.4, again), y.detach())
    for other in (dr.ClockSeed(_clock(123, 5), 3), dr.ClockSeed(_clock(123, 4), 4), dr.ClockSeed(_clock(124, 4), 3)):
        assert not torch.equal(dr.dropout_forward(x.detach(), 0.4, other), y.detach())


def test_clock_seed_launches_identical_arguments_at_every_step():
    """What makes a captured step valid: nothing per step is a host scalar of the launch."""
    x = torch.randn(4, 33)
    counters = _clock(7, 0)
    args = []
    with launch_mod_observing(lambda kernel, a: args.append(tuple(v for v in a if not isinstance(v, torch.Tensor)))):
        for step in range(3):
            counters[1] = step
            dr.dropout_forward(x, 0.3, dr.ClockSeed(counters, 1))
    assert args[0] == args[1] == args[2]


def launch_mod_observing(fn):
    from engine.kernels.launch import observing

    return observing(fn)


def test_clock_seed_validation():
    with pytest.raises(ValueError, match="counters"):
        dr.ClockSeed(torch.zeros(2), 0)
    with pytest.raises(RuntimeError, match="before its forward"):
        dr.dropout_backward(torch.randn(3, 4), 0.5, dr.ClockSeed(_clock(1, 1), 0))
