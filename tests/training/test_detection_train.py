"""Detection end to end (`loss centernet`): one epoch on fusenet's kernels (interpreted) gives the
metrics PyTorch gives from the same init; a run folder with the detection columns, curves and
predictions; `fusenet eval` (mAP, AP per class) and `fusenet predict` (boxes, --annotate).

The full one-epoch comparison on examples/detect_shapes.cnn is a command (README, "Detection"):
    fusenet train examples/detect_shapes.cnn --backend triton --epochs 1 --out runs/det-triton
    fusenet train examples/detect_shapes.cnn --backend torch --epochs 1 --out runs/det-torch
then compare the two metrics.csv rows.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import engine
from engine.training import data as D
from engine.training import loop as T

SPEC = """\
network det {
    input 3x32x32
    conv 8 kernel=3 stride=2 pad=1 bias=false -> bn -> relu
    conv 16 kernel=3 stride=2 pad=1 bias=false -> bn -> relu
    conv 7 kernel=1
}
train {
    data shapes_boxes
    split 0.25
    batch 8
    epochs 1
    optimizer adam lr=2e-3
    loss centernet size_weight=0.1 offset_weight=1
    augment flip=true
    seed 0
}
"""


def _data(n: int = 48):
    ds = D.load_dataset("shapes_boxes", input_shape=(3, 32, 32), num_classes=3, seed=0)
    return ds.subset(torch.arange(n))


def _metrics(folder: Path) -> list[dict]:
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _train(tmp_path: Path, backend: str, n: int = 48) -> dict:
    model = engine.compile(SPEC, backend=backend)
    T.run_training(model, model.train_config, tmp_path / backend, backend=backend, progress=False,
                   log=lambda *_: None, dataset=_data(n))
    return _metrics(tmp_path / backend)[-1]


def test_one_epoch_on_the_triton_backend_gives_the_torch_metrics(tmp_path):
    ref, ours = _train(tmp_path, "torch"), _train(tmp_path, "triton")
    for key in ("train_loss", "train_focal", "train_size", "train_offset", "val_loss", "val_focal", "val_size",
                "val_offset"):
        a, b = float(ours[key]), float(ref[key])
        assert abs(a - b) <= 2e-3 * max(1.0, abs(b)), (key, ours, ref)
    for key in ("val_map50", "val_map"):
        assert abs(float(ours[key]) - float(ref[key])) <= 5e-3, (key, ours, ref)


def test_a_detection_run_folder(tmp_path):
    model = engine.compile(SPEC.replace("epochs 1", "epochs 2"), backend="torch")
    lines = []
    T.run_training(model, model.train_config, tmp_path, backend="torch", progress=False, log=lines.append,
                   dataset=_data(32))
    rows = _metrics(tmp_path)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_focal", "train_size", "train_offset", "val_map50", "val_map"} <= set(rows[0])
    assert all(0.0 <= float(r["val_map50"]) <= 1.0 for r in rows)
    for name in ("model.safetensors", "curves.png", "predictions.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    text = "\n".join(lines)
    assert "CenterNet reference loss" in text and "mAP@0.5" in text and "focal" in text


def test_eval_and_predict_commands(tmp_path, capsys, monkeypatch):
    from engine.cli.main import main

    spec = tmp_path / "det.cnn"
    spec.write_text(SPEC.replace("epochs 1", "epochs 1").replace("batch 8", "batch 64"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(spec), "--backend", "torch", "--out", "run", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(spec), "--backend", "torch", "--checkpoint", "run/model.safetensors"]) == 0
    out = capsys.readouterr().out
    assert "mAP@0.5" in out and "mAP@[.5:.95]" in out and "square" in out and "triangle" in out
    # predict: a drawn image of the data set
    ds = D.load_dataset("shapes_boxes", input_shape=(3, 32, 32), num_classes=3, seed=0)
    from PIL import Image

    img = (ds.x[0] * torch.tensor(ds.std)[:, None, None] + torch.tensor(ds.mean)[:, None, None]).clamp(0, 1)
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "a.png")
    printed = {}
    for backend in ("torch", "triton"):
        assert main(["predict", str(spec), "--backend", backend, "--checkpoint", "run/model.safetensors", "a.png",
                     "--threshold", "0.0", "--annotate", f"ann-{backend}"]) == 0
        out = capsys.readouterr().out
        assert "boxes in network-input pixels (32x32)" in out
        assert (tmp_path / f"ann-{backend}" / "a.png").stat().st_size > 0
        lines = out.splitlines()
        assert lines[1].startswith("a.png: ") and "box" in lines[1]
        printed[backend] = [line for line in lines[1:] if not line.startswith("wrote")]
    assert len(printed["torch"]) > 2 and printed["torch"] == printed["triton"]


def test_the_nan_guard_stops_a_detection_run_before_saving(tmp_path):
    from engine.errors import FusenetTrainError

    ds = _data(32)
    ds.x[3, 0, 5, 5] = float("nan")  # one bad pixel in the first batches
    model = engine.compile(SPEC, backend="torch")
    with pytest.raises(FusenetTrainError, match="loss became nan"):
        T.run_training(model, model.train_config, tmp_path, backend="torch", progress=False, log=lambda *_: None,
                       dataset=ds)
    assert not (tmp_path / "model.safetensors").exists()


def test_a_resumed_detection_run_continues_where_it_stopped(tmp_path):
    two = engine.compile(SPEC.replace("epochs 1", "epochs 2"), backend="torch")
    T.run_training(two, two.train_config, tmp_path / "full", backend="torch", progress=False, log=lambda *_: None,
                   dataset=_data(32))
    one = engine.compile(SPEC.replace("epochs 1", "epochs 2"), backend="torch")
    cfg = one.train_config
    import dataclasses

    T.run_training(one, dataclasses.replace(cfg, epochs=1), tmp_path / "r", backend="torch", progress=False,
                   log=lambda *_: None, dataset=_data(32))
    again = engine.compile(SPEC.replace("epochs 1", "epochs 2"), backend="torch")
    T.run_training(again, cfg, tmp_path / "r", backend="torch", progress=False, log=lambda *_: None,
                   dataset=_data(32), resume=True)
    full, resumed = _metrics(tmp_path / "full"), _metrics(tmp_path / "r")
    assert [r["epoch"] for r in resumed] == ["1", "2"]
    for key in ("train_loss", "train_focal", "val_loss", "val_map50", "val_map"):
        assert resumed[-1][key] == full[-1][key], key
