"""The step clock: the few device scalars a training step's kernels read and write.

A step that is captured once in a CUDA graph and replayed must not carry any
per-step value as a Python scalar (it would be baked into the graph). So the
values that change from step to step live in device tensors that the kernels
read at run time:

  counters  int64 [2]   SEED: the run's dropout base seed (fixed for the run)
                        STEP: steps begun so far (the global step index of the
                        current step until the loss kernel advances it)
  stats     fp64 [6]    LOSS_SUM, CORRECT, COUNT: the epoch's running training
                        sums (mean loss * rows, correct rows, rows);
                        BAD, BAD_STEP, BAD_LOSS: the NaN/inf guard (set once, at
                        the first non-finite loss: its 1-based global step and value)
  terms     fp64 [3]    the epoch's running sums of a loss's terms (term * images;
                        the CenterNet loss, engine.kernels.centernet: focal, size,
                        offset; unused by the cross-entropy)

Who touches what, in step order:
  forward dropout (dropout.py, linear epilogue)  reads SEED and STEP
  the fused loss (loss.py, last launch)          adds to the sums, sets the
                                                 guard, then STEP += 1
  the fused optimizer (optim.py)                 reads STEP (now = steps done,
                                                 Adam's t) and lr_table[STEP - 1]
The dropout backward reads the seed its forward recorded, not the clock, so the
advance in the middle of the step cannot change a mask. Nothing here is read
on the host during a step; the training loop reads `stats` every few steps
and at the end of an epoch (engine.training.step).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SEED, STEP = 0, 1  # counters
LOSS_SUM, CORRECT, COUNT, BAD, BAD_STEP, BAD_LOSS = range(6)  # stats
N_TERMS = 3  # terms


@triton.jit
def record_loss(loss, count, counters_ptr, stats_ptr):
    """The loss kernels' side of the layout above, run by the one program that finishes a step's
    loss: add `loss` (a scalar mean) x `count` rows to LOSS_SUM and `count` to COUNT, record the
    first non-finite loss (BAD, BAD_STEP, BAD_LOSS), then advance STEP."""
    step = tl.load(counters_ptr + 1)  # int64 global index of this step (STEP)
    l64 = loss.to(tl.float64)
    tl.store(stats_ptr + 0, tl.load(stats_ptr + 0) + l64 * count)  # LOSS_SUM
    tl.store(stats_ptr + 2, tl.load(stats_ptr + 2) + count)  # COUNT
    bad = (loss != loss) | (tl.abs(loss) == float("inf"))  # not finite
    first = bad & (tl.load(stats_ptr + 3) == 0.0)  # BAD not yet set
    tl.store(stats_ptr + 3, 1.0, mask=first)
    tl.store(stats_ptr + 4, (step + 1).to(tl.float64), mask=first)  # BAD_STEP, 1-based
    tl.store(stats_ptr + 5, l64, mask=first)  # BAD_LOSS
    tl.store(counters_ptr + 1, step + 1)


class StepClock:
    """The device scalars of one training run's steps (see the module docstring)."""

    def __init__(self, device: torch.device | str, base_seed: int = 0, step: int = 0):
        if not 0 <= int(base_seed) < 2**31:
            raise ValueError(f"base_seed must be in [0, 2**31), got {base_seed}")
        self.device = torch.device(device)
        self.counters = torch.tensor([int(base_seed), int(step)], dtype=torch.int64).to(self.device)  # [2]
        self.stats = torch.zeros(6, dtype=torch.float64, device=self.device)  # [6]
        self.terms = torch.zeros(N_TERMS, dtype=torch.float64, device=self.device)  # [3]

    def reset_sums(self) -> None:
        """Zero the epoch's running sums (a fill: once per epoch, not per step)."""
        self.stats[LOSS_SUM:COUNT + 1].zero_()
        self.terms.zero_()

    def read(self) -> dict:
        """The stats on the host (a device sync: call it every few steps, not every step)."""
        s = self.stats.tolist()
        return {"loss_sum": s[LOSS_SUM], "correct": s[CORRECT], "count": s[COUNT], "bad": s[BAD] != 0.0,
                "bad_step": int(s[BAD_STEP]), "bad_loss": s[BAD_LOSS], "terms": self.terms.tolist()}

    def step(self) -> int:
        """STEP on the host (a device sync)."""
        return int(self.counters[STEP].item())
