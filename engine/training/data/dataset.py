"""The in-memory data set every tool trains and evaluates on.

Everything lives in memory as tensors (no DataLoader worker processes): the data
sets fusenet trains on here are small, and a CPU machine has two cores.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Dataset:
    """Images `x` [N,C,H,W] (or vectors [N,F]) float32, normalised; labels `y` int64 [N] or [N,H,W]."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    task: str = "classify"  # classify | segment
    synthetic: bool = False
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)
    # the pixel value of full intensity before normalisation (1.0 for [0,1] data, 255.0 for float data
    # in 0..255), and the range the raw pixels spanned: how an image file in [0,1] maps onto this data
    pixel_scale: float = 1.0
    pixel_range: tuple[float, float] = (0.0, 1.0)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of an image, or (F,) of a vector."""
        return tuple(int(s) for s in self.x.shape[1:])

    def subset(self, idx: torch.Tensor) -> "Dataset":
        return replace(self, x=self.x[idx], y=self.y[idx])

    def describe(self) -> str:
        if len(self.image_shape) == 1:
            return f"{self.name}: {len(self)} vectors of {self.image_shape[0]} features, {len(self.classes)} classes"
        c, h, w = self.image_shape
        kind = "synthetic segmentation set" if self.synthetic else ("segmentation set" if self.task == "segment" else "images")
        return f"{self.name}: {len(self)} {kind} {c}x{h}x{w}, {len(self.classes)} classes"
