"""What several `fusenet` commands share: input paths, batch lists, layer shapes.

- `input_path`: a FILE argument, falling back to the files shipped with fusenet
  (`examples/NAME.cnn`, `benchmarks/workloads.toml`) when it names one of them
  and does not exist in the current folder (engine/resources);
- `parse_batches`: "64,256,1024" -> [64, 256, 1024], or a UsageError (exit 2);
- `layer_shapes`: the convolution shapes of `--layers` runs (bench and tune),
  from a workloads .toml or a spec; an unreadable file is an InputFileError;
- `LAYERS_PRECISION`: the precision of `--layers` runs unless --precision says
  (engine.precision.PERFORMANCE_DEFAULT).

Like every command module, this imports torch, Triton and the engine's kernels
only inside functions.
"""
from __future__ import annotations

from pathlib import Path

from engine import resources
from engine.errors import InputFileError, UsageError
from engine.precision import PERFORMANCE_DEFAULT

LAYERS_PRECISION = PERFORMANCE_DEFAULT


def input_path(path: str) -> str:
    """`path` as given, or the shipped file it names when there is no such file here."""
    return resources.resolve(path)


def compile_spec(spec: str, backend: str, precision=None):
    """`engine.compile` of a spec file named on the command line (shipped examples found too)."""
    import os

    spec = input_path(spec)
    if not os.path.isfile(spec):
        raise InputFileError(f"spec file '{spec}' does not exist")
    import engine

    return engine.compile(spec, backend=backend, precision=precision)


def load_trained(spec: str, checkpoint: str, backend: str):
    """(network in eval mode with the checkpoint's weights, the checkpoint): what eval,
    predict, extract and export start from."""
    from engine.training import checkpoint as C

    model = compile_spec(spec, backend)
    ck = C.load_checkpoint(checkpoint)
    C.load_into_model(ck, model, model.name)
    model.eval()
    return model, ck


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a usage error, exit 2, otherwise)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_batches(text: str, example: str = "64,256,1024") -> list[int]:
    """A comma list of positive batch sizes; UsageError naming `example` otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"--batch takes positive integers like {example}, got {text!r}")
    return values


def layer_shapes(file: str, batches: list[int] | None):
    """Conv shapes from a workloads file (its batch unless `batches`) or a spec (its train batch unless `batches`)."""
    from engine.perf.bench.layers import shapes_from_spec, shapes_from_workloads

    batch = batches[0] if batches else None
    if Path(file).suffix == ".toml":
        try:
            return shapes_from_workloads(file, batch=batch)
        except (OSError, ValueError) as e:  # tomllib.TOMLDecodeError is a ValueError
            raise InputFileError(str(e)) from None
    from engine.ir.frontend import load

    spec = load(Path(file))
    return shapes_from_spec(spec, batch or spec.train.batch)
