"""What is done to images after loading: per-channel normalisation (measured on
the data set, or a checkpoint's applied again), the input scaling that maps an
image file onto the training data's units (`InputScaling`, recorded in the
checkpoint), and the training augmentations (random crop after zero padding,
horizontal flip, cutout)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from engine.errors import DataError
from engine.training.data.dataset import Dataset


def _per_channel(v, like: torch.Tensor) -> torch.Tensor:
    """Per-channel values shaped to broadcast over `like`: [1,C,1,1] for images, [1,F] for vectors."""
    t = torch.as_tensor(v, dtype=like.dtype)
    return t.reshape((1, -1) + (1,) * (like.ndim - 2))


def white_level(top: float) -> float:
    """The pixel value of full intensity for data whose largest value is `top`: 1 for [0,1]
    data, 255 for 8-bit values stored as numbers, 65535 for 16-bit ones, else `top` itself."""
    for level in (1.0, 255.0, 65535.0):
        if top <= level * 1.001:
            return level
    return float(top)


def normalised(ds: Dataset) -> Dataset:
    """`ds` normalised per channel to mean 0 and std 1, with the mean and std it used recorded,
    and its pixel scale and range (what `InputScaling` maps image files with)."""
    if len(ds) == 0:
        raise DataError(f"data '{ds.name}' holds no images")
    if not torch.isfinite(ds.x).all():
        raise DataError(f"data '{ds.name}' contains NaN or Inf pixel values")
    lo, hi = float(ds.x.min()), float(ds.x.max())
    dims = (0, 2, 3) if ds.x.ndim == 4 else (0,)  # per channel of images, per feature of vectors
    mean = ds.x.mean(dim=dims)
    one_value = ds.x.numel() < 2 * ds.x.shape[1]  # a single 1x1 image (or vector) has no spread to measure
    std = torch.ones_like(mean) if one_value else ds.x.std(dim=dims).clamp_min(1e-6)
    x = (ds.x - _per_channel(mean, ds.x)) / _per_channel(std, ds.x)
    return replace(ds, x=x.contiguous(), mean=tuple(mean.tolist()), std=tuple(std.tolist()),
                   pixel_scale=white_level(hi), pixel_range=(lo, hi))


@dataclass(frozen=True)
class InputScaling:
    """How an image file (pixels in [0,1]) becomes what the network saw in training:
    times `pixel_scale` (the training data's full intensity), then the per-channel
    normalisation. Recorded in the checkpoint's data metadata; eval, predict and
    export read it from there, so training and prediction scale identically."""

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    pixel_scale: float = 1.0
    pixel_range: tuple[float, float] | None = None

    @classmethod
    def from_meta(cls, meta: dict) -> "InputScaling":
        rng = meta.get("pixel_range")
        return cls(tuple(meta.get("mean") or ()), tuple(meta.get("std") or ()), float(meta.get("pixel_scale", 1.0)),
                   tuple(rng) if rng else None)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.pixel_scale if self.pixel_scale != 1.0 else x
        return normalise_images(x, self.mean, self.std) if self.mean else x

    def warnings(self) -> list[str]:
        """What makes image files a poor match for the training data."""
        if self.pixel_range and self.pixel_range[0] < 0:
            return [f"the training data's pixels spanned {self.pixel_range[0]:g}..{self.pixel_range[1]:g} "
                    f"(already normalised?); image files are mapped to 0..{self.pixel_scale:g}, which may not "
                    "match what the network learnt"]
        return []


def normalise_images(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Apply a data set's normalisation to images in [0, 1] (used by predict)."""
    return (x - _per_channel(mean, x)) / _per_channel(std, x)


def renormalise(ds: Dataset, mean: Sequence[float], std: Sequence[float]) -> Dataset:
    """Re-express a data set in another normalisation (a checkpoint's), as the network saw in training."""
    if not mean or tuple(mean) == tuple(ds.mean) and tuple(std) == tuple(ds.std):
        return ds
    if len(mean) != ds.image_shape[0]:
        return ds  # channel mismatch: check_compatible reports it
    x = normalise_images(ds.x * _per_channel(ds.std, ds.x) + _per_channel(ds.mean, ds.x), mean, std)
    return replace(ds, x=x, mean=tuple(mean), std=tuple(std))


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image of x [N,C,H,W] zero-padded by `pad` and cropped back to HxW at a random offset:
    (the crops, oy [N], ox [N]) — the offsets into the padded image, drawn from `gen` rows first,
    so a label map or a box can follow (a box moves by (pad - ox, pad - oy))."""
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # [N, 1, H, 1]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # [N, 1, 1, W]
    return xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols], oy, ox


def augment(x: torch.Tensor, y: torch.Tensor, cfg, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop after zero padding, horizontal flip and cutout, drawn from `gen`.

    `cfg` is an AugmentConfig. Label maps ([N,H,W] targets) follow crops and flips.
    """
    if x.ndim != 4:
        raise DataError("augment (crop, flip, cutout) applies to images; this data is vectors of "
                        f"{x.shape[1]} features: remove the augment line from the train section")
    n, c, h, w = x.shape
    seg = y.ndim == 3
    if cfg.crop:
        p = int(cfg.crop)
        x, oy, ox = random_crop(x, p, gen)
        if seg:
            rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [N, H, 1]
            cols = (ox[:, None] + torch.arange(w))[:, None, :]  # [N, 1, W]
            y = torch.nn.functional.pad(y, (p, p, p, p))[torch.arange(n)[:, None, None], rows, cols]
    if cfg.flip:
        m = torch.rand(n, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(-1), x)
        if seg:
            y = torch.where(m[:, None, None], y.flip(-1), y)
    if cfg.cutout:
        s = int(cfg.cutout)
        cy = torch.randint(0, h, (n,), generator=gen)
        cx = torch.randint(0, w, (n,), generator=gen)
        y0, x0 = (cy - s // 2)[:, None], (cx - s // 2)[:, None]
        ar_h, ar_w = torch.arange(h)[None], torch.arange(w)[None]
        in_r = (ar_h >= y0) & (ar_h < y0 + s)
        in_c = (ar_w >= x0) & (ar_w < x0 + s)
        hole = in_r[:, :, None] & in_c[:, None, :]
        x = x.masked_fill(hole[:, None], 0.0)
    return x.contiguous(), y.contiguous()


def augments(cfg) -> bool:
    """Whether an AugmentConfig changes anything."""
    return bool(cfg.crop or cfg.flip or cfg.cutout)
