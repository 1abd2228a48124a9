"""The training loop, schedules, resume, NaN guard, early stop, init/freeze, and the CLI."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsl.train_config import ScheduleConfig
from engine.training import checkpoint as C
from engine.training import report
from engine.training import loop as T
from engine.training.init import init_weights
from engine.training.optimizer_and_loss import build_optimizer, loss_fn
from engine.training.schedule import LRSchedule
from engine.cli import main as fusenet
from engine.errors import FusenetTrainError
from train_specs import DIGITS_SPEC, NOBN_SPEC, SEG_SPEC, compile

HERE = Path(__file__).parent


def _cfg(model, **kw):
    return dataclasses.replace(model.train_config, **kw)


_SMALL = {}


def small_digits():
    """480 digits images: keeps each test's run short on a busy 2-core machine."""
    if "d" not in _SMALL:
        from engine.training import data as D

        _SMALL["d"] = D.load_dataset("digits").subset(torch.arange(480))
    return _SMALL["d"]


def _run(spec, out, progress=False, **kw):
    m = compile(spec)
    if "data shapes" not in spec:
        kw.setdefault("dataset", small_digits())
    extra = {k: kw.pop(k) for k in list(kw) if k in ("resume", "init", "callback", "dataset")}
    return m, T.run_training(m, _cfg(m, **kw), out, backend="torch", progress=progress, log=lambda *_: None, **extra)


# ----------------------------------------------------------------------------- schedules


def _ours(cfg, epochs, spe, base=0.1, metrics=None):
    s = LRSchedule(cfg, base, epochs, spe)
    lrs = []
    for e in range(epochs):
        lrs += [s.lr(e, i) for i in range(spe)]
        if metrics:
            s.end_epoch(metrics[e])
    return lrs


def _torch(make, epochs, spe, per_step, base=0.1, metrics=None):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sch = make(opt)
    lrs = []
    for e in range(epochs):
        for _ in range(spe):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if per_step:
                sch.step()
        if not per_step:
            sch.step(metrics[e]) if metrics else sch.step()
    return lrs


def test_step_schedule_matches_torch():
    ours = _ours(ScheduleConfig("step", step_size=3, gamma=0.5), 10, 4)
    ref = _torch(lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5), 10, 4, per_step=False)
    np.testing.assert_allclose(ours, ref, rtol=1e-9)


def test_cosine_schedule_matches_torch():
    ours = _ours(ScheduleConfig("cosine", min_lr=0.001), 6, 5)
    ref = _torch(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 30, eta_min=0.001), 6, 5, per_step=True)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def test_cosine_with_warmup_matches_torch():
    ours = _ours(ScheduleConfig("cosine", warmup=2), 6, 5)
    ref = _torch(lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
        torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=9),
        torch.optim.lr_scheduler.CosineAnnealingLR(o, 20)], milestones=[10]), 6, 5, per_step=True)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def test_plateau_schedule_matches_torch():
    metrics = [1.0, 0.9, 0.9, 0.9, 0.95, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
    ours = _ours(ScheduleConfig("plateau", factor=0.5, patience=2, min_lr=0.02), 12, 2, metrics=metrics)
    ref = _torch(lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=2, min_lr=0.02),
                 12, 2, per_step=False, metrics=metrics)
    np.testing.assert_allclose(ours, ref, rtol=1e-9)


# ----------------------------------------------------------------------------- training runs


def test_train_writes_run_folder(tmp_path):
    m, res = _run(DIGITS_SPEC, tmp_path, epochs=3)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["curves.png", "metrics.csv", "model.safetensors",
                                                          "predictions.png"]
    rows = report.read_metrics_csv(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["val_acc"] > 0.2
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert C.load_checkpoint(tmp_path / "model.safetensors").epoch == 3


@pytest.mark.slow
def test_digits_reaches_95_percent(tmp_path):
    m = compile(DIGITS_SPEC)
    res = T.run_training(m, _cfg(m, epochs=12), tmp_path, backend="torch", progress=False, log=lambda *_: None)
    assert res.history[-1]["val_acc"] >= 0.95


def test_same_seed_same_losses(tmp_path):
    _, a = _run(NOBN_SPEC, tmp_path / "a", epochs=1)
    _, b = _run(NOBN_SPEC, tmp_path / "b", epochs=1)
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]


