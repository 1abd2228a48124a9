"""Who competes in `fusenet bench`: fusenet and the PyTorch baselines, by key and label.

Kept apart from contenders.py (which builds them, and imports torch) so that the
command line can name them in its help and check --contenders without torch.
"""
from __future__ import annotations

LABELS = {
    "fusenet": "fusenet",
    "eager": "PyTorch eager",
    "compile": "torch.compile",
    "compile-max": "torch.compile max-autotune",
}
BASELINES = ("eager", "compile", "compile-max")
CONTENDERS = ("fusenet",) + BASELINES
