"""Atomic, pickle-free checkpoints: round trip, crash mid-write, corrupt and mismatched files."""
import os

import pytest
import torch

from engine.training import checkpoint as C
from engine.errors import CheckpointError
from train_specs import DIGITS_SPEC, NOBN_SPEC, compile


def _trained(opt_cls=torch.optim.Adam):
    m = compile(DIGITS_SPEC)
    opt = opt_cls(m.parameters(), lr=1e-2)
    m(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    return m, opt


def _save(path, m, opt, epoch=1):
    C.save_checkpoint(path, m, network=m.name, spec=m.source_text, epoch=epoch, optimizer=opt,
                      rng={"torch": torch.get_rng_state()}, train_state={"history": [{"epoch": epoch}]},
                      data={"classes": ["a", "b"], "mean": [0.5], "std": [0.2]})


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.SGD])
def test_round_trip(tmp_path, opt_cls):
    m, opt = _trained(opt_cls)
    _save(tmp_path / "m.safetensors", m, opt, epoch=3)
    ck = C.load_checkpoint(tmp_path / "m.safetensors")
    assert ck.epoch == 3 and ck.network == "tiny" and ck.meta["spec"] == DIGITS_SPEC
    assert ck.meta["data"]["classes"] == ["a", "b"] and ck.meta["train_state"]["history"] == [{"epoch": 3}]
    m2 = compile(DIGITS_SPEC)
    C.load_into_model(ck, m2, "tiny")
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    opt2 = opt_cls(m2.parameters(), lr=1.0)
    C.load_into_optimizer(ck, opt2)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid, st in s1["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][pid][k]))


def test_file_is_plain_safetensors_without_pickle(tmp_path):
    m, opt = _trained()
    _save(tmp_path / "m.safetensors", m, opt)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "m.safetensors")
    assert "model.conv0.weight" in tensors and "rng.torch" in tensors
    assert b"\x80\x04\x95" not in (tmp_path / "m.safetensors").read_bytes()[:64]


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    m, opt = _trained()
    _save(path, m, opt, epoch=1)
    good = path.read_bytes()


    def dying_replace(src, dst):  # the process "dies" after writing part of the new file
        with open(src, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(C.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        _save(path, m, opt, epoch=2)
    monkeypatch.undo()
    assert path.read_bytes() == good and C.load_checkpoint(path).epoch == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "header"])
def test_corrupt_checkpoint_refused(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    m, opt = _trained()
    _save(path, m, opt)
    blob = path.read_bytes()
    bad = {"truncate": blob[: len(blob) // 2], "garbage": os.urandom(500), "empty": b"",
           "header": blob[:8] + b"{not json" + blob[17:]}[damage]
    path.write_bytes(bad)
    with pytest.raises(CheckpointError, match="corrupt"):
        C.load_checkpoint(path)


def test_other_safetensors_file_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not a fusenet checkpoint"):
        C.load_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        C.load_checkpoint(tmp_path / "nothing.safetensors")


def test_mismatched_network_refused(tmp_path):
    m, opt = _trained()
    _save(tmp_path / "m.safetensors", m, opt)
    ck = C.load_checkpoint(tmp_path / "m.safetensors")
    other = compile(NOBN_SPEC)
    with pytest.raises(CheckpointError, match="is of network 'tiny', not 'nobn'"):
        C.load_into_model(ck, other, "nobn")
    wider = compile(DIGITS_SPEC.replace("conv 16", "conv 24"))
    with pytest.raises(CheckpointError, match=r"does not match network 'tiny'.*conv1.weight"):
        C.load_into_model(ck, wider, "tiny")


def test_optimizer_mismatch_refused(tmp_path):
    m, opt = _trained(torch.optim.Adam)
    _save(tmp_path / "m.safetensors", m, opt)
    ck = C.load_checkpoint(tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="trained with optimizer"):
        C.load_into_optimizer(ck, torch.optim.SGD(m.parameters(), lr=0.1))


def test_init_from_matching_layers(tmp_path):
    m, opt = _trained()
    _save(tmp_path / "m.safetensors", m, opt)
    ck = C.load_checkpoint(tmp_path / "m.safetensors")
    wider = compile(DIGITS_SPEC.replace("conv 16", "conv 24"))
    loaded, skipped = C.init_from(ck, wider)
    assert "conv0.weight" in loaded and "bn0.running_mean" in loaded
    assert any(s.startswith("conv1.weight (shape") for s in skipped)
    assert torch.equal(wider.state_dict()["conv0.weight"], m.state_dict()["conv0.weight"])
