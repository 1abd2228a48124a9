"""Where kernels run: the GPU when there is one, else Triton's CPU interpreter.

Triton reads TRITON_INTERPRET when it is first imported, so this module must be
imported before anything imports triton. `engine/__init__.py` imports it first.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

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
        problem = interpreter_incompatibility()
        if problem:
            print(f"fusenet: warning: {problem}", file=sys.stderr)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def interpreter_incompatibility(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """A known bad pairing for the CPU interpreter, as a message with the fix, or None.

    Triton 3.6's interpreter turns one-element arrays into Python ints, which
    NumPy 2.4 no longer allows: kernels that loop over a runtime bound inside a
    jitted helper then fail (measured: 3.6 + NumPy 2.3.5 works, 3.6 + 2.4.0
    fails, 3.7 + 2.4 works). Compiled GPU kernels are not affected.
    """
    if triton_version is None or numpy_version is None:
        import numpy
        import triton

        triton_version, numpy_version = triton.__version__, numpy.__version__
    if _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter fails on some fusenet kernels with NumPy "
                f"{numpy_version} (NumPy >= 2.4 rejects a conversion it relies on). "
                "hint: pip install 'numpy<2.4', or triton >= 3.7")
    return None


def interpreter_overflow_checks(enabled: bool) -> bool:
    """Switch the CPU interpreter's integer-overflow sanitizer on or off; the old setting.

    Triton's interpreter checks every 32-bit integer add, sub and mul of a kernel
    for overflow (an int64 recomputation and an assert per operation: about 40%
    of an interpreted training step). Compiled GPU kernels run without it. The
    kernel tests keep it on, where it guards index arithmetic; `fusenet train`,
    `eval`, `predict` and `extract` run the same, already-tested kernels with it
    off. There is no environment variable for it: the interpreter reads
    `interpreter_builder.options.sanitize_overflow` (a frozen dataclass) at every
    integer op, in Triton 3.6 through 3.9. A no-op returning True when kernels
    are compiled, or when this Triton keeps the option elsewhere.
    """
    if not INTERPRETED:
        return True
    import dataclasses

    try:
        from triton.runtime import interpreter
        builder = interpreter.interpreter_builder
        old = bool(builder.options.sanitize_overflow)
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=bool(enabled))
    except (ImportError, AttributeError, TypeError):
        return True
    return old


@contextlib.contextmanager
def gpu_tiles() -> Iterator[None]:
    """Launchers pick their GPU tile configs inside the block, even under the
    interpreter (they read INTERPRETED): for dry runs that record what a GPU
    would launch, and for the ahead-of-time compile check."""
    global INTERPRETED
    old, INTERPRETED = INTERPRETED, False
    try:
        yield
    finally:
        INTERPRETED = old
