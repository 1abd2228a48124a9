"""The precision vocabulary: what `fp32`, `tf32`, `fp16` and `bf16` mean to the engine.

A spec's `precision` option, the `--precision` flags and every module that
sizes, runs or checks tensors by precision look the names up here:

    name   compute dtype    bytes  tf32 matmuls  autocast dtype (torch backend)
    fp32   torch.float32    4      no            -
    tf32   torch.float32    4      yes           -
    fp16   torch.float16    2      no            torch.float16
    bf16   torch.bfloat16   2      no            torch.bfloat16

`NAMES` is the ordered tuple of names (the language declares the same choices
in dsl/schema.py; a test checks they agree). Torch dtypes are resolved when
asked for: no torch import at module level (`fusenet check` uses this).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    name: str
    dtype_name: str  # torch attribute of the activations' compute dtype
    bytes: int  # bytes per activation element
    tf32: bool  # fp32 storage, TF32 tensor-core math
    agreement_tol: float = 1e-3  # norm-wise relative error two correct implementations may differ by

    @property
    def dtype(self):
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def half(self) -> bool:
        """A 16-bit float format (the torch backend runs it under autocast)."""
        return self.bytes == 2


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "float32", 4, False, agreement_tol=1e-3),
    Precision("tf32", "float32", 4, True, agreement_tol=2e-2),
    Precision("fp16", "float16", 2, False, agreement_tol=2e-2),
    Precision("bf16", "bfloat16", 2, False, agreement_tol=6e-2),
)}
NAMES: tuple[str, ...] = tuple(PRECISIONS)
# what the performance tools (inspect, bench --layers, the GPU suite) use unless told:
# the tensor-core format networks train in on current GPUs
PERFORMANCE_DEFAULT = "bf16"


def precision(name: str) -> Precision:
    """The precision called `name`; ValueError naming the choices for anything else."""
    try:
        return PRECISIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(NAMES)}") from None


def torch_dtype(name: str):
    """Compute dtype of precision `name` (torch.float32 for fp32 and tf32)."""
    return precision(name).dtype


def element_bytes(name: str) -> int:
    return precision(name).bytes


def uses_tf32(name: str) -> bool:
    return precision(name).tf32


def autocast_dtype(name: str):
    """The dtype torch.autocast runs the PyTorch reference in, or None for the fp32 formats."""
    p = precision(name)
    return p.dtype if p.half else None
