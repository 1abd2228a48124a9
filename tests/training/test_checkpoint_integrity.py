"""A checkpoint is verified on load: flipped bits in its tensors (a checksum in its
metadata), tampered metadata (bad JSON, a non-numeric epoch, wrong types), and the
temporary files a killed save leaves behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.errors import CheckpointError
from engine.training import checkpoint as C
from train_specs import DIGITS_SPEC, compile


@pytest.fixture
def saved(tmp_path):
    model = compile(DIGITS_SPEC)
    path = tmp_path / "model.safetensors"
    C.save_checkpoint(path, model, network=model.name, spec=DIGITS_SPEC, epoch=3,
                      data={"mean": [0.3], "std": [0.4], "classes": [str(i) for i in range(10)], "pixel_scale": 1.0})
    return model, path


def _rewrite(path, change_meta=None, change_tensors=None):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if change_meta:
        change_meta(meta)
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, str(path), metadata=meta)


def test_checksum_recorded_and_verified(saved):
    model, path = saved
    ck = C.load_checkpoint(path)
    assert len(ck.meta["sha256"]) == 64
    C.load_into_model(ck, model, model.name)


def test_a_flipped_bit_in_a_weight_is_refused(saved):
    _, path = saved

    def flip(tensors):
        w = tensors["model.conv0.weight"]
        w.view(torch.int32).view(-1)[5] ^= 1 << 30  # an exponent bit: the kind of flip that gives inf and nan
    _rewrite(path, change_tensors=flip)
    with pytest.raises(CheckpointError, match="is damaged: its tensors do not match the checksum"):
        C.load_checkpoint(path)


def test_a_flipped_bit_in_the_file_bytes_is_refused(saved):
    _, path = saved
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x40  # inside the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged|corrupt"):
        C.load_checkpoint(path)


@pytest.mark.parametrize("key, value, message", [
    ("data", "{not json", "'data' is not valid JSON"),
    ("train_state", "[1, 2]", "'train_state' should be a JSON object"),
    ("epoch", "abc", "epoch 'abc' is not a whole number"),
    ("epoch", "-1", "epoch '-1' is not a whole number"),
    ("data", json.dumps({"mean": "x"}), "data.mean should be a list"),
    ("data", json.dumps({"mean": ["a"], "std": [1]}), "data.mean should hold numbers"),
    ("data", json.dumps({"pixel_scale": -3}), "pixel_scale should be a positive number"),
    ("train_state", json.dumps({"history": 5}), "train_state.history should be a list"),
])
def test_tampered_metadata_is_one_clear_error(saved, key, value, message):
    _, path = saved
    _rewrite(path, change_meta=lambda m: m.__setitem__(key, value))
    with pytest.raises(CheckpointError, match=message):
        C.load_checkpoint(path)


def test_tampered_metadata_through_the_cli(saved, tmp_path, capsys):
    from engine.cli import main

    _, path = saved
    spec = tmp_path / "d.cnn"
    spec.write_text(DIGITS_SPEC)
    _rewrite(path, change_meta=lambda m: m.__setitem__("epoch", "abc"))
    assert main(["eval", str(spec), "--backend", "torch", "--checkpoint", str(path)]) == 1
    err = capsys.readouterr().err
    assert "corrupt metadata" in err and "internal error" not in err


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".model.safetensors.tmp-{dead_pid}"
    stale_csv = tmp_path / f".metrics.csv.tmp-{dead_pid}"
    live = tmp_path / f".model.safetensors.tmp-{os.getppid()}"
    other = tmp_path / "notes.tmp-1"
    for p in (stale, stale_csv, live, other):
        p.write_bytes(b"x")
    removed = C.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale, stale_csv])
    assert live.exists() and other.exists() and not stale.exists()


def test_train_cleans_stale_temporaries_at_start(tmp_path, capsys, monkeypatch):
    from engine.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.cnn").write_text(DIGITS_SPEC)
    (tmp_path / "r").mkdir()
    stale = tmp_path / "r" / ".model.safetensors.tmp-999999999"
    stale.write_bytes(b"half a checkpoint")
    assert main(["train", "d.cnn", "--backend", "torch", "--epochs", "1", "--out", "r"]) == 0
    assert not stale.exists()
    assert "left by an interrupted save" in capsys.readouterr().err
