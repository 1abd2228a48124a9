"""fusenet's errors meant for the user, in one place.

Two families, and `fusenet` (engine/cli/main.py) turns each into one clean
message and an exit status, never a traceback:

- `FusenetError` (from dsl.errors, re-exported here): a rejected program, one or
  more diagnostics located in the source (`file:line:col: error: ...`). Exit 1.
- `FusenetUserError`: a mistake found while running, outside the program text:
  - `FusenetTrainError`: the training tools (train, eval, predict, extract):
    a bad flag value, a run folder that cannot be used, a diverged run;
    - `DataError`: data that cannot be read or that the network cannot take;
    - `CheckpointError`: a missing, corrupt or mismatched checkpoint;
  - `InputFileError`: another input file that cannot be read (a workloads file);
  - `UsageError`: a flag value the argument parser could not judge (e.g. a
    malformed --batch list); exit 2, the status of argparse's usage errors.
  Printed as `fusenet COMMAND: error: MESSAGE`; exit `exit_code` (1 unless said).

Anything else reaching the command line is a fusenet bug (an internal error).
This module imports neither torch nor triton.
"""
from __future__ import annotations

from dsl.errors import FusenetError


class FusenetUserError(Exception):
    """A run-time mistake of the user's: one clean message, no traceback."""

    exit_code = 1


class FusenetTrainError(FusenetUserError):
    """A user-facing error of the training tools (train, eval, predict, extract)."""


class DataError(FusenetTrainError):
    """Data that cannot be read, or that the network cannot take."""


class CheckpointError(FusenetTrainError):
    """A checkpoint that is missing, corrupt, or does not match the network or the run."""


class InputFileError(FusenetUserError):
    """An input file other than a spec, data or checkpoint that cannot be read (e.g. a workloads file)."""


class UsageError(FusenetUserError):
    """A malformed flag value that argparse could not check: exit 2, like argparse's usage errors."""

    exit_code = 2


__all__ = ["FusenetError", "FusenetUserError", "FusenetTrainError", "DataError", "CheckpointError",
           "InputFileError", "UsageError"]
