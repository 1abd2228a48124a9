"""engine/kernels/common.py: the shared helpers (powers of two, pairs, checks,
tile plans), and engine/kernels/reduction.py: the deterministic partial-sum reductions."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import engine.device
from engine.kernels import common, reduction
from engine.kernels.launch import recording


def test_powers_of_two():
    assert [common.next_pow2(n) for n in (-3, 0, 1, 2, 3, 64, 65)] == [1, 1, 1, 2, 4, 64, 128]
    assert common.next_pow2(3, 16, 256) == 16 and common.next_pow2(1000, 16, 256) == 256
    assert common.next_pow2(100, hi=64) == 64
    assert [common.prev_pow2(n) for n in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 2, 64, 64]


def test_pair():
    assert common.pair(3, "k") == (3, 3) and common.pair((1, 2), "k") == (1, 2)
    for bad in (1.5, (1, 2, 3), "ab", None, (1.0, 2)):
        with pytest.raises(ValueError, match="k must be an int or a pair of ints"):
            common.pair(bad, "k")


def test_checks():
    common.check_activation(torch.randn(3))
    common.check_nhwc(torch.randn(1, 2, 2, 3))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        common.check_activation(torch.randn(3).double())
    with pytest.raises(ValueError, match="4-D"):
        common.check_nhwc(torch.randn(2, 3))
    with pytest.raises(ValueError, match="contiguous"):
        common.check_nhwc(torch.randn(1, 2, 3, 4).transpose(1, 2))
    with pytest.raises(ValueError, match="output shape"):
        common.check_grad(torch.randn(1, 2, 2, 3), (1, 2, 2, 4))
    x = torch.randn(2, 4)
    common.check_param(None, 4, x, "w", optional=True)
    with pytest.raises(ValueError, match="shape \\[4\\]"):
        common.check_param(torch.randn(3), 4, x, "w")


def test_sum_partials_deterministic_fixed_order():
    p = torch.randn(300, 70)
    q = torch.randn(300, 70)
    a1, b1 = reduction.sum_partials(p, q)
    a2, b2 = reduction.sum_partials(p, q)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert_close(a1, p.double().sum(0))
    assert_close(b1, q.double().sum(0))


@pytest.mark.parametrize("interpreted", [True, False])
def test_sum_partials_one_row_at_a_time_is_a_running_sum(interpreted, monkeypatch):
    # block=B (the split-K slices of a weight gradient): out = ((p0 + p1) + p2) + ... per column
    monkeypatch.setattr(engine.device, "INTERPRETED", interpreted)
    p = torch.randn(5, 1000) * torch.logspace(-3, 3, 5)[:, None]
    with recording() as specs:
        out = reduction.sum_partials(p, block=256)
    running = p[0].clone()
    for row in p[1:]:
        running += row
    assert torch.equal(out, running)
    (spec,) = specs
    assert dict(spec.constexprs)["BLOCK_T"] == 1 and dict(spec.constexprs)["BLOCK_C"] == 256


@pytest.mark.parametrize("interpreted", [True, False])
def test_tall_partials_fold_in_parallel(interpreted, monkeypatch):
    # on a GPU, sum_partials folds more than FOLD_ROWS rows first (many programs), then sums the rest
    monkeypatch.setattr(engine.device, "INTERPRETED", interpreted)
    pa, pb = torch.randn(common.FOLD_ROWS * 3 + 7, 19), torch.randn(common.FOLD_ROWS * 3 + 7, 19)
    folded_a, folded_b = reduction.fold_partials(pa, pb, rows=40)
    assert folded_a.shape[0] <= 40 and folded_a.shape == folded_b.shape
    assert_close(folded_a.sum(0), pa.double().sum(0), what="fold keeps the sum")
    with recording() as specs:
        a, b = reduction.sum_partials(pa, pb)
    assert ("_fold_partials_kernel" in {s.name for s in specs}) == (not interpreted)
    assert_close(a, pa.double().sum(0), what="a")
    assert_close(b, pb.double().sum(0), what="b")
    again = reduction.sum_partials(pa, pb)
    assert torch.equal(again[0], a) and torch.equal(again[1], b)  # fixed order: bit-identical


def test_pad_channels():
    from engine.kernels.layout import channel_multiple, pad_channels, padded_channels

    assert [channel_multiple(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == [4, 8, 8]
    assert padded_channels(3, torch.bfloat16) == 8 and padded_channels(24, torch.bfloat16) == 24
    x = torch.randn(2, 5, 3, 3)
    y = pad_channels(x, 8)
    assert y.shape == (2, 5, 3, 8) and torch.equal(y[..., :3], x) and not y[..., 3:].any()
    with pytest.raises(ValueError, match="cannot pad"):
        pad_channels(x, 2)


def test_ticket_counters_are_one_zeroed_int32_workspace_per_device():
    # last_to_arrive's counters: allocated (zeroed) once, then the same memory every launch (CUDA-graph
    # safe: no fill per step); a larger request replaces it with a larger zeroed one
    a = reduction.ticket_counters("cpu", 5)
    b = reduction.ticket_counters(torch.device("cpu"), 7)
    assert a.dtype == torch.int32 and a.shape == (5,) and b.shape == (7,)
    assert a.data_ptr() == b.data_ptr() and not b.any()
    big = reduction.ticket_counters("cpu", reduction.MIN_TICKETS + 1)
    assert big.numel() == reduction.MIN_TICKETS + 1 and not big.any()
    assert reduction.ticket_counters("cpu", 3).data_ptr() == big.data_ptr()
    meta = reduction.ticket_counters("meta", 4)  # the dry run's launches allocate theirs on the meta device
    assert meta.device.type == "meta" and meta.shape == (4,)


def test_fold_plan_reads_the_partials_target_at_call_time(monkeypatch):
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    monkeypatch.setattr(common, "GPU_TARGET_PARTIALS", 10)
    R, T2, bt, bc = reduction.fold_plan(1000, 70)
    assert (R, T2, bc) == (100, 10, 64) and bt == 32 and T2 * R >= 1000
