"""The static step estimate (engine.perf.gemm_perf): launches recorded on the meta
device, the per-launch arithmetic, the table, and `fusenet inspect --perf`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import triton

from engine.cli.main import main
from engine.kernels import autotune
from engine.kernels.conv import conv2d_dgrad, conv2d_forward, conv2d_wgrad
from engine.kernels.tune_config import Config
from engine.perf.gemm_perf import (H100_SXM, Estimate, StepPerf, VariantPerf, estimate_launch, estimate_other,
                                   format_perf,
                                   record_launches)
from engine.perf.sass import MainLoop

ROOT = Path(__file__).resolve().parents[2]


def _loop(instructions=100.0, macs=65536.0, smem=0.0, loops=1):
    return MainLoop(loops=loops, instructions=instructions, mma=4, mma_opcode="HGMMA.64x64x16.F32.BF16",
                    macs_per_warp=macs, smem_per_warp=smem, loads={"async16": 8}, opcodes={})


def test_estimate_arithmetic():
    dev = H100_SXM
    # 200 programs on 132 SMs: 2 waves; 10 trips of 100 instructions + 500 outside the loop, 4 warps
    e = estimate_launch(_loop(), instructions=600, num_warps=4, programs=200, trips=10, nbytes=3.35e6, dev=dev)
    assert e.issue_s == pytest.approx(2 * (100 * 10 + 500) * 4 / 4 / dev.clock_hz)
    assert e.tensor_s == pytest.approx(2 * 10 * 65536 * 4 / 2048 / dev.clock_hz)
    assert e.hbm_s == pytest.approx(1e-6)
    assert e.seconds == max(e.issue_s, e.tensor_s, e.hbm_s) and e.bound == "issue"
    # shared-memory reads over 128 B/clock when they take longer than the MMAs
    slow = estimate_launch(_loop(smem=65536 / 8), 600, 4, 132, 10, 0, dev)
    assert slow.tensor_s == pytest.approx(10 * 65536 / 8 * 4 / 128 / dev.clock_hz)
    # no loop: the whole kernel is one trip whatever the trip count says
    flat = estimate_launch(_loop(instructions=900, loops=0), 900, 4, 1, 7, 0, dev)
    assert flat.issue_s == pytest.approx(900 * 4 / 4 / dev.clock_hz)
    assert dev.tensor_macs_per_clock * 2 * dev.sms * dev.clock_hz == pytest.approx(989e12, rel=1e-3)


def test_record_launches_of_a_conv_on_meta():
    x = torch.empty(8, 15, 15, 64, dtype=torch.bfloat16, device="meta")
    w = torch.empty(96, 64, 3, 3, device="meta")
    dy = torch.empty(8, 15, 15, 96, dtype=torch.bfloat16, device="meta")
    geo = dict(stride=1, padding=1, dilation=1, groups=1)

    def run():
        conv2d_forward(x, w, padding=1, stats=True)
        conv2d_dgrad(dy, w, x.shape, **geo)
        conv2d_wgrad(x, dy, w.shape, **geo)

    with autotune.forced(Config(64, 64, 32, num_warps=4, num_stages=3)):
        launches = record_launches(run)
    by = {la.spec.name: la for la in launches}
    fwd, dgrad, wgrad = by["_conv_fwd_kernel"], by["_conv_dgrad_kernel"], by["_conv_wgrad_kernel"]
    M = 8 * 15 * 15
    assert fwd.programs == triton.cdiv(M, 64) * triton.cdiv(96, 64) and fwd.trips == 9 * 2  # 9 taps x 2 chunks
    assert dgrad.programs == triton.cdiv(M, 64) * triton.cdiv(64, 64) and dgrad.trips == 9 * 3
    assert wgrad.trips >= 1 and wgrad.programs % (9 * 1 * 2) == 0  # taps x channel chunks x Cout tiles, x S
    assert fwd.bytes >= (x.numel() + M * 96) * 2  # x read, y written at least
    # split: the last split of each tile sums them into PyTorch's layout (small tiles), no second launch
    assert wgrad.programs > 9 * 1 * 2 and dict(wgrad.spec.constexprs)["TAIL"] and "_sum_to_torch_kernel" not in by
    from engine.kernels.conv import wgrad as conv_wgrad

    with autotune.forced(Config(64, 64, 32, num_warps=4, num_stages=3)), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(conv_wgrad, "WGRAD_TAIL_BYTES", 0)
        by = {la.spec.name: la for la in record_launches(run)}
    assert by["_sum_to_torch_kernel"].trips is None  # the split fold into PyTorch's layout: not a GEMM


def _variant(name, ratio_instrs, fast=True, launches=1, seconds=1e-6):
    rep = type("R", (), dict(name=name, target="sm_90", spills=0, smem=65536, regs=128, num_warps=4, num_stages=3,
                             spec=type("S", (), dict(constexprs=(("BLOCK_M", 64), ("BLOCK_N", 64))))()))()
    loop = _loop(instructions=ratio_instrs * 65536 / 512)
    if not fast:
        loop.loads = {"scalar": 4}
    return VariantPerf(rep, loop, estimates=[Estimate(seconds, 0, 0)] * launches, args={})


def test_summary_and_table():
    perf = StepPerf("toy", 1024, "bf16", H100_SXM,
                    [_variant("_conv_fwd_kernel", 0.5), _variant("_conv_wgrad_kernel", 2.0, fast=False, launches=2),
                     _variant("_conv_dgrad_kernel", 0.25), _variant("_linear_fwd_kernel", 9.0)],
                    other_gemm_launches=0, non_gemm_s=2e-6, non_gemm_launch_bytes=10**6, floor_s=5e-6,
                    others=[Estimate(3e-6, 0, 1e-6), Estimate(0, 0, 1e-6)])
    s = perf.summary()
    assert s["recorded_us"] == pytest.approx(4) and s["recorded_step_us"] == pytest.approx(5 + 4)
    assert s["conv_variants"] == 3 and s["ratio_median"] == pytest.approx(0.5) and s["ratio_worst"] == 2.0
    assert s["fast"] == 2 and s["step_us"] == pytest.approx(5 + 2) and s["step_over_floor"] == pytest.approx(7 / 5)
    text = format_perf(perf)
    assert "issue/tensor" in text and "conv wgrad" in text and "linear fwd" in text
    assert "1.40x the analytic floor" in text and "median 0.50, worst 2.00; 2/3 on HGMMA" in text
    assert "non-GEMM as recorded" in text and "(2 launches" in text


def test_a_launch_without_a_main_loop_at_its_issue_or_bytes():
    # 264 programs on 132 SMs: 2 waves of 1,000 instructions x 4 warps x N_ITER 3 over 4 issue slots
    e = estimate_other(1000, 4, 264, 3, 0)
    assert e.issue_s == pytest.approx(2 * 1000 * 3 * 4 / 4 / H100_SXM.clock_hz) and e.bound == "issue"
    assert estimate_other(1000, 4, 1, 1, 10**9).bound == "hbm"


@pytest.mark.slow
def test_inspect_perf_cli(capsys):
    assert main(["inspect", str(ROOT / "examples" / "digits.cnn"), "--perf", "--batch", "64"]) == 0
    out = capsys.readouterr().out
    assert "digits: GEMM main loops on sm_90" in out and "conv fwd" in out and "conv wgrad" in out
    assert "estimated step" in out and "analytic floor" in out and "conv main loops: issue/tensor median" in out
