"""The NaN/inf guard of a training run: a diverged model is never saved.

Three checks, each raising a FusenetTrainError that says where it happened,
what likely caused it and which checkpoint is kept:
- `read_guard`: the training loss. The step keeps the first non-finite loss
  (its global step and value) in a device flag (engine.kernels.clock), so the
  loop reads it (a host sync) only every `step.GUARD_EVERY` steps and at the
  end of each epoch, from every process under data parallelism;
- `check_finite` after validation: the validation loss, and every weight and
  buffer of the model (one sync), before the epoch's checkpoint is written.
The last good checkpoint (the previous epoch's) stays on disk untouched.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.errors import FusenetTrainError


def nan_message(what: str, where: str, lr: float, cfg, checkpoint: Path, last_epoch: int) -> str:
    kept = (f"the last good checkpoint (epoch {last_epoch}) is kept at {checkpoint}"
            if last_epoch > 0 else "no checkpoint was written (no epoch ended with a finite model)")
    causes = [f"a learning rate too high for this network (lr is {lr:.3g} at this step)"]
    if not cfg.clip_grad:
        causes.append("exploding gradients (add  clip_grad 1.0  to the train section)")
    if cfg.precision == "fp16":
        causes.append("fp16 overflow (try  precision bf16  or fp32)")
    causes.append("NaN or Inf values in the input data")
    return (f"{what} {where}; training stopped. "
            f"Likely causes: {'; '.join(causes)}. {kept[0].upper() + kept[1:]}.")


def read_guard(step, steps_per_epoch: int, cfg, dist, checkpoint: Path, last_good: int) -> dict:
    """The step's device stats on the host (engine.kernels.clock.StepClock.read, a sync); a
    FusenetTrainError naming the first step whose training loss was not finite (on any process)."""
    st = step.clock.read()
    bad = st["bad"]
    if dist.world > 1:
        bad = bool(dist.all_sum(torch.tensor([float(bad)], dtype=torch.float64))[0] > 0)
    if bad:
        g = st["bad_step"] if st["bad"] else step.host_step  # another process saw it first
        where = f"at epoch {(g - 1) // steps_per_epoch + 1}, step {(g - 1) % steps_per_epoch + 1} (global step {g})"
        loss = st["bad_loss"] if st["bad"] else float("nan")
        raise FusenetTrainError(nan_message(f"loss became {loss}", where, step.lr_at(g - 1), cfg, checkpoint,
                                            last_good))
    return st


def check_finite(model, cfg, row: dict, epoch: int, checkpoint: Path, last_good: int) -> None:
    """After validation, before saving: the validation loss and every floating tensor of the
    model's state must be finite."""
    lr = row["lr"]
    if not math.isfinite(row["val_loss"]):
        raise FusenetTrainError(nan_message(f"validation loss became {row['val_loss']}", f"after epoch {epoch} "
                                            f"(training loss {row['train_loss']:.4g})", lr, cfg, checkpoint,
                                            last_good))
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    finite = torch.stack([torch.isfinite(v).all() for v in state.values()]).tolist() if state else []
    bad = [k for k, ok in zip(state, finite) if not ok]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise FusenetTrainError(nan_message(f"weights became non-finite ({bad[0]}{more})", f"during epoch {epoch}",
                                            lr, cfg, checkpoint, last_good))
