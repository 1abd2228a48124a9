"""Where kernels run: the GPU when there is one, else Triton's CPU interpreter.

Triton reads TRITON_INTERPRET when it is first imported, so this module must be
imported before anything imports triton. `engine/__init__.py` imports it first.
"""
from __future__ import annotations

import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise ImportError(
            "fusenet: triton was imported before fusenet on a machine without a CUDA "
            "device, so its CPU interpreter cannot be switched on. Import fusenet "
            "first or set TRITON_INTERPRET=1 in the environment."
        )
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

_announced = False


def announce_interpreter() -> None:
    """Say once per process that kernels run interpreted (slow, for correctness)."""
    global _announced
    if INTERPRETED and not _announced:
        _announced = True
        print(
            "fusenet: no CUDA device found; running the Triton kernels on the CPU "
            "through Triton's interpreter (correct but slow).",
            file=sys.stderr,
        )
