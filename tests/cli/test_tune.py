"""`fusenet tune`: the message and exit status without a GPU, and `--show` on
an empty and a filled cache. The cache lives under tmp_path (FUSENET_TUNE_CACHE)."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main
from engine.device import HAS_CUDA
from engine.kernels.tune_cache import TuneCache
from engine.kernels.tune_config import Config

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "examples" / "digits.cnn")


@pytest.fixture(autouse=True)
def tune_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "tune.json"
    monkeypatch.setenv("FUSENET_TUNE_CACHE", str(path))
    monkeypatch.delenv("FUSENET_TUNE", raising=False)
    return path


def _fill(path: Path) -> None:
    cache = TuneCache(path)
    for kernel, cfg, ms in (("conv2d_fwd", Config(128, 64, 32, num_warps=4, num_stages=4), 0.0123),
                            ("linear_wgrad", Config(64, 32, 32, num_warps=4, num_stages=4, split=6), 0.0045)):
        key = f"{kernel}|M=4096,N=64,K=288|bfloat16|NVIDIA H100 80GB HBM3 (sm_90)|triton-3.6.0"
        cache.put(key, {"kernel": kernel, "shape": {"M": 4096, "N": 64, "K": 288}, "dtype": "bfloat16",
                        "device": "NVIDIA H100 80GB HBM3 (sm_90)", "triton": "3.6.0", "config": cfg.to_json(),
                        "ms": ms, "default_ms": 2 * ms})


@pytest.mark.skipif(HAS_CUDA, reason="the no-GPU message")
def test_tune_without_gpu_says_why_and_exits_1(tune_cache, capsys):
    _fill(tune_cache)
    assert main(["tune", DIGITS]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "CUDA GPU" in err and "times the kernels" in err
    assert f"{tune_cache} (2 entries" in err
    assert "Traceback" not in err


def test_tune_usage_errors(capsys):
    assert main(["tune"]) == 2
    assert "give the network FILE" in capsys.readouterr().err
    assert main(["tune", DIGITS, "--batch", "64,zero"]) == 2
    assert "--batch" in capsys.readouterr().err


def test_tune_invalid_program(tmp_path, capsys):
    bad = tmp_path / "bad.cnn"
    bad.write_text("network n {\n    input 3x8x8\n    cnov 16 kernel=3\n}\n")
    assert main(["tune", str(bad)]) == 1
    assert "unknown layer 'cnov'" in capsys.readouterr().err


def test_show_empty_cache(tune_cache, capsys):
    assert main(["tune", "--show"]) == 0
    out, err = capsys.readouterr()
    assert f"autotune cache {tune_cache}: no entries" in out and err == ""
    assert not tune_cache.exists()


def test_show_filled_cache(tune_cache, capsys):
    _fill(tune_cache)
    assert main(["tune", DIGITS, "--show"]) == 0  # FILE is allowed and not needed
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"autotune cache {tune_cache}: 2 entries"
    assert lines[1].split() == ["kernel", "shape", "dtype", "device", "config", "ms", "default", "ms"]
    assert set(lines[2]) == {"-"}
    rows = lines[3:]
    assert len(rows) == 2
    assert rows[0].startswith("conv2d_fwd") and "128x64x32 w4 s4" in rows[0] and "0.0123" in rows[0]
    assert rows[1].startswith("linear_wgrad") and "split6" in rows[1] and "M=4096 N=64 K=288" in rows[1]
    assert "NVIDIA H100 80GB HBM3 (sm_90)" in rows[0] and err == ""


def test_show_corrupt_cache_warns_and_lists_nothing(tune_cache, capsys):
    tune_cache.parent.mkdir(parents=True)
    tune_cache.write_text("{oops")
    assert main(["tune", "--show"]) == 0
    out, err = capsys.readouterr()
    assert "no entries" in out
    assert len(err.strip().splitlines()) == 1 and "not valid JSON" in err


@pytest.mark.skipif(HAS_CUDA, reason="the no-GPU message")
def test_tune_layers_without_gpu_says_why(capsys):
    assert main(["tune", "--layers", str(ROOT / "benchmarks" / "workloads.toml")]) == 1
    assert "on a CUDA GPU and this machine has none" in capsys.readouterr().err


@pytest.mark.gpu
def test_tune_layers_on_gpu_fills_the_cache(tmp_path, tune_cache):
    shapes = tmp_path / "w.toml"
    shapes.write_text('[[layer]]\nn = 8\ncin = 24\ncout = 64\nhw = 15\nepilogue = ["bn", "act:gelu"]\n')
    assert main(["tune", "--layers", str(shapes)]) == 0
    assert TuneCache(tune_cache).entries  # forward, dgrad, wgrad and the fused group were tuned
