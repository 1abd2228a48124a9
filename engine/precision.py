"""The precision vocabulary: each name the language accepts (`precision fp32|tf32|fp16|bf16`),
its compute dtype, its element size and whether TF32 tensor-core math is on.

No torch import at module level (`fusenet check` uses this); `.dtype` resolves lazily.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    name: str
    dtype_name: str  # torch attribute of the activations' compute dtype
    bytes: int  # bytes per activation element
    tf32: bool  # fp32 storage, TF32 tensor-core math

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def half(self) -> bool:
        return self.bytes == 2


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "float32", 4, False),
    Precision("tf32", "float32", 4, True),
    Precision("fp16", "float16", 2, False),
    Precision("bf16", "bfloat16", 2, False),
)}
NAMES: tuple[str, ...] = tuple(PRECISIONS)


def precision(name: str) -> Precision:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(NAMES)}") from None
