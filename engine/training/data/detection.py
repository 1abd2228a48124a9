"""Detection data: CenterNet targets from boxes, box-aware augmentation, and batches.

A detection network ("Objects as Points", Zhou et al. 2019) outputs, per image,
[classes + 4, Ho, Wo] at an output stride s = H / Ho: a heatmap per class, the box
width and height in output cells, and the sub-cell offset of the box center.
`build_targets` turns the true boxes of a batch into what its loss compares
against (`CenterNetTargets`); `detection_batches` feeds the training loop like
`loader.batches` does for classification, moving the boxes with every flip and
crop before the targets are built (targets follow the augmented image, never the
stored one).

Boxes of one image: float32 [m, 5] = (class, x1, y1, x2, y2) in input pixels of
the (augmented) network input; m may be 0.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from engine.errors import DataError
from engine.training.data.dataset import Dataset
from engine.training.data.transforms import random_crop

MIN_OVERLAP = 0.7  # CenterNet's: a corner-shifted box still has IoU >= 0.7 with the true one
ONE_BELOW = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))  # the largest float32 under 1
KEEP_AREA = 0.5  # an augmented box keeping less than this part of its area (clipped by a crop) is dropped


@dataclass(frozen=True)
class CenterNetTargets:
    """What the CenterNet loss compares a batch's output with (CPU tensors; the loss moves them).

    heatmap [B, Ho, Wo, classes] float32, channels-last like the NHWC logits: a Gaussian per
            object (element-wise max where they overlap), exactly 1.0 at each center cell;
    index   [B, K] int32: the center cell of object k, flat (cy * Wo + cx); 0 where padded;
    size    [B, K, 2] float32: (w, h) of the box in output cells (input pixels / stride);
    offset  [B, K, 2] float32: (center / stride - center cell), x then y, in [0, 1);
    mask    [B, K] float32: 1 for a real object, 0 for padding.
    The loss normalises by max(1, mask.sum()), the batch's object count.
    """

    heatmap: torch.Tensor
    index: torch.Tensor
    size: torch.Tensor
    offset: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class DetectionBatch:
    """The `y` of a detection batch: the loss's targets and the (augmented) true boxes,
    a list of float32 [m_i, 5] tensors, which the metrics and the drawing read."""

    targets: CenterNetTargets
    boxes: list


def gaussian_radius(h: float, w: float, min_overlap: float = MIN_OVERLAP) -> float:
    """The radius r (in the box's units) within which a box's corners may move while the moved
    box keeps IoU >= `min_overlap` with the true one: the smallest of three cases.

    This is CenterNet's (and CornerNet's) `gaussian_radius`, each case the larger root of a
    quadratic a r^2 - b r + c = 0 written as (b + sqrt(b^2 - 4ac)) / 2, kept as published
    (the case formulas are known to be loose, but they are what the paper's results used and
    what users compare against):
      1. both corners shifted the same way:  a = 1, b = h + w, c = w h (1 - o) / (1 + o);
      2. the moved box inside the true one:  a = 4, b = 2 (h + w), c = (1 - o) w h;
      3. the moved box around the true one: a = 4 o, b = -2 o (h + w), c = (o - 1) w h.
    """
    o = min_overlap
    roots = []
    for a, b, c in ((1.0, h + w, w * h * (1 - o) / (1 + o)),
                    (4.0, 2 * (h + w), (1 - o) * w * h),
                    (4 * o, -2 * o * (h + w), (o - 1) * w * h)):
        roots.append((b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / 2)
    return min(roots)


@functools.lru_cache(maxsize=64)
def _gaussian(radius: int) -> torch.Tensor:
    """[2r+1, 2r+1] float32 Gaussian of sigma (2r+1)/6, exactly 1.0 in the middle (cached: a data
    set has a handful of radii and the training loop asks for them every batch)."""
    sigma = (2 * radius + 1) / 6
    d = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma * sigma))
    g[g < torch.finfo(torch.float32).eps] = 0  # the far corners of a large window are noise, not signal
    return g


def _splat(heat: torch.Tensor, cx: int, cy: int, radius: int) -> None:
    """Max a Gaussian of `radius` cells centred on cell (cx, cy) into `heat` [Ho, Wo]."""
    ho, wo = heat.shape
    g = _gaussian(radius)
    y0, y1 = max(0, cy - radius), min(ho, cy + radius + 1)
    x0, x1 = max(0, cx - radius), min(wo, cx + radius + 1)
    patch = g[y0 - cy + radius:y1 - cy + radius, x0 - cx + radius:x1 - cx + radius]
    torch.maximum(heat[y0:y1, x0:x1], patch, out=heat[y0:y1, x0:x1])


_warned_overflow = False


def build_targets(boxes: Sequence[torch.Tensor], classes: int, out_hw: tuple[int, int], stride: int,
                  max_objects: int) -> CenterNetTargets:
    """CenterNet targets for a batch of true boxes (one float32 [m_i, 5] tensor per image).

    Each object's center (in output cells: pixels / stride) picks its cell (floor, kept inside
    the map) and its offset; its Gaussian radius comes from its size in cells rounded up
    (`gaussian_radius(ceil(h), ceil(w))`, integer part, at least 0, as CenterNet computes it). Boxes of zero width or height are skipped.
    More than `max_objects` objects in one image: the first `max_objects` are kept (their
    heat and their regression targets) and the rest dropped, with a warning the first time.
    A class outside 0..classes-1 is a DataError.
    """
    global _warned_overflow
    ho, wo = int(out_hw[0]), int(out_hw[1])
    b, k = len(boxes), int(max_objects)
    heat = torch.zeros(b, classes, ho, wo)  # [B, classes, Ho, Wo]: one map per class, made channels-last at the end
    index = [[0] * k for _ in range(b)]
    size = [[[0.0, 0.0]] * k for _ in range(b)]
    offset = [[[0.0, 0.0]] * k for _ in range(b)]
    mask = [[0.0] * k for _ in range(b)]
    for i, bx in enumerate(boxes):
        bx = torch.as_tensor(bx, dtype=torch.float32).reshape(-1, 5)
        if bx.numel() and (bx[:, 0].min() < 0 or bx[:, 0].max() >= classes):
            bad = int(bx[:, 0].max()) if bx[:, 0].max() >= classes else int(bx[:, 0].min())
            raise DataError(f"a true box has class {bad}, but the network detects {classes} classes "
                            f"(0..{classes - 1}); make its last layer output {bad + 1} + 4 channels or fix the labels")
        j = 0
        for cls, x1, y1, x2, y2 in bx.tolist():
            w, h = (x2 - x1) / stride, (y2 - y1) / stride  # in output cells
            if w <= 0 or h <= 0:
                continue
            if j == k:
                if not _warned_overflow:
                    warnings.warn(f"an image has more than {k} objects; the objects past the first {k} are left out "
                                  "of the training targets (raise max_objects to keep them)", stacklevel=2)
                    _warned_overflow = True
                break
            fx, fy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
            cx, cy = min(max(int(math.floor(fx)), 0), wo - 1), min(max(int(math.floor(fy)), 0), ho - 1)
            # CenterNet's: the radius of the box rounded up to whole cells, then its integer part
            _splat(heat[i, int(cls)], cx, cy, max(0, int(gaussian_radius(math.ceil(h), math.ceil(w)))))
            index[i][j] = cy * wo + cx
            size[i][j] = [w, h]
            # a center on the map's far edge (a box touching it) is kept in the last cell, just under 1
            offset[i][j] = [min(max(fx - cx, 0.0), ONE_BELOW), min(max(fy - cy, 0.0), ONE_BELOW)]
            mask[i][j] = 1.0
            j += 1
    return CenterNetTargets(heatmap=heat.permute(0, 2, 3, 1).contiguous(),
                            index=torch.tensor(index, dtype=torch.int32).reshape(b, k),
                            size=torch.tensor(size, dtype=torch.float32).reshape(b, k, 2),
                            offset=torch.tensor(offset, dtype=torch.float32).reshape(b, k, 2),
                            mask=torch.tensor(mask, dtype=torch.float32).reshape(b, k))


def check_augment(cfg) -> None:
    """Refuse augmentations detection cannot follow: cutout would hide objects whose boxes and
    heatmap peaks stay in the targets (the loss would teach the network to see what is not there)."""
    if cfg is not None and getattr(cfg, "cutout", 0):
        raise DataError("augment cutout is not supported for detection: a cut-out square can hide an object its "
                        "true box still claims; remove cutout= from the augment line (flip and crop move the boxes)")


def clip_boxes(boxes: torch.Tensor, h: int, w: int, keep_area: float = KEEP_AREA) -> torch.Tensor:
    """Boxes [m, 5] clipped to a [0, w] x [0, h] image; those keeping less than `keep_area` of their
    area (mostly cropped away) or nothing at all are dropped."""
    if not len(boxes):
        return boxes
    area = (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 4] - boxes[:, 2])
    out = boxes.clone()
    out[:, 1::2] = out[:, 1::2].clamp(0, w)
    out[:, 2::2] = out[:, 2::2].clamp(0, h)
    kept = (out[:, 3] - out[:, 1]) * (out[:, 4] - out[:, 2])
    ok = (kept > 0) & (kept >= keep_area * area)
    return out[ok]


def augment_detection(x: torch.Tensor, boxes: Sequence[torch.Tensor], cfg,
                      gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random crop after zero padding, then horizontal flip, of images [N,C,H,W] and their boxes.

    The random numbers are drawn as `transforms.augment` draws them (crop offsets, then the
    flip mask), so a seed gives the same image transforms as in classification. A crop at
    offset (oy, ox) of the padded image shifts every box by (p - ox, p - oy); a flip maps x to
    W - x (x1 and x2 swap). Boxes are then clipped and the mostly-lost ones dropped
    (`clip_boxes`). Cutout is refused (`check_augment`).
    """
    check_augment(cfg)
    n, c, h, w = x.shape
    boxes = [b.clone() for b in boxes]
    if cfg.crop:
        p = int(cfg.crop)
        x, oy, ox = random_crop(x, p, gen)
        for i, b in enumerate(boxes):
            b[:, 1::2] += p - int(ox[i])
            b[:, 2::2] += p - int(oy[i])
    if cfg.flip:
        m = torch.rand(n, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(-1), x)
        for i, b in enumerate(boxes):
            if m[i]:
                b[:, 1], b[:, 3] = w - b[:, 3], w - b[:, 1]
    return x.contiguous(), [clip_boxes(b, h, w) for b in boxes]


