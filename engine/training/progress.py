"""Progress within an epoch: a tqdm bar on a terminal, plain lines elsewhere.

Without a terminal (CI, `| tee`, nohup) a bar draws nothing useful, and an
interpreted epoch can take minutes of silence. `PlainProgress` prints one line
to stderr every `every_s` seconds instead, with the same numbers as the bar's
postfix: `epoch 2/8  step 11/22  loss=0.9412 acc=0.781 img_s=96`.
It has the three methods the training loop calls on a tqdm bar.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

PROGRESS_EVERY_S = 10.0


class PlainProgress:
    def __init__(self, total: int, desc: str, every_s: float = PROGRESS_EVERY_S, stream: TextIO | None = None):
        self.total, self.desc, self.every_s = total, desc, every_s
        self.stream = stream or sys.stderr
        self.n = 0
        self.postfix = ""
        self._last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())
        now = time.perf_counter()
        if now - self._last >= self.every_s and self.n < self.total:
            self._last = now
            print(f"{self.desc}  step {self.n}/{self.total}  {self.postfix}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


def progress_bar(mode: bool | str, total: int, epoch: int, epochs: int):
    """A tqdm bar (mode True or "bar"), plain lines ("lines"), or None (False)."""
    if not mode:
        return None
    desc = f"epoch {epoch}/{epochs}"
    if mode == "lines":
        return PlainProgress(total, desc)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
