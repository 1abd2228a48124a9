"""What a user sees of a run and of the training tools: progress without a terminal,
plots redrawn every epoch, the interpreter's sanitizer and warnings, and the output
paths of train and extract."""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.training import loop as T
from engine.training import report
from engine.training.progress import PlainProgress, progress_bar
from train_specs import DIGITS_SPEC, compile


@pytest.fixture
def spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.cnn").write_text(DIGITS_SPEC)
    return "d.cnn"


def test_plain_progress_prints_lines_every_interval():
    stream = io.StringIO()
    bar = PlainProgress(total=4, desc="epoch 1/2", every_s=0.0, stream=stream)
    for step in range(4):
        bar.update(1)
        bar.set_postfix(loss="1.0000", acc="0.500")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines == [f"epoch 1/2  step {i}/4  loss=1.0000 acc=0.500" for i in (1, 2, 3)]  # not at the last step
    assert isinstance(progress_bar("lines", 4, 1, 2), PlainProgress) and progress_bar(False, 4, 1, 2) is None


def test_train_without_a_terminal_prints_progress_lines(spec, capsys, monkeypatch):
    monkeypatch.setattr("engine.training.progress.PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(PlainProgress.__init__, "__defaults__", (0.0, None))
    assert main(["train", spec, "--backend", "torch", "--epochs", "1", "--out", "r"]) == 0
    err = capsys.readouterr().err  # pytest's stderr is not a terminal
    assert "epoch 1/1  step 1/22  loss=" in err


def test_plots_are_redrawn_every_epoch(tmp_path):
    m = compile(DIGITS_SPEC)
    from engine.training import data as D

    seen = []

    def after_epoch(epoch, row):
        seen.append((epoch, (tmp_path / "curves.png").stat().st_mtime_ns, (tmp_path / "predictions.png").exists()))

    T.run_training(m, m.train_config.__class__(**{**m.train_config.__dict__, "epochs": 2}), tmp_path, backend="torch",
                   progress=False, log=lambda *_: None, callback=after_epoch,
                   dataset=D.load_dataset("digits").subset(torch.arange(480)))
    assert [e for e, _, _ in seen] == [1, 2] and all(p for _, _, p in seen)
    assert seen[1][1] >= seen[0][1]


def test_predictions_show_the_mistakes_first():
    pred = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    target = torch.tensor([0, 1, 9, 3, 9, 5, 6, 9])
    pick = report.pick_examples(pred, target, n=4)
    assert pick.tolist() == [2, 4, 0, 1]  # two mistakes (half the grid), then correct ones
    assert report.pick_examples(pred, pred, n=3).tolist() == [0, 1, 2]  # a perfect model: correct ones
    assert report.pick_examples(pred, pred + 1, n=3).tolist() == [0, 1, 2]  # all wrong: all mistakes


def test_curves_have_integer_epochs_log_loss_and_say_which_loss(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    rows = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 1.5 / e, "train_acc": 0.5, "val_acc": 0.6, "val_miou": ""}
            for e in (1, 2, 3)]
    report.plot_curves(tmp_path / "c.png", rows, label_smoothing=0.1)
    loss_axis = figures[0].axes[0]
    assert loss_axis.get_yscale() == "log"
    assert all(float(t).is_integer() for t in loss_axis.get_xticks())
    labels = [t.get_text() for t in loss_axis.get_legend().get_texts()]
    assert labels == ["train (with label smoothing 0.1)", "validation (no smoothing)"]


def test_the_sanitizer_is_off_during_training_commands_and_back_on_after(spec, monkeypatch):
    from engine import device
    from engine.cli import interpreted

    states, threads = [], []
    monkeypatch.setattr(device, "INTERPRETED", True)
    monkeypatch.setattr(device, "interpreter_overflow_checks",
                        lambda on: states.append(on) or (not on if len(states) == 1 else True))

    @interpreted.fast_interpreter
    def handler(args):
        threads.append(torch.get_num_threads())
        warnings.warn_explicit("overflow encountered in exp", RuntimeWarning, "interpreter.py", 1,
                               module="triton.runtime.interpreter")
        return 0

    before = torch.get_num_threads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert handler(None) == 0
    assert states == [False, True]  # off for the command, the old setting restored
    assert not caught  # the interpreter's numpy warnings do not reach the user
    assert threads == [1] and torch.get_num_threads() == before  # one thread while interpreted, then restored
    monkeypatch.setenv("FUSENET_INTERPRETER_CHECKS", "1")
    states.clear()
    handler(None)
    assert states[0] is True


def test_the_sanitizer_switch_reaches_the_interpreter():
    from engine import device

    if not device.INTERPRETED:
        pytest.skip("compiled kernels: no interpreter")
    from triton.runtime import interpreter

    assert interpreter.interpreter_builder.options.sanitize_overflow  # on by default: the kernel tests keep it
    old = device.interpreter_overflow_checks(False)
    try:
        assert old is True and not interpreter.interpreter_builder.options.sanitize_overflow
    finally:
        device.interpreter_overflow_checks(old)
    assert interpreter.interpreter_builder.options.sanitize_overflow


@pytest.mark.parametrize("out, error", [("a_file", "is a file"), ("/dev/null/x", "'/dev/null' is not a folder")])
def test_train_out_that_cannot_be_a_folder(spec, capsys, out, error):
    open("a_file", "w").close()
    assert main(["train", spec, "--backend", "torch", "--out", out]) == 1
    err = capsys.readouterr().err
    assert error in err and "internal error" not in err