def test_segmentation_reports_pixel_accuracy_and_iou(tmp_path):
    _, res = _run(SEG_SPEC, tmp_path, epochs=1)
    row = res.history[-1]
    assert 0 < row["val_miou"] <= 1 and row["val_acc"] > 0.5


def test_resume_reproduces_uninterrupted_run(tmp_path):
    _, full = _run(NOBN_SPEC, tmp_path / "full", epochs=4, optimizer=dataclasses.replace(
        compile(NOBN_SPEC).train_config.optimizer, name="adam", lr=3e-3), schedule=ScheduleConfig("cosine", warmup=1))

    def stop_after_2(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    kw = dict(epochs=4, optimizer=dataclasses.replace(compile(NOBN_SPEC).train_config.optimizer, name="adam", lr=3e-3),
              schedule=ScheduleConfig("cosine", warmup=1))
    with pytest.raises(KeyboardInterrupt):
        _run(NOBN_SPEC, tmp_path / "cut", callback=stop_after_2, **kw)
    assert C.load_checkpoint(tmp_path / "cut" / "model.safetensors").epoch == 2
    _, resumed = _run(NOBN_SPEC, tmp_path / "cut", resume=True, **kw)
    keys = ["train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in full.history]
    a = C.load_checkpoint(tmp_path / "full" / "model.safetensors").model
    b = C.load_checkpoint(tmp_path / "cut" / "model.safetensors").model
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_guard_names_step_and_keeps_checkpoint(tmp_path):
    m = compile(DIGITS_SPEC)
    calls = {"n": 0}
    real = m.forward

    def poisoned(x, taps=()):
        out = real(x, taps)
        if m.training:
            calls["n"] += 1
            if calls["n"] == 6 + 5:  # epoch 2 (6 steps per epoch), step 5
                out = out * float("nan")
        return out

    m.forward = poisoned
    with pytest.raises(FusenetTrainError) as e:
        T.run_training(m, _cfg(m, epochs=3), tmp_path, backend="torch", progress=False, log=lambda *_: None,
                       dataset=small_digits())
    msg = str(e.value)
    assert "epoch 2, step 5" in msg and "learning rate" in msg and "clip_grad" in msg and "epoch 1" in msg
    assert C.load_checkpoint(tmp_path / "model.safetensors").epoch == 1
    assert (tmp_path / "curves.png").exists()


def test_nan_guard_huge_learning_rate(tmp_path):
    with pytest.raises(FusenetTrainError, match=r"loss became (nan|inf) at epoch 1, step \d+.*No checkpoint"):
        _run(NOBN_SPEC, tmp_path, epochs=2, optimizer=dataclasses.replace(
            compile(NOBN_SPEC).train_config.optimizer, lr=1e12))


def test_early_stop(tmp_path):
    opt = dataclasses.replace(compile(NOBN_SPEC).train_config.optimizer, lr=0.0, momentum=0.0)
    _, res = _run(NOBN_SPEC, tmp_path, epochs=10, early_stop=2, optimizer=opt)
    assert res.stopped == "early_stop" and len(res.history) == 3


def test_freeze_keeps_tap_layers_fixed(tmp_path):
    m = compile(DIGITS_SPEC)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    T.run_training(m, _cfg(m, epochs=1, freeze=("e1",)), tmp_path, backend="torch", progress=False,
                   log=lambda *_: None, dataset=small_digits())
    after = C.load_checkpoint(tmp_path / "model.safetensors").model
    # init_weights re-initialises, so compare the frozen layers with their state right after init
    m2 = compile(DIGITS_SPEC)
    init_weights(m2, 0)
    init = m2.state_dict()
    for k in after:
        if k.startswith(("conv0.", "bn0.")):
            assert torch.equal(after[k], init[k]), k
        elif k.endswith("weight"):
            assert not torch.equal(after[k], init[k]), k
    del before
    with pytest.raises(FusenetTrainError, match="no tap named nope .*named taps: e1, e2"):
        T.run_training(compile(DIGITS_SPEC), _cfg(m, epochs=1, freeze=("nope",)), tmp_path / "x",
                       backend="torch", progress=False, log=lambda *_: None)


def test_init_from_checkpoint(tmp_path):
    _run(DIGITS_SPEC, tmp_path / "a", epochs=1)
    lines = []
    m = compile(DIGITS_SPEC.replace("conv 16", "conv 24"))
    T.run_training(m, _cfg(m, epochs=1, freeze=("e1",)), tmp_path / "b", backend="torch", progress=False,
                   dataset=small_digits(), init=str(tmp_path / "a" / "model.safetensors"), log=lines.append)
    text = "\n".join(lines)
    assert "loaded 7 tensors (conv0.weight, conv0.bias" in text and "conv1.weight (shape" in text
    a = C.load_checkpoint(tmp_path / "a" / "model.safetensors").model
    b = C.load_checkpoint(tmp_path / "b" / "model.safetensors").model
    assert torch.equal(a["conv0.weight"], b["conv0.weight"])  # loaded, then frozen


def test_resume_of_other_network_refused(tmp_path):
    _run(DIGITS_SPEC, tmp_path, epochs=1)
    with pytest.raises(FusenetTrainError, match="does not match network"):
        _run(DIGITS_SPEC.replace("conv 16", "conv 24"), tmp_path, epochs=2, resume=True)


def test_triton_backend_without_kernels_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "engine.kernels.optim", None)
    monkeypatch.setitem(sys.modules, "engine.kernels.loss", None)
    m = compile(DIGITS_SPEC)
    with pytest.raises(FusenetTrainError, match="engine.kernels.optim.SGD"):
        build_optimizer(m.parameters(), m.train_config.optimizer, "triton")
    with pytest.raises(FusenetTrainError, match="engine.kernels.loss.cross_entropy"):
        loss_fn("triton")


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.cnn").write_text(DIGITS_SPEC)

    def run(*argv):
        return fusenet(list(argv))

    return run


def test_cli_train_eval_predict_extract(cli, tmp_path, capsys):
    assert cli("train", "d.cnn", "--backend", "torch", "--epochs", "2", "--lr", "0.05", "--out", "r") == 0
    out = capsys.readouterr().out
    assert "outputs in r/" in out and "epoch 2/2" in out
    ck = "r/model.safetensors"
    assert cli("eval", "d.cnn", "--backend", "torch", "--checkpoint", ck) == 0
    out = capsys.readouterr().out
    assert "validation split of digits" in out and "confusion matrix" in out and "accuracy:" in out
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    Image.fromarray((d.images[0] * 15).astype(np.uint8)).save("zero.png")
    assert cli("predict", "d.cnn", "--backend", "torch", "--checkpoint", ck, "zero.png", "--top", "2") == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("zero.png: ") and line.count("%") == 2
    assert cli("extract", "d.cnn", "--backend", "torch", "--checkpoint", ck, "--tap", "e2", "--out", "f.npz") == 0
    z = np.load("f.npz")
    assert z["features"].shape == (1797, 16, 4, 4) and z["labels"].shape == (1797,)
    # an explicit --out that holds a run is not overwritten
    assert cli("train", "d.cnn", "--backend", "torch", "--epochs", "1", "--out", "r") == 1
    assert "--resume" in capsys.readouterr().err


def test_cli_errors_are_clean(cli, capsys):
    assert cli("train", "missing.cnn", "--backend", "torch") == 1
    assert "spec file 'missing.cnn' does not exist" in capsys.readouterr().err
    assert cli("train", "d.cnn", "--backend", "torch", "--data", "mnist6k") == 1
    assert "neither a built-in" in capsys.readouterr().err
    assert cli("eval", "d.cnn", "--backend", "torch", "--checkpoint", "d.cnn") == 1
    assert "corrupt" in capsys.readouterr().err
    assert cli("extract", "d.cnn", "--backend", "torch", "--checkpoint", "none.safetensors", "--tap", "e1") == 1


def test_cli_subprocess_no_traceback(tmp_path):
    (tmp_path / "d.cnn").write_text(DIGITS_SPEC)
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]))
    r = subprocess.run([sys.executable, "-m", "engine.cli", "train", "d.cnn", "--backend", "torch",
                        "--data", str(tmp_path / "none.npz")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "none.npz" in r.stderr


def test_cli_trains_on_the_triton_backend_like_the_torch_backend(cli, capsys):
    # One short epoch on fusenet's own kernels (interpreted here), with the fused
    # optimizer and loss, against the same run on plain PyTorch: same metrics.
    for backend in ("torch", "triton"):
        assert cli("train", "d.cnn", "--backend", backend, "--epochs", "1", "--batch", "128", "--out", backend) == 0
    out = capsys.readouterr().out
    assert "fused Triton" in out and "outputs in triton/" in out

    def metrics(folder):
        header, *rows = (Path(folder) / "metrics.csv").read_text().splitlines()
        return dict(zip(header.split(","), rows[-1].split(",")))

    ours, ref = metrics("triton"), metrics("torch")
    for key in ("train_loss", "val_loss", "val_acc"):
        assert abs(float(ours[key]) - float(ref[key])) <= 1e-3 * max(1.0, abs(float(ref[key]))), (key, ours, ref)


# ----------------------------------------------------------------------------- the NaN guard (issue 13)


def _finite_checkpoint(path) -> bool:
    model = C.load_checkpoint(path).model
    return all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_cli_diverged_run_exits_1_and_never_saves_the_diverged_model(cli, capsys, tmp_path):
    """The issue's run: digits at lr 1e6 ends with a non-finite validation loss. It must exit 1
    with the located message, and the checkpoint left is the last finite one."""
    assert cli("train", "d.cnn", "--backend", "torch", "--epochs", "3", "--lr", "1e6", "--batch", "1024",
               "--out", "r") == 1
    err = capsys.readouterr().err
    assert "fusenet train: error: validation loss became nan after epoch 2" in err, err
    assert "learning rate too high" in err and "epoch 1) is kept at r/model.safetensors" in err
    assert C.load_checkpoint(tmp_path / "r" / "model.safetensors").epoch == 1
    assert _finite_checkpoint(tmp_path / "r" / "model.safetensors")


def test_triton_backend_diverged_run_stops_with_the_same_message(tmp_path):
    m = compile(DIGITS_SPEC, backend="triton")
    cfg = _cfg(m, epochs=3, batch=128, optimizer=dataclasses.replace(m.train_config.optimizer, lr=1e6))
    with pytest.raises(FusenetTrainError, match=r"(loss became (nan|inf) at epoch \d, step \d+|validation loss "
                                                r"became (nan|inf) after epoch \d).*learning rate too high"):
        T.run_training(m, cfg, tmp_path, backend="triton", progress=False, log=lambda *_: None,
                       dataset=small_digits())
    ck = tmp_path / "model.safetensors"
    assert not ck.exists() or _finite_checkpoint(ck)


def test_non_finite_weights_are_never_saved(tmp_path):
    """A finite validation loss does not make the weights finite: every tensor is checked."""
    from engine.training.guard import check_finite

    m = compile(DIGITS_SPEC)
    with torch.no_grad():
        m.conv1.weight[0, 0, 0, 0] = float("inf")
        m.bn0.running_var[1] = float("nan")
    row = {"val_loss": 0.5, "train_loss": 0.4, "lr": 0.1}
    with pytest.raises(FusenetTrainError, match=r"weights became non-finite \(bn0.running_var and 1 more\) during "
                                                r"epoch 3.*epoch 2\) is kept"):
        check_finite(m, _cfg(m), row, 3, tmp_path, 2)
    with pytest.raises(FusenetTrainError, match="validation loss became inf after epoch 3"):
        check_finite(m, _cfg(m), {**row, "val_loss": float("inf")}, 3, tmp_path, 2)


def test_the_nan_flag_is_read_every_guard_every_steps_and_at_epoch_end(tmp_path, monkeypatch):
    from engine.kernels.clock import StepClock

    reads = []
    real = StepClock.read
    monkeypatch.setattr(StepClock, "read", lambda self: (reads.append(1), real(self))[1])
    monkeypatch.setattr(T, "GUARD_EVERY", 2)
    _run(DIGITS_SPEC, tmp_path, epochs=1)  # 384 training images, batch 64: 6 steps
    assert len(reads) == 6 // 2 + 1
