"""The engine's base modules: one precision vocabulary, one errors module, one
text-table writer. None of them may import torch or triton when imported."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsl.schema import TRAIN_OPTIONS
from engine import precision
from engine.errors import (CheckpointError, DataError, FusenetError, FusenetTrainError, FusenetUserError,
                           InputFileError, UsageError)
from helpers import heavy_imports

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- precision


def test_the_language_and_the_engine_name_the_same_precisions():
    (dtype,) = TRAIN_OPTIONS["precision"].positional
    assert tuple(dtype.choices) == precision.NAMES == ("fp32", "tf32", "fp16", "bf16")


def test_precision_facts():
    assert [precision.torch_dtype(n) for n in precision.NAMES] == [
        torch.float32, torch.float32, torch.float16, torch.bfloat16]
    assert [precision.element_bytes(n) for n in precision.NAMES] == [4, 4, 2, 2]
    assert [n for n in precision.NAMES if precision.uses_tf32(n)] == ["tf32"]
    assert [precision.autocast_dtype(n) for n in precision.NAMES] == [None, None, torch.float16, torch.bfloat16]
    with pytest.raises(ValueError, match="unknown precision 'fp8'; choose one of fp32, tf32, fp16, bf16"):
        precision.precision("fp8")


def test_device_peak_tables_are_keyed_by_the_precision_names():
    from engine.perf.peaks import KNOWN

    for name, peaks in KNOWN:
        assert set(peaks["flops_per_s"]) == set(precision.NAMES), name


# ----------------------------------------------------------------------------- errors


def test_error_hierarchy_and_exit_codes():
    for cls in (FusenetTrainError, DataError, CheckpointError, InputFileError, UsageError):
        assert issubclass(cls, FusenetUserError)
    assert issubclass(DataError, FusenetTrainError) and issubclass(CheckpointError, FusenetTrainError)
    assert not issubclass(FusenetError, FusenetUserError)
    assert FusenetUserError.exit_code == DataError.exit_code == 1
    assert UsageError.exit_code == 2


def test_base_modules_import_neither_torch_nor_triton():
    code = "import engine.errors, engine.precision, engine.text, engine.resources, engine.version"
    assert heavy_imports(code, ROOT, watch=("torch", "triton")) == []


# ----------------------------------------------------------------------------- text tables


def test_format_table_pads_aligns_and_rules():
    from engine.text import format_table

    rows = [("conv", "1.250", "big"), ("relu", "0.031", "")]
    assert format_table(("kernel", "ms", "note"), rows, align="lrl").splitlines() == [
        "kernel     ms  note",
        "-------------------",
        "conv    1.250  big",
        "relu    0.031",
    ]
    assert format_table(("k", "note"), [("a", "a long free-text note")], rule="columns").splitlines()[1] == "-  ----"
    assert format_table(("a", "b"), [("1", "2")], rule=None, gap=" ", min_widths=(3, 4), align="r") == "  a    b\n  1    2"
    with pytest.raises(ValueError, match="2 cells, the header 3"):
        format_table(("a", "b", "c"), [("1", "2")])