def test_extract_names_the_file_it_wrote(spec, capsys, tmp_path):
    assert main(["train", spec, "--backend", "torch", "--epochs", "1", "--out", "r"]) == 0
    ck = ["--backend", "torch", "--checkpoint", "r/model.safetensors", "--tap", "e2"]
    assert main(["extract", spec, *ck, "--out", "feats"]) == 0
    assert "wrote feats.npz:" in capsys.readouterr().out and (tmp_path / "feats.npz").exists()
    (tmp_path / "dir").mkdir()
    assert main(["extract", spec, *ck, "--out", "dir"]) == 0
    assert "wrote dir/tiny_e2_features.npz" in capsys.readouterr().out
    assert np.load(tmp_path / "dir" / "tiny_e2_features.npz")["features"].shape[0] == 1797
    assert main(["extract", spec, *ck, "--out", "/dev/null/x.npz"]) == 1
    err = capsys.readouterr().err
    assert "/dev/null" in err and "internal error" not in err


def test_hyperparameters_are_checked_by_check(tmp_path, capsys):
    bad = DIGITS_SPEC.replace("lr=0.1", "lr=-0.1").replace("weight_decay=5e-4", "weight_decay=-1")
    (tmp_path / "bad.cnn").write_text(bad)
    assert main(["check", str(tmp_path / "bad.cnn")]) == 1
    err = capsys.readouterr().err
    assert "lr must be greater than 0" in err and "weight_decay must not be negative" in err
    zero = DIGITS_SPEC.replace("optimizer sgd lr=0.1", "optimizer adam lr=0 eps=0").replace(" momentum=0.9 nesterov=true", "")
    (tmp_path / "zero.cnn").write_text(zero)
    assert main(["check", str(tmp_path / "zero.cnn")]) == 1
    err = capsys.readouterr().err
    assert "optimizer's lr must be greater than 0" in err and "optimizer's eps must be greater than 0" in err


def test_bench_json_without_a_gpu_is_read_back(tmp_path, capsys, monkeypatch):
    from engine import device

    monkeypatch.setattr(device, "HAS_CUDA", False)
    out = tmp_path / "a.json"
    assert main(["bench", "examples/digits.cnn", "--json", str(out), "--no-inspect"]) == 0
    first = capsys.readouterr().out
    assert json.loads(out.read_text())["kind"] == "fusenet-analytic"
    assert main(["bench", str(out)]) == 0
    again = capsys.readouterr().out
    assert "analytic model, batch 64" in again and again.split("\n\n")[0] in first


def test_inspect_a_network_without_parameters(tmp_path, capsys, monkeypatch):
    import engine.perf.aot as aot

    (tmp_path / "p.cnn").write_text("network p {\n    input 1x8x8\n    maxpool 2\n}\n")
    monkeypatch.setattr(aot, "compile_all", lambda specs, targets, jobs=2: [])
    assert main(["inspect", str(tmp_path / "p.cnn")]) == 0
    cap = capsys.readouterr()
    assert "has no parameters" in cap.err and "inference" in cap.out


def test_a_network_of_vectors_trains_and_evaluates_on_an_npz_of_vectors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "v.cnn").write_text("network v {\n    input 20\n    linear 16 -> relu\n    bn\n    linear 4\n}\n")
    rng = np.random.default_rng(0)
    y = np.arange(200) % 4
    x = rng.normal(size=(200, 20)).astype(np.float32) + y[:, None] * 2.0  # separable
    np.savez("vec.npz", x=x, y=y)
    assert main(["train", "v.cnn", "--backend", "torch", "--data", "vec.npz", "--epochs", "3", "--batch", "32",
                 "--out", "r"]) == 0
    out = capsys.readouterr().out
    assert "200 vectors of 20 features" in out and "predictions.png" not in out.splitlines()[-1]
    assert main(["eval", "v.cnn", "--backend", "torch", "--checkpoint", "r/model.safetensors", "--data", "vec.npz"]) == 0
    acc = float(capsys.readouterr().out.split("accuracy: ")[1].split("%")[0])
    assert acc > 50  # chance is 25%
    assert main(["predict", "v.cnn", "--backend", "torch", "--checkpoint", "r/model.safetensors", "any.png"]) == 1
    assert "takes a vector of 20 features, not images" in capsys.readouterr().err


def test_every_training_command_runs_without_the_sanitizer(spec, monkeypatch):
    from engine.cli import train as cli_train
    from engine.device import INTERPRETED

    for name in ("cmd_train", "cmd_eval", "cmd_predict", "cmd_extract"):
        assert getattr(getattr(cli_train, name), "__wrapped__", None) is not None, f"{name} is not fast_interpreter'd"
    if not INTERPRETED:
        return
    from triton.runtime import interpreter

    seen = []

    def fake_run_training(model, cfg, out, **kw):
        seen.append((interpreter.interpreter_builder.options.sanitize_overflow, torch.get_num_threads()))
        raise KeyboardInterrupt

    monkeypatch.setattr("engine.training.loop.run_training", fake_run_training)
    assert main(["train", spec, "--out", "r"]) == 130  # the Triton backend, interpreted
    assert seen == [(False, 1)]
    assert interpreter.interpreter_builder.options.sanitize_overflow  # back on for whatever runs next
