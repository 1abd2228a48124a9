"""From a name or a path to checked, split, batched data.

`load_dataset` loads a built-in set or user data and normalises it;
`check_compatible` refuses data the network cannot take before any training;
`split` makes the deterministic train/validation split; `epoch_order` and
`batches` feed the training loop (augmenting each global batch as a whole, so
data-parallel processes draw what a single process would).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from engine.errors import DataError
from engine.training.data import builtin
from engine.training.data.dataset import Dataset
from engine.training.data.formats import load_path
from engine.training.data.transforms import augment, augments, normalised
from engine.training.data.yolo import is_yolo_folder, load_yolo


def load_dataset(spec: str, *, input_shape: Sequence[int] | None = None, num_classes: int | None = None,
                 seed: int = 0, part: str = "train") -> Dataset:
    """Load a built-in set by name or user data from a path; normalise per channel.

    `input_shape` (C,H,W) and `num_classes` shape the synthetic `shapes` set;
    real data is loaded as it is and checked with `check_compatible`, except that a
    label at or past `num_classes` is refused while loading (one huge label must not
    make a list of 10^15 class names). `part` picks
    the training or test files of IDX and CIFAR folders ("train" | "test").

    Detection sets (task "detect", with `boxes`): `shapes_boxes` (synthetic, drawn at the
    network's input size, default 3x48x48) and a YOLO folder (`images/` + `labels/`, resized to
    `input_shape` when given). For them `num_classes` is the network's class count (its heatmap
    channels, i.e. output channels - 4): a label past it is refused, and the class names are
    padded to it ("unused3", ...) so `len(ds.classes)` is what the targets need.
    """
    if spec == "digits":
        x, y, classes, name = *builtin.digits(), "digits"
    elif spec == "mnist5k":
        x, y, classes, name = *builtin.mnist5k(), "mnist5k"
    elif spec == "shapes":
        c, h, w = tuple(input_shape) if input_shape else (3, 32, 32)
        x, y, classes = builtin.shapes(c, h, w, num_classes or 2, seed=seed)
        return normalised(Dataset("shapes (synthetic)", x, y, classes, task="segment", synthetic=True))
    elif spec == "shapes_boxes":
        c, h, w = tuple(input_shape) if input_shape else builtin.SHAPES_BOXES_SIZE
        x, boxes, classes = builtin.shapes_boxes(c, h, w, seed=seed)
        if num_classes is not None and num_classes < len(classes):
            raise DataError(f"the synthetic 'shapes_boxes' set has {len(classes)} classes ({', '.join(classes)}) but "
                            f"the network detects {num_classes}; make its last layer output "
                            f"{len(classes)} + 4 = {len(classes) + 4} channels")
        return _detection_set("shapes_boxes (synthetic)", x, boxes, classes, num_classes, synthetic=True)
    elif is_yolo_folder(Path(spec).expanduser()):
        x, boxes, classes = load_yolo(Path(spec).expanduser(), part, input_shape=input_shape, max_classes=num_classes)
        return _detection_set(str(Path(spec).expanduser()), x, boxes, classes, num_classes)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DataError(
                f"data '{spec}' is neither a built-in data set ({', '.join(builtin.BUILTIN)}) nor an existing path")
        x, y, classes = load_path(path, part, max_classes=num_classes)
        name = str(path)
    task = "segment" if y.ndim == 3 else "classify"
    return normalised(Dataset(name, x, y, classes, task=task))


def _detection_set(name: str, x: torch.Tensor, boxes: list, classes: list[str], num_classes: int | None,
                   synthetic: bool = False) -> Dataset:
    classes = list(classes) + [f"unused{j}" for j in range(len(classes), num_classes or 0)]
    counts = torch.tensor([len(b) for b in boxes], dtype=torch.int64)
    return normalised(Dataset(name, x, counts, classes, task="detect", synthetic=synthetic, boxes=list(boxes)))


def check_compatible(ds: Dataset, input_shape: Sequence[int], output_shape: Sequence[int], network: str = "network") -> None:
    """Refuse, before training, data whose shapes, channels or labels the network cannot take."""
    want = tuple(int(s) for s in input_shape)
    got = ds.image_shape
    fmt = lambda s: "x".join(map(str, s))  # noqa: E731
    if got[0] != want[0]:
        raise DataError(
            f"data '{ds.name}' has {got[0]}-channel images ({fmt(got)}) but network '{network}' takes "
            f"{want[0]} channels (input {fmt(want)})")
    if got != want:
        raise DataError(
            f"data '{ds.name}' has images of {fmt(got)} but network '{network}' takes input {fmt(want)}")
    out = tuple(int(s) for s in output_shape)
    if ds.task == "detect":
        return _check_detection(ds, want, out, network)
    k = out[0]
    if ds.task == "segment" and len(out) != 3:
        raise DataError(
            f"data '{ds.name}' is a segmentation set (per-pixel labels) but network '{network}' outputs "
            f"{fmt(out)}, not a [classes x H x W] map")
    if ds.task == "classify" and len(out) != 1:
        raise DataError(
            f"data '{ds.name}' has one label per image but network '{network}' outputs a {fmt(out)} map; "
            f"end the network with global_avgpool and linear <classes>")
    if ds.task == "segment" and tuple(ds.y.shape[1:]) != out[1:]:
        raise DataError(
            f"data '{ds.name}' has {fmt(ds.y.shape[1:])} label maps but network '{network}' outputs {fmt(out[1:])}")
    top = int(ds.y.max()) if ds.y.numel() else -1
    if top >= k:
        raise DataError(
            f"data '{ds.name}' has labels up to {top} ({top + 1} classes) but network '{network}' has "
            f"{k} outputs; make its last layer output {top + 1} classes")


def _check_detection(ds: Dataset, want: tuple[int, ...], out: tuple[int, ...], network: str) -> None:
    """A detection set needs a [classes + 4, Ho, Wo] output at one integer stride, with a heatmap for
    every class its boxes use."""
    fmt = lambda s: "x".join(map(str, s))  # noqa: E731
    if len(out) != 3:
        raise DataError(
            f"data '{ds.name}' is a detection set (boxes) but network '{network}' outputs {fmt(out)}, not a "
            f"[classes + 4] x H x W map; end the network with a conv of {len(ds.classes)} + 4 channels")
    k = out[0] - 4
    if k < 1:
        raise DataError(
            f"network '{network}' outputs {out[0]} channels; a detection network needs classes + 4 "
            f"(heatmaps, width, height, offset x, y): {len(ds.classes) + 4} for data '{ds.name}'")
    h, w = want[1], want[2]
    if h % out[1] or w % out[2] or h // out[1] != w // out[2]:
        raise DataError(
            f"network '{network}' maps its {h}x{w} input to a {out[1]}x{out[2]} output: not one integer stride "
            f"for detection; make the output a whole fraction (1/2, 1/4, ...) of the input on both sides")
    top = max((int(b[:, 0].max()) for b in ds.boxes or [] if len(b)), default=-1)
    if top >= k:
        raise DataError(
            f"data '{ds.name}' has boxes of class {top} ({top + 1} classes) but network '{network}' detects {k} "
            f"(outputs {out[0]} = {k} + 4 channels); make its last layer output {top + 1} + 4 = {top + 5} channels")


def check_trainable(ds: Dataset) -> None:
    """Refuse a classification set with a single class (it trains to a meaningless 100%) and a
    detection set without a single object (nothing to find: every mAP would be undefined)."""
    if ds.task == "detect" and len(ds) and not any(len(b) for b in ds.boxes or []):
        raise DataError(f"data '{ds.name}' has no objects in any of its {len(ds)} images: a detector needs boxes "
                        "(a YOLO folder needs labels/NAME.txt beside images/NAME.png, one 'class cx cy w h' line "
                        "per object)")
    if ds.task != "classify" or not len(ds):
        return
    present = torch.unique(ds.y)
    if len(present) < 2:
        only = int(present[0])
        name = ds.classes[only] if only < len(ds.classes) else str(only)
        raise DataError(
            f"data '{ds.name}' has a single class ('{name}', all {len(ds)} images): a classifier needs at least two "
            "(an image folder needs one subfolder per class)")


def split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Deterministic train/validation split: a permutation drawn from `seed`."""
    n = len(ds)
    n_val = int(round(n * fraction))
    if fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= n:
        raise DataError(f"split {fraction} leaves no training images out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1_000_003))
    return ds.subset(perm[n_val:]), ds.subset(perm[:n_val])


def epoch_order(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)


def batches(ds: Dataset, batch: int, *, order: torch.Tensor | None = None, drop_last: bool = False,
            augment_cfg=None, gen: torch.Generator | None = None, rank: int = 0,
            world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) batches of `batch` images (the global batch) in `order`.

    With `world` > 1, each global batch is augmented as a whole (so every process
    draws the same random numbers as a single process would) and process `rank`
    gets its contiguous slice of batch // world images.
    """
    n = len(ds)
    idx = order if order is not None else torch.arange(n)
    stop = n - n % batch if (drop_last and n >= batch) else n
    for s in range(0, stop, batch):
        sel = idx[s:s + batch]
        x, y = ds.x[sel], ds.y[sel]
        if augment_cfg is not None and gen is not None and augments(augment_cfg):
            x, y = augment(x, y, augment_cfg, gen)
        if world > 1:
            per = (len(sel) + world - 1) // world
            x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        yield x, y