def detection_batches(ds: Dataset, batch: int, *, order: torch.Tensor | None = None, drop_last: bool = False,
                      augment_cfg=None, gen: torch.Generator | None = None, rank: int = 0, world: int = 1,
                      out_hw: tuple[int, int], stride: int,
                      max_objects: int = 100, classes: int | None = None
                      ) -> Iterator[tuple[torch.Tensor, DetectionBatch]]:
    """Yield (x [B,C,H,W], DetectionBatch) for a detection set, as `loader.batches` does for labels.

    Each global batch is augmented as a whole (crop and flip move its boxes; cutout is refused
    with a DataError, see `check_augment`), then process `rank` of `world` takes its contiguous
    slice, and the targets are built for that slice's boxes at the output size `out_hw`
    (Ho, Wo) and `stride`, with `max_objects` slots per image and `classes` heatmaps (the
    network's class count; by default the set's, which `load_dataset` pads to the network's).
    """
    if ds.boxes is None:
        raise DataError(f"data '{ds.name}' has no boxes: detection needs a detection set "
                        "(shapes_boxes, or a YOLO folder with images/ and labels/)")
    check_augment(augment_cfg)
    n = len(ds)
    idx = order if order is not None else torch.arange(n)
    stop = n - n % batch if (drop_last and n >= batch) else n
    do_aug = augment_cfg is not None and gen is not None and bool(augment_cfg.crop or augment_cfg.flip)
    classes = int(classes) if classes is not None else len(ds.classes)
    for s in range(0, stop, batch):
        sel = idx[s:s + batch]
        x, boxes = ds.x[sel], [ds.boxes[i] for i in sel.tolist()]
        if do_aug:
            x, boxes = augment_detection(x, boxes, augment_cfg, gen)
        if world > 1:
            per = (len(sel) + world - 1) // world
            x, boxes = x[rank * per:(rank + 1) * per], boxes[rank * per:(rank + 1) * per]
        targets = build_targets(boxes, classes, out_hw, stride, max_objects)
        yield x, DetectionBatch(targets, boxes)
