"""The analytic model of `fusenet bench` (what runs without a GPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import engine
from engine.perf.analytic import H100, analytic_report, format_analytic
from engine.cli import main

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.cnn"))
DIGITS = next(p for p in EXAMPLES if p.stem == "digits")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_fusion_never_adds_work_and_saves_traffic(path):
    report = analytic_report(engine.load(path), 256, "bf16")
    fused, unfused = report["fused"], report["unfused"]
    assert fused["forward"]["flops"] == unfused["forward"]["flops"] == sum(k["flops"] for k in report["kernels"])
    assert fused["kernels"] <= unfused["kernels"]
    assert fused["step"]["bytes"] <= unfused["step"]["bytes"]
    assert fused["step"]["flops"] > 2 * fused["forward"]["flops"]  # backward of GEMMs is two GEMMs
    if fused["kernels"] < unfused["kernels"]:
        assert fused["forward"]["bytes"] < unfused["forward"]["bytes"]


def test_roofline_floor_is_the_larger_of_compute_and_memory_time():
    report = analytic_report(engine.load(EXAMPLES[0]), 1024, "bf16")
    for k in report["kernels"]:
        compute = k["flops"] / H100["flops_per_s"]["bf16"]
        memory = k["bytes"] / H100["hbm_bytes_per_s"]
        assert k["floor_us"] == pytest.approx(1e6 * max(compute, memory))
        assert k["bound"] == ("compute" if compute > memory else "memory")


def test_digits_numbers_by_hand():
    # conv 1->16 3x3 pad 1 on 8x8, batch 2, fp32: 2*16*8*8*9 FLOPs per image;
    # bytes: input 1*8*8, weights+bias (16*9+16)*4 B, output 16*8*8
    report = analytic_report(engine.load(DIGITS), 2, "fp32")
    first = report["kernels"][0]
    assert first["flops"] == 2 * (2 * 16 * 64 * 9)
    assert first["bytes"] == 2 * 64 * 4 + (16 * 9 + 16) * 4 + 2 * 16 * 64 * 4


def test_bench_cli_without_gpu_prints_the_model_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(DIGITS), "--batch", "64,256", "--json", str(out), "--no-inspect"]) == 0
    captured = capsys.readouterr()
    assert "timings need a CUDA GPU" in captured.err
    assert "training step fused" in captured.out and "roofline" in captured.out
    data = json.loads(out.read_text())  # a document `fusenet bench FILE.json` reads back (test_run_outputs.py)
    assert data["kind"] == "fusenet-analytic" and [r["batch"] for r in data["reports"]] == [64, 256]
    assert format_analytic(data["reports"][0]).splitlines()[0].startswith("digits: analytic model")


def test_bench_cli_rejects_bad_batch_as_a_usage_error(capsys):
    assert main(["bench", str(DIGITS), "--batch", "0,x"]) == 2
    assert "positive integers" in capsys.readouterr().err


def test_bench_cli_without_gpu_appends_the_static_sm90_report(capsys):
    assert main(["bench", str(DIGITS), "--batch", "8"]) == 0  # the static report is on by default
    out = capsys.readouterr().out
    assert "static sm_90 report (training step, batch 8, fp32)" in out
    assert "_conv_fwd_kernel" in out and "0 failed to compile, 0 spill" in out


def test_bench_layers_defaults_to_the_shipped_workloads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # from any folder
    assert main(["bench", "--layers"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("per-layer analytic model, bf16") and "N=1024" in out
    assert main(["bench", "--layers", "benchmarks/workloads.toml", "--batch", "8"]) == 0
    assert "N=8" in capsys.readouterr().out


def test_bench_without_a_file_is_a_usage_error(capsys):
    assert main(["bench"]) == 2
    assert "fusenet bench: error: give the FILE to benchmark" in capsys.readouterr().err


def test_the_contenders_of_a_detection_network_train_on_its_loss():
    """bench on a `loss centernet` spec: CenterNet targets in the input pool; fusenet runs the fused
    CenterNet loss, the PyTorch contenders the reference; same weights, same loss."""
    import torch

    from engine.perf.bench.contenders import InputPool, build

    source = next(p for p in EXAMPLES if p.stem == "detect_shapes")
    spec = engine.load(source)
    pool = InputPool.make(spec, 2, 1, torch.device("cpu"))
    state = engine.compile(source, backend="torch").state_dict()
    eager, fused = (build(name, str(source), state, "fp32", pool) for name in ("eager", "fusenet"))
    assert float(fused.step(0)) == pytest.approx(float(eager.step(0)), rel=1e-4)
