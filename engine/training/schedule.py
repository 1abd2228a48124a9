"""The learning-rate schedule of a run: constant, step, cosine or plateau, with linear warmup.

`LRSchedule.lr(epoch, step)` is the rate for one optimizer step; `end_epoch`
feeds the plateau rule its validation loss; `state_dict`/`load_state_dict`
carry the plateau state through a checkpoint (the other rules are pure
functions of epoch and step).
"""
from __future__ import annotations

import math

from engine.errors import FusenetTrainError

SCHEDULES = ("constant", "step", "cosine", "plateau")


class LRSchedule:
    """Learning rate per step: constant | step | cosine | plateau, with linear warmup.

    Warmup ramps linearly over `warmup` epochs, per step. `step` multiplies by gamma
    every step_size epochs (as torch's StepLR). `cosine` anneals per step from the
    end of warmup to the last step down to min_lr (as CosineAnnealingLR).
    `plateau` follows ReduceLROnPlateau (mode min, relative threshold 1e-4).
    """

    def __init__(self, cfg, base_lr: float, epochs: int, steps_per_epoch: int):
        if cfg.name not in SCHEDULES:
            raise FusenetTrainError(f"unknown schedule '{cfg.name}' (known: {', '.join(SCHEDULES)})")
        self.cfg, self.base, self.epochs, self.spe = cfg, float(base_lr), int(epochs), max(1, int(steps_per_epoch))
        self.plateau_lr = self.base
        self.best = math.inf
        self.bad = 0

    def lr(self, epoch: int, step: int) -> float:
        """`epoch` counts from 0, `step` within the epoch from 0."""
        c = self.cfg
        g = epoch * self.spe + step
        warm = c.warmup * self.spe
        factor = (g + 1) / warm if g < warm else 1.0
        if c.name == "constant":
            lr = self.base
        elif c.name == "step":
            lr = self.base * c.gamma ** (epoch // c.step_size)
        elif c.name == "cosine":
            total = max(1, self.epochs * self.spe - warm)
            t = min(max(g - warm, 0), total)
            lr = c.min_lr + (self.base - c.min_lr) * (1 + math.cos(math.pi * t / total)) / 2
        else:
            lr = self.plateau_lr
        return lr * factor

    def end_epoch(self, metric: float) -> None:
        if self.cfg.name != "plateau" or metric != metric:
            return
        if metric < self.best * (1 - 1e-4) if self.best > 0 else metric < self.best:
            self.best, self.bad = metric, 0
        else:
            self.bad += 1
        if self.bad > self.cfg.patience:
            new = max(self.plateau_lr * self.cfg.factor, self.cfg.min_lr)
            if self.plateau_lr - new > 1e-8:
                self.plateau_lr = new
            self.bad = 0

    def state_dict(self) -> dict:
        return {"plateau_lr": self.plateau_lr, "best": self.best if self.best < math.inf else None, "bad": self.bad}

    def load_state_dict(self, s: dict) -> None:
        self.plateau_lr = float(s.get("plateau_lr", self.base))
        self.best = math.inf if s.get("best") is None else float(s["best"])
        self.bad = int(s.get("bad", 0))
