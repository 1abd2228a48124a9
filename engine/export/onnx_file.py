"""A trained network as an ONNX file, through the reference backend.

fusenet's Triton kernels are not ONNX operators, but the reference backend
(engine.runtime.reference) computes the same function with torch.nn layers and
shares their state-dict keys, so `write_onnx` loads the weights into it and
exports it with torch.onnx (the torch.export-based exporter: it needs the `onnx`
and `onnxscript` packages, `pip install 'fusenet[onnx]'`). The batch dimension
stays dynamic; the graph is the inference graph (batch norm with its running
statistics, no dropout).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from engine.errors import FusenetUserError

INPUT, OUTPUT = "input", "output"


class ExportError(FusenetUserError):
    """An export that cannot be made: a missing package, an unwritable path."""


def _needs(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ExportError(f"--onnx needs the '{module}' package: pip install 'fusenet[onnx]' "
                          "(onnx, onnxscript; onnxruntime to run the file)")


def write_onnx(model, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Export `model` (a reference-backend network, weights loaded) to `path`, in eval mode,
    with `metadata` (input normalisation, class names) as the ONNX model's metadata_props."""
    _needs("onnx")
    _needs("onnxscript")
    import torch

    path = Path(path)
    example = torch.zeros(2, *model.input_shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    quiet = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model.eval(), (example,), dynamo=True, input_names=[INPUT],
                                        output_names=[OUTPUT], dynamic_shapes=({0: batch},),
                                        verbose=False, external_data=False)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        program.model.metadata_props.update(metadata or {})
        program.save(str(path), external_data=False)
    except OSError as e:
        raise ExportError(f"cannot write '{path}': {e.strerror or e}") from None
    return path
