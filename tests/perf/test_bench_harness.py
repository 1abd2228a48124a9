"""The timing harness of `fusenet bench`: timing rules, contenders and their
output checks, per-layer comparisons, and the results' table, JSON and chart
views (on recorded sample data and on live CPU runs; CPU timings here test
the harness, never speed). The same harness on CUDA is the gpu-marked tests."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

import engine
import engine.perf.analytic
from engine.cli import bench as bench_cli
from engine.perf.bench import results
from engine.perf.bench.contenders import InputPool, build
from engine.perf.bench.devices import device_info, mfu, peaks_for
from engine.perf.bench.layers import (ConvShape, FusedSteps, analytic_layers, bench_layers, shapes_from_spec,
                                 shapes_from_workloads)
from engine.perf.bench.network import bench_network
from engine.perf.bench.timing import Timing, measure, rotation_slots
from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits.cnn"
SAMPLE = Path(__file__).parent / "data" / "bench_sample_cpu.json"
WORKLOADS = ROOT / "benchmarks" / "workloads.toml"
QUIET = dict(log=lambda msg: None)


# --------------------------------------------------------------------------- timing
def test_timing_median_and_percentiles():
    t = Timing.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.repeats) == (3.0, 2.0, 4.0, 5)


def test_rotation_overflows_l2_twice_within_bounds():
    assert rotation_slots(10 * 2**20, 50 * 2**20) == 10
    assert rotation_slots(1, 50 * 2**20) == 16  # tiny inputs: capped
    assert rotation_slots(10**9, 50 * 2**20) == 2  # huge inputs: at least two


def test_measure_warms_up_then_times_every_repeat_with_its_own_index():
    calls = []
    t = measure(calls.append, torch.device("cpu"), warmup=3, repeats=7)
    assert calls == list(range(10)) and t.repeats == 7


def test_measure_caps_slow_contenders_by_the_warmup_pace():
    import time

    t = measure(lambda i: time.sleep(0.01), torch.device("cpu"), warmup=3, repeats=1000, max_seconds=0.1)
    assert 5 <= t.repeats <= 20


# --------------------------------------------------------------------------- devices
def test_peaks_known_devices_and_no_guess_for_others():
    assert peaks_for("NVIDIA H100 80GB HBM3")["name"] == "H100 SXM"
    assert peaks_for("NVIDIA H100 PCIe")["name"] == "H100 PCIe"
    assert peaks_for("NVIDIA H200")["flops_per_s"]["bf16"] == 989e12
    assert peaks_for("Some Future GPU") is None
    info = {"peaks": peaks_for("NVIDIA H100 80GB HBM3")}
    assert mfu(989e12 / 2, 1.0, "bf16", info) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, "bf16", {"peaks": None}) is None
    cpu = device_info("cpu")
    assert cpu["type"] == "cpu" and cpu["peaks"] is None and cpu["torch"] == torch.__version__


# --------------------------------------------------------------------------- contenders and checks
def test_contenders_start_from_the_same_weights_and_agree():
    spec = engine.load(DIGITS)
    pool = InputPool.make(spec, 4, 2, torch.device("cpu"))
    assert len(pool.x) == 2 and pool.y[0].shape == (4,) and pool.x[0].shape == (4, 1, 8, 8)
    assert InputPool.slot_bytes(spec, 4) == sum(t.numel() * t.element_size() for t in (pool.x[0], pool.y[0]))
    state = engine.compile(DIGITS, backend="torch").state_dict()
    ours, eager = build("fusenet", DIGITS, state, "fp32", pool), build("eager", DIGITS, state, "fp32", pool)
    assert ours.label == "fusenet" and eager.label == "PyTorch eager"
    assert eager.pool.x[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours.output(1), eager.output(1), rtol=1e-4, atol=1e-5)
    ours.train(True)
    eager.train(True)
    assert float(ours.step(0)) == pytest.approx(float(eager.step(0)), rel=1e-4)


def test_bench_network_on_cpu_rows_flops_and_checks():
    rows = bench_network(DIGITS, [4], "fp32", contenders=("fusenet", "eager"), warmup=1, repeats=2, slots=2, **QUIET)
    assert len(rows) == 4  # 2 contenders x 2 modes, no CUDA graphs on CPU
    analytic = engine.perf.analytic.analytic_report(engine.load(DIGITS), 4, "fp32")["fused"]
    for r in rows:
        assert "error" not in r and r["check"]["ok"] and not r["graphs"]
        assert r["flops"] == analytic[r["mode"]]["flops"]
        assert r["images_per_s"] == pytest.approx(4 / (r["ms"] / 1e3))
        assert r["mfu"] is None  # no peak table for a CPU
    eager = next(r for r in rows if r["contender"] == "eager")
    assert eager["check"]["rel_err"] < 1e-5 and eager["check"]["loss_rel_err"] < 1e-5


def test_a_wrong_baseline_is_flagged_not_reported_as_a_win(monkeypatch):
    import engine.perf.bench.network as net

    real_build = net.build

    def broken_build(name, *a, **k):
        c = real_build(name, *a, **k)
        if name == "eager":  # a baseline that computes something else
            with torch.no_grad():
                next(c.model.parameters()).mul_(3.0)
        return c

    monkeypatch.setattr(net, "build", broken_build)
    rows = bench_network(DIGITS, [4], "fp32", contenders=("fusenet", "eager"), modes=("forward",),
                         warmup=1, repeats=2, slots=2, **QUIET)
    eager = next(r for r in rows if r["contender"] == "eager")
    assert not eager["check"]["ok"] and eager["check"]["rel_err"] > eager["check"]["tol"]
    doc = {**results.new_document(device_info("cpu")), "networks": rows}
    assert not results.speedups(rows)  # no speedup is derived from a mismatch
    assert "MISMATCH" in results.format_document(doc)


def test_a_contender_that_fails_to_build_is_reported_and_the_rest_run(monkeypatch):
    import engine.perf.bench.network as net

    real_build = net.build

    def build(name, *a, **k):
        if name == "eager":
            raise RuntimeError("no cuDNN today")
        return real_build(name, *a, **k)

    monkeypatch.setattr(net, "build", build)
    rows = bench_network(DIGITS, [2], "fp32", contenders=("fusenet", "eager"), modes=("forward",),
                         warmup=1, repeats=2, slots=2, **QUIET)
    assert "ms" in rows[0] and "no cuDNN today" in rows[1]["error"]
    assert "failed" in results.format_networks({"networks": rows})


# --------------------------------------------------------------------------- layers
def test_workloads_file_holds_the_seven_airbench_shapes_at_n1024():
    shapes = shapes_from_workloads(WORKLOADS)
    assert len(shapes) == 7 and {s.n for s in shapes} == {1024}
    assert [(s.cin, s.cout, s.h) for s in shapes] == [(24, 64, 31), (64, 64, 15), (64, 256, 15), (256, 256, 7),
                                                        (256, 256, 3), (256, 512, 7), (512, 512, 3)]
    assert shapes_from_workloads(WORKLOADS, batch=8)[0].n == 8


def test_malformed_workloads_entry_names_the_entry(tmp_path):
    bad = tmp_path / "w.toml"
    bad.write_text("[[layer]]\nn = 2\ncin = 3\n")
    with pytest.raises(ValueError, match=r"entry 1 is malformed.*cout"):
        shapes_from_workloads(bad)


def test_shapes_from_spec_are_distinct_convs_with_their_fused_epilogue():
    shapes = shapes_from_spec(engine.load(ROOT / "examples" / "resnet_small.cnn"), 8)
    assert len(shapes) == len({s.describe() + str(s.epilogue) for s in shapes})
    assert all(s.n == 8 for s in shapes)
    assert any(s.epilogue.residual for s in shapes) and shapes[0].epilogue.words() == ("bn", "act:relu")


def test_conv_shape_geometry_and_flops():
    s = ConvShape("x", 2, 6, 4, 9, 7, kernel=(3, 3), stride=(2, 2), pad=(1, 1), groups=2)
    assert s.out_hw == (5, 4)
    assert s.flops == 2 * 2 * 5 * 4 * 4 * 3 * 9


def test_bench_layers_on_cpu_checks_every_op_against_aten():
    shapes = [ConvShape("a", 2, 5, 7, 9, 8, bias=True, epilogue=FusedSteps.parse(["bias", "bn", "add", "act:gelu"])),
              ConvShape("b", 3, 6, 6, 7, 7, stride=(2, 2), groups=3)]
    rows = bench_layers(shapes, "fp32", device="cpu", warmup=1, repeats=2, **QUIET)
    assert [r["op"] for r in rows] == ["forward", "dgrad", "wgrad", "fused conv+bias+bn+add+act:gelu",
                                       "forward", "dgrad", "wgrad"]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["check"]["ok"], r
        assert r["speedup"] == pytest.approx(r["cudnn"]["ms"] / r["fusenet"]["ms"])
        assert r["fusenet"]["tflops"] == pytest.approx(r["flops"] / (r["fusenet"]["ms"] / 1e3) / 1e12)


def test_analytic_layers_by_hand():
    s = ConvShape("x", 2, 4, 8, 6, 6)
    fwd, dgrad, wgrad = analytic_layers([s], "bf16")
    x, y, w = 2 * 36 * 4 * 2, 2 * 36 * 8 * 2, 8 * 4 * 9 * 2
    assert fwd["bytes"] == x + w + y and dgrad["bytes"] == x + w + y and wgrad["bytes"] == x + y + 2 * w
    assert fwd["flops"] == 2 * 2 * 36 * 8 * 4 * 9 and fwd["bound"] == "memory"


# --------------------------------------------------------------------------- results: table, JSON, chart
def _row(contender, graphs, ms, mode="step", ok=True):
    return {"network": "net", "batch": 256, "precision": "bf16", "mode": mode, "contender": contender,
            "label": contender, "graphs": graphs, "ms": ms, "images_per_s": 256e3 / ms, "tflops": 1.0,
            "mfu": 0.25, "check": {"ok": ok, "rel_err": 1e-3 if ok else 0.5, "tol": 0.06}}


def test_speedups_compare_like_with_like():
    rows = [_row("fusenet", False, 10.0), _row("fusenet", True, 5.0), _row("eager", False, 15.0),
            _row("eager", True, 20.0), _row("compile", False, 8.0), _row("compile", True, 4.0, ok=False)]
    ratio = results.speedups(rows)
    assert ratio[("net", 256, "bf16", "step", False, "eager")] == 1.5
    assert ratio[("net", 256, "bf16", "step", True, "eager")] == 4.0
    assert ratio[("net", 256, "bf16", "step", False, "compile")] == 0.8
    assert ("net", 256, "bf16", "step", True, "compile") not in ratio  # failed its check
    text = results.format_networks({"networks": rows})
    assert "1.50x" in text and "4.00x" in text and "0.80x" in text and "MISMATCH" in text and "25.0%" in text


def test_recorded_sample_renders_tables_json_and_charts(tmp_path):
    doc = results.load(SAMPLE)
    text = results.format_document(doc)
    assert results.CPU_CAVEAT in text
    assert "digits  training step  batch 64  fp32" in text and "torch.compile" in text
    assert "per-layer, fp32" in text and "fused conv+bn+act:gelu" in text
    results.save(doc, tmp_path / "again.json")
    assert results.load(tmp_path / "again.json") == doc
    charts = results.plot(doc, tmp_path)
    assert sorted(p.name for p in charts) == ["digits_fp32.png", "layers_fp32.png"]
    for p in charts:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_results_load_refuses_other_files(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json").write_text(json.dumps({"kind": "something else"}))
    (tmp_path / "c.json").write_text(json.dumps({"kind": "fusenet-bench", "version": 99}))
    for name, msg in (("a", "not a readable"), ("b", "not a fusenet bench"), ("c", "version 99")):
        with pytest.raises(ValueError, match=msg):
            results.load(tmp_path / f"{name}.json")


def test_results_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    results.save({"kind": results.KIND, "version": 1, "x": 1}, target)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(OSError):
        results.save({"kind": results.KIND, "version": 1, "x": 2}, target)
    assert json.loads(target.read_text())["x"] == 1  # the old file is intact


# --------------------------------------------------------------------------- CLI
def _args(**kw):
    base = dict(file=str(DIGITS), batch="4", precision=None, layers=False, contenders="fusenet,eager",
                no_graphs=False, warmup=1, repeats=2, max_seconds=1.0, out=None, json=None, no_inspect=True)
    return argparse.Namespace(**{**base, **kw})


def test_cli_timing_path_end_to_end_on_cpu(tmp_path, capsys):
    args = _args(out=str(tmp_path / "out"))
    assert bench_cli._with_gpu(args, [4], ("fusenet", "eager"), device="cpu") == 0
    out = capsys.readouterr().out
    assert "digits  forward (inference)  batch 4  fp32" in out and "results written to" in out
    doc = results.load(tmp_path / "out" / "results.json")
    assert {r["contender"] for r in doc["networks"]} == {"fusenet", "eager"}
    assert (tmp_path / "out" / "table.txt").read_text().startswith("device: CPU")
    assert (tmp_path / "out" / "digits_fp32.png").exists()


def test_cli_timing_path_writes_a_fresh_default_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for expected in ("runs/bench/digits", "runs/bench/digits-2"):
        assert bench_cli._with_gpu(_args(contenders="fusenet"), [2], ("fusenet",), device="cpu") == 0
        assert (tmp_path / expected / "results.json").exists() and (tmp_path / expected / "digits_fp32.png").exists()
    assert "results written to runs/bench/digits-2/" in capsys.readouterr().out


def test_cli_layers_timing_path_on_cpu(tmp_path, capsys):
    spec_file = tmp_path / "one.cnn"
    spec_file.write_text("network one {\n  input 3x6x6\n  conv 4 kernel=3 pad=1\n  bn\n  relu\n"
                         "  global_avgpool\n  linear 2\n}\n")
    args = _args(file=str(spec_file), layers=True, batch="2", precision="fp32", json=str(tmp_path / "l.json"),
                 out=str(tmp_path / "out"))
    assert bench_cli._with_gpu(args, [2], ("fusenet",), device="cpu") == 0
    doc = results.load(tmp_path / "l.json")
    assert [r["op"] for r in doc["layers"]] == ["forward", "dgrad", "wgrad", "fused conv+bias+bn+act:relu"]
    assert "per-layer, fp32" in capsys.readouterr().out


def test_cli_rerenders_a_results_file(tmp_path, capsys):
    assert main(["bench", str(SAMPLE), "--out", str(tmp_path)]) == 0
    assert "digits  training step" in capsys.readouterr().out
    assert {p.name for p in tmp_path.iterdir()} >= {"results.json", "table.txt", "digits_fp32.png", "layers_fp32.png"}


def test_cli_exits_1_when_a_result_failed_its_check(tmp_path, capsys):
    doc = results.load(SAMPLE)
    doc["networks"][1]["check"]["ok"] = False
    results.save(doc, tmp_path / "bad.json")
    assert main(["bench", str(tmp_path / "bad.json")]) == 1
    assert "a fast wrong answer is not a win" in capsys.readouterr().err


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["bench", str(DIGITS), "--contenders", "eager,tensorrt"]) == 2
    assert "--contenders" in capsys.readouterr().err
    assert main(["bench", str(WORKLOADS)]) == 2
    assert "--layers" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("[]")
    assert main(["bench", str(tmp_path / "junk.json")]) == 2
    assert "not a fusenet bench results file" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("[[layer]]\nn = 1\n")
    assert main(["bench", "--layers", str(tmp_path / "bad.toml")]) == 1
    assert "malformed" in capsys.readouterr().err


def test_cli_layers_without_gpu_prints_the_analytic_model(capsys):
    assert main(["bench", "--layers", str(WORKLOADS)]) == 0
    captured = capsys.readouterr()
    assert "timings need a CUDA GPU" in captured.err
    assert "24->64 3x3 @31x31 N=1024" in captured.out and "floor us" in captured.out


# --------------------------------------------------------------------------- the GPU suite
def test_suite_refuses_to_run_without_a_gpu(capsys):
    from engine.perf.bench import suite

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert suite.main(["--out", "/nonexistent/never-written"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_suite_merges_a_run_folder_into_one_document(tmp_path):
    from engine.perf.bench import suite

    sample = results.load(SAMPLE)
    (tmp_path / "networks").mkdir()
    results.save({**sample, "layers": []}, tmp_path / "networks" / "digits_fp32.json")
    results.save({**sample, "networks": []}, tmp_path / "layers.json")
    (tmp_path / "networks" / "broken.json").write_text("{")
    doc = suite.merge(tmp_path, sample["device"])
    assert len(doc["networks"]) == len(sample["networks"]) and len(doc["layers"]) == len(sample["layers"])
    assert (tmp_path / "results.json").exists() and (tmp_path / "table.txt").exists()
    suite._write_summary(tmp_path, doc, {"tests": {"exit": 0, "summary": "9 passed in 1.0s"}, "failed_steps": []})
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "9 passed" in summary and "![digits_fp32](digits_fp32.png)" in summary


def test_suite_reads_pytest_summaries():
    from engine.perf.bench.suite import _test_counts

    assert _test_counts("...\n===== 12 passed, 3 skipped in 4.0s =====\n") == "12 passed, 3 skipped in 4.0s"
    assert _test_counts("boom") .startswith("no pytest summary")


# --------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_harness_on_cuda_with_graphs():
    rows = bench_network(DIGITS, [32], "fp32", contenders=("fusenet", "eager"), warmup=2, repeats=5, **QUIET)
    assert len(rows) == 8  # 2 contenders x 2 modes x graphs on/off
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["check"]["ok"], r["check"]
        assert r["ms"] > 0 and r["mfu"] is None or r["mfu"] > 0


@pytest.mark.gpu
def test_layers_on_cuda_match_cudnn():
    rows = bench_layers([ConvShape("a", 8, 24, 64, 15, 15, epilogue=FusedSteps(bn=True, act="gelu"))], "bf16",
                        warmup=2, repeats=5, **QUIET)
    assert all("error" not in r and r["check"]["ok"] for r in rows), rows


def test_suite_runs_every_step_in_order_and_resumes(tmp_path, monkeypatch):
    """The orchestration of benchmarks/run_gpu.sh, with the subprocesses faked."""
    from engine.perf.bench import suite

    sample = results.load(SAMPLE)
    commands = []

    def fake_run(cmd, log_path, timeout):
        commands.append(cmd)
        log_path.write_text("===== 3 passed in 1.0s =====\n" if "pytest" in cmd else "ok\n")
        if "--json" in cmd:  # a bench step writes its results document
            part = {**sample, "networks": []} if "--layers" in cmd else {**sample, "layers": []}
            results.save(part, cmd[cmd.index("--json") + 1])
        return 0

    monkeypatch.setattr(suite, "_run", fake_run)
    monkeypatch.setattr(suite, "environment", lambda: {**sample["device"], "name": "Fake GPU"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "run"
    monkeypatch.setenv("FUSENET_TUNE_CACHE", "")  # recorded, so the value the suite sets is undone
    monkeypatch.delenv("FUSENET_TUNE_CACHE")
    assert suite.main(["--out", str(out), "--quick"]) == 0
    assert os.environ["FUSENET_TUNE_CACHE"] == str((out / "tune_cache.json").resolve())  # kept with the results
    tests, *rest = commands
    assert tests[1:4] == ["-m", "pytest", "-m"] and "gpu" in tests
    import tomllib

    networks = tomllib.loads(WORKLOADS.read_text())["network"]
    tunes = [c for c in rest if c[3] == "tune" and "--layers" not in c]
    assert sum(1 for c in rest if c[3] == "tune" and "--layers" in c) == 1  # the layer shapes, tuned too
    benches = [c for c in rest if c[3] == "bench" and "--layers" not in c]
    assert [c[4] for c in tunes] == [c[4] for c in benches] == [n["file"] for n in networks]
    assert all(c[c.index("--batch") + 1] == str(n["batch"][0]) for c, n in zip(benches, networks))  # --quick
    assert all("compile-max" not in c[c.index("--contenders") + 1] for c in benches)
    assert all(c[c.index("--out") + 1].startswith(str(out)) for c in benches)  # tables and charts stay in the run
    assert any("--layers" in c for c in rest)
    summary = (out / "SUMMARY.md").read_text()
    assert "Fake GPU" in summary and "3 passed" in summary
    merged = results.load(out / "results.json")
    assert len(merged["networks"]) == len(networks) * len(sample["networks"])
    assert merged["layers"] == sample["layers"]

    commands.clear()  # a rerun skips what is already there
    assert suite.main(["--out", str(out), "--steps", "networks,layers"]) == 0
    assert commands == []
