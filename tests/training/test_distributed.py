"""Data parallel training over torch.distributed (gloo, 2 CPU processes) matches one process
with the same global batch, for a network without batch norm."""
import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from engine.errors import FusenetTrainError
from engine.training import loop as T
from engine.training.distributed import Dist, setup_distributed
from train_specs import NOBN_SPEC, compile

SPEC = NOBN_SPEC.replace("    dropout 0.1\n", "")  # dropout masks are drawn per process


def _setup(tmp):
    from engine.training import data as D

    m = compile(SPEC)
    cfg = dataclasses.replace(m.train_config, epochs=2, batch=32, schedule=dataclasses.replace(
        m.train_config.schedule, name="cosine", warmup=1))
    return m, cfg, D.load_dataset("digits").subset(torch.arange(640))


def _worker(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = setup_distributed()
    assert dist.world == world and dist.rank == rank
    m, cfg, ds = _setup(tmp)
    res = T.run_training(m, cfg, os.path.join(tmp, "ddp"), backend="torch", progress=False, dist=dist,
                         dataset=ds, log=lambda *_: None)
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(res.history, f)
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    m, cfg, ds = _setup(tmp_path)
    single = T.run_training(m, cfg, tmp_path / "single", backend="torch", progress=False, dataset=ds,
                            log=lambda *_: None).history
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(r0) == len(single) == 2
    for a, b, s in zip(r0, r1, single):
        for k in ("train_loss", "val_loss", "val_acc", "train_acc", "lr"):
            assert a[k] == pytest.approx(s[k], rel=1e-4, abs=1e-5), (k, a[k], s[k])
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6), k
    # rank 0 alone wrote the run folder
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "curves.png", "metrics.csv", "model.safetensors", "predictions.png"]
    from engine.training import checkpoint as C

    a = C.load_checkpoint(tmp_path / "ddp" / "model.safetensors").model
    b = C.load_checkpoint(tmp_path / "single" / "model.safetensors").model
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_batch_must_split_evenly():
    m, cfg, ds = _setup(None)
    with pytest.raises(FusenetTrainError, match="does not split evenly over 3 processes"):
        T.run_training(m, cfg, "unused", backend="torch", dist=Dist(rank=0, world=3), dataset=ds)


def test_torchrun_runs_fusenet_train(tmp_path):
    """The documented command: `torchrun --nproc_per_node=2 ... fusenet train` on CPU (gloo)."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "n.cnn").write_text(SPEC)
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
         "-m", "engine.cli", "train", "n.cnn", "--backend", "torch", "--epochs", "1", "--out", "r", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "data parallel: 2 processes" in r.stdout
    assert r.stdout.count("epoch 1/1") == 1, "only rank 0 logs"
    assert (tmp_path / "r" / "model.safetensors").exists()
