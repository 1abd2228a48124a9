"""How the training commands run fusenet's kernels on Triton's CPU interpreter.

`fast_interpreter` wraps the handlers of train, eval, predict and extract:

- the interpreter's integer-overflow sanitizer is off (engine.device.
  interpreter_overflow_checks): it checks every 32-bit add, sub and mul with an
  int64 recomputation and an assert, a third of an interpreted step. The kernel
  tests keep it on, where it guards index arithmetic; these commands run the
  same, already-tested kernels. FUSENET_INTERPRETER_CHECKS=1 keeps it on;
- with the Triton backend interpreted, torch and the BLAS under NumPy run one
  thread each: the interpreter's arrays are small, and a second thread costs
  more in hand-offs than it computes (two-epoch digits runs on this 2-core
  machine: 25% less CPU time and 20% less wall time, the same results);
- NumPy's RuntimeWarnings from inside the interpreter (an exp that overflows in
  a masked-off lane, say) say nothing to a user and are silenced.

Each setting is restored when the command returns, so in-process callers (the
tests) keep the defaults.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch's intra-op threads and NumPy's BLAS threads limited to one, then restored."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
        limits = threadpool_limits(limits=1, user_api="blas")
    except Exception:  # noqa: BLE001 - without it only torch is limited
        limits = None
    try:
        yield
    finally:
        if limits is not None:
            limits.restore_original_limits()
        torch.set_num_threads(old)  # after the BLAS limits: restoring those can reset OpenMP's count


def fast_interpreter(handler):
    """Decorate a command handler (see the module docstring)."""
    @functools.wraps(handler)
    def run(args):
        import warnings

        from engine.device import INTERPRETED, interpreter_overflow_checks

        keep = os.environ.get("FUSENET_INTERPRETER_CHECKS") == "1"
        old = interpreter_overflow_checks(keep)
        interpreted = INTERPRETED and getattr(args, "backend", "triton") == "triton"
        try:
            with warnings.catch_warnings(), (single_threaded() if interpreted else contextlib.nullcontext()):
                warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"(triton|numpy)(\.|$)")
                return handler(args)
        finally:
            interpreter_overflow_checks(old)

    return run
