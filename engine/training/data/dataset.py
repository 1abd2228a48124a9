"""The in-memory data set every tool trains and evaluates on.

Everything lives in memory as tensors (no DataLoader worker processes): the data
sets fusenet trains on here are small, and a CPU machine has two cores.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Dataset:
    """Images `x` [N,C,H,W] (or vectors [N,F]) float32, normalised; labels `y` int64 [N] or [N,H,W].

    A detection set (task "detect") also keeps `boxes`: one float32 tensor [m_i, 5] per image of
    (class, x1, y1, x2, y2) in input pixels (m_i may be 0); its `y` is the object count per image
    (int64 [N]), so code that indexes or counts labels keeps working."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    task: str = "classify"  # classify | segment | detect
    synthetic: bool = False
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)
    # the pixel value of full intensity before normalisation (1.0 for [0,1] data, 255.0 for float data
    # in 0..255), and the range the raw pixels spanned: how an image file in [0,1] maps onto this data
    pixel_scale: float = 1.0
    pixel_range: tuple[float, float] = (0.0, 1.0)
    boxes: list | None = None  # detection: list[Tensor[m_i, 5]] of (class, x1, y1, x2, y2), one per image

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of an image, or (F,) of a vector."""
        return tuple(int(s) for s in self.x.shape[1:])

    def subset(self, idx: torch.Tensor) -> "Dataset":
        boxes = None
        if self.boxes is not None:
            pick = torch.arange(len(self))[idx]  # any index form (tensor, mask, slice) as positions
            boxes = [self.boxes[i] for i in pick.reshape(-1).tolist()]
        return replace(self, x=self.x[idx], y=self.y[idx], boxes=boxes)

    def describe(self) -> str:
        if len(self.image_shape) == 1:
            return f"{self.name}: {len(self)} vectors of {self.image_shape[0]} features, {len(self.classes)} classes"
        c, h, w = self.image_shape
        task = {"segment": "segmentation set", "detect": "detection set"}.get(self.task)
        kind = f"synthetic {task or 'set'}" if self.synthetic else (task or "images")
        objects = f", {int(self.y.sum())} objects" if self.task == "detect" else ""
        return f"{self.name}: {len(self)} {kind} {c}x{h}x{w}, {len(self.classes)} classes{objects}"
