"""The YOLO text format for detection: a folder with `images/` and `labels/`.

    data/
      images/a.png  images/b.jpg ...       (or images/train/, images/val/ with labels/train/, labels/val/)
      labels/a.txt  labels/b.txt ...       one line per object: class cx cy w h
      classes.txt or data.yaml             optional: the class names (only `names` is read)

Coordinates are normalised by the image's width and height (0..1), so an image
resized to the network's input keeps its boxes with no arithmetic beyond a
multiplication. An image with no labels file holds no objects (YOLO's own
convention for background images). Every mistake in a labels file is reported at
`file:line` with what is wrong and how to fix it, because a detection set has
thousands of such files and "bad data" alone finds nothing.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import torch

from engine.errors import DataError
from engine.training.data.formats import IMAGE_EXTS, MAX_CLASSES, read_image

EDGE_TOLERANCE = 0.005  # how far (in image fractions) a box may poke past the image edge before it is an error
SPLITS = {"train": ("train",), "test": ("test", "val", "valid")}


def is_yolo_folder(path: Path) -> bool:
    """A folder laid out as YOLO data: `images/` and `labels/` side by side."""
    return path.is_dir() and (path / "images").is_dir() and (path / "labels").is_dir()


def _folders(path: Path, part: str) -> tuple[Path, Path]:
    """The images and labels folders to read: `images/` itself, or its `train` / `val` subfolder when
    the images are split that way (part "train" reads train, "test" reads test, val or valid)."""
    images = path / "images"
    if any(f.suffix.lower() in IMAGE_EXTS for f in images.iterdir() if f.is_file()):
        return images, path / "labels"
    for name in SPLITS.get(part, (part,)):
        if (images / name).is_dir():
            return images / name, path / "labels" / name
    subs = sorted(p.name for p in images.iterdir() if p.is_dir())
    raise DataError(f"data '{path}': no images in {images}" + (
        f" and no '{'/'.join(SPLITS.get(part, (part,)))}' subfolder for the {part} part (found: {', '.join(subs)})"
        if subs else "; put the image files there and one labels/NAME.txt per image"))


def _yaml_names(text: str, where: Path) -> list[str] | None:
    """The `names` of a YOLO data.yaml: a flow list `[a, b]`, a block list `- a`, or a map `0: a`.
    Only this key is read (the paths in the file describe another machine's layout)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^names\s*:\s*(.*?)\s*(#.*)?$", line)
        if not m:
            continue
        rest = m.group(1)
        if rest.startswith("["):
            body = rest.strip("[]")
            return [s.strip().strip("'\"") for s in body.split(",") if s.strip()]
        if rest:
            raise DataError(f"{where}:{i + 1}: cannot read the class names '{rest}'; write them as "
                            "names: [cat, dog] or one '- name' per line")
        names: dict[int, str] = {}
        for j, item in enumerate(lines[i + 1:], start=i + 2):
            if not item.strip() or item.lstrip().startswith("#"):
                continue
            if not item[:1].isspace():
                break
            entry = item.strip()
            if entry.startswith("-"):
                names[len(names)] = entry[1:].strip().strip("'\"")
            elif (kv := re.match(r"^(\d+)\s*:\s*(.+)$", entry)):
                names[int(kv.group(1))] = kv.group(2).strip().strip("'\"")
            else:
                raise DataError(f"{where}:{j}: cannot read the class name line '{entry}'; write '- name' or "
                                "'0: name'")
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{where}: the class numbers under 'names' must run 0, 1, 2, ...; found "
                            f"{sorted(names)}")
        return [names[k] for k in range(len(names))]
    return None


def read_class_names(path: Path) -> list[str] | None:
    """Class names from `classes.txt` (one per line) or `data.yaml` / `dataset.yaml`, if present."""
    txt = path / "classes.txt"
    if txt.is_file():
        return [line.strip() for line in txt.read_text().splitlines() if line.strip()]
    for name in ("data.yaml", "dataset.yaml", "data.yml"):
        f = path / name
        if f.is_file():
            return _yaml_names(f.read_text(), f)
    return None


def _number(tok: str, what: str, where: str, line: str) -> float:
    try:
        v = float(tok)
    except ValueError:
        raise DataError(f"{where}: the {what} '{tok}' is not a number (line: '{line}'); a line is "
                        "'class cx cy w h' with numbers only") from None
    if not math.isfinite(v):
        raise DataError(f"{where}: the {what} is {tok} (line: '{line}'); every value must be a finite number")
    return v


def parse_label_line(line: str, where: str, max_classes: int | None, names: Sequence[str] | None
                     ) -> tuple[int, float, float, float, float]:
    """One `class cx cy w h` line, checked; `where` is `file:line` for the messages."""
    fields = line.split()
    if len(fields) != 5:
        hint = ("it looks like a segmentation polygon (class x1 y1 x2 y2 ...); fusenet reads boxes: "
                "class cx cy w h" if len(fields) > 5 and len(fields) % 2 == 1 else "a line is 'class cx cy w h'")
        raise DataError(f"{where}: expected 5 values (class cx cy w h), found {len(fields)} (line: '{line}'); {hint}")
    c = _number(fields[0], "class", where, line)
    if c != int(c):
        raise DataError(f"{where}: the class '{fields[0]}' is not a whole number (line: '{line}'); "
                        "classes are numbered 0, 1, 2, ...")
    cls = int(c)
    cx, cy, w, h = (_number(t, n, where, line) for t, n in zip(fields[1:], ("cx", "cy", "w", "h")))
    if cls < 0:
        raise DataError(f"{where}: class {cls} is negative (line: '{line}'); classes are numbered 0, 1, 2, ...")
    if max_classes is not None and cls >= max_classes:
        raise DataError(f"{where}: class {cls} is out of range: the network detects {max_classes} classes "
                        f"(0..{max_classes - 1}); fix the label or make the network's last layer output "
                        f"{cls + 1} + 4 = {cls + 5} channels")
    if names is not None and cls >= len(names):
        raise DataError(f"{where}: class {cls} is out of range: the class names list {len(names)} "
                        f"(0..{len(names) - 1}); fix the label or add the missing names")
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: the box has {'width' if w <= 0 else 'height'} {w if w <= 0 else h:g} "
                        f"(line: '{line}'); width and height must be greater than 0")
    for axis, centre, extent in (("x", cx, w), ("y", cy, h)):
        lo, hi = centre - extent / 2, centre + extent / 2
        if lo < -EDGE_TOLERANCE or hi > 1 + EDGE_TOLERANCE:
            pixels = " (these look like pixels: divide by the image size)" if max(abs(centre), extent) > 1.5 else ""
            raise DataError(f"{where}: the box is outside the image: it spans {axis} {lo:.4g}..{hi:.4g} (line: "
                            f"'{line}'); coordinates are fractions of the image size, centre +- size/2 within "
                            f"0..1{pixels}")
    return cls, cx, cy, w, h


def read_labels(path: Path, max_classes: int | None = None, names: Sequence[str] | None = None
                ) -> list[tuple[int, float, float, float, float]]:
    """The checked objects of one labels file (blank lines skipped)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read this labels file ({e}); it must be plain text, "
                        "one 'class cx cy w h' line per object") from None
    return [parse_label_line(line.strip(), f"{path}:{i}", max_classes, names)
            for i, line in enumerate(text.splitlines(), start=1) if line.strip()]


def load_yolo(path: Path, part: str = "train", *, input_shape: Sequence[int] | None = None,
              max_classes: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor], list[str]]:
    """Images [N,C,H,W] in [0,1], boxes (float32 [m_i, 5] of class, x1, y1, x2, y2 in pixels of the
    loaded image) and class names of a YOLO folder.

    Images are read at `input_shape` (C,H,W: the network's input; converted and resized as
    `fusenet predict` does) or, without one, at the first image's size and channels (others
    resized to it). Boxes are clipped to the image (within the edge tolerance). The class names
    come from classes.txt / data.yaml, else "0".."K-1" for the largest class K-1 found.
    """
    images_dir, labels_dir = _folders(path, part)
    files = sorted(f for f in images_dir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
    names = read_class_names(path)
    if names is not None and not names:
        raise DataError(f"data '{path}': its class names file lists no names; write one name per class")
    bound = max_classes if max_classes is not None else (None if names is not None else MAX_CLASSES)
    shape = tuple(input_shape) if input_shape else None
    xs, boxes, top = [], [], -1
    for f in files:
        img, _ = read_image(f, shape)
        if shape is None:
            shape = tuple(img.shape)
        _, h, w = shape
        label = labels_dir / (f.stem + ".txt")
        objects = read_labels(label, bound, names) if label.is_file() else []
        rows = [[c, max(0.0, cx - bw / 2) * w, max(0.0, cy - bh / 2) * h, min(1.0, cx + bw / 2) * w,
                 min(1.0, cy + bh / 2) * h] for c, cx, cy, bw, bh in objects]
        top = max([top] + [r[0] for r in rows])
        xs.append(img)
        boxes.append(torch.tensor(rows, dtype=torch.float32).reshape(-1, 5))
    if not xs:
        raise DataError(f"data '{path}': {images_dir} holds no image files "
                        f"({', '.join(sorted(IMAGE_EXTS))})")
    stems = {f.stem for f in files}
    orphans = sorted(f.name for f in labels_dir.glob("*.txt") if f.stem not in stems) if labels_dir.is_dir() else []
    if orphans and not any(len(b) for b in boxes):
        raise DataError(f"data '{path}': no labels file matches an image (e.g. {labels_dir / orphans[0]} has no "
                        f"{images_dir.name}/{Path(orphans[0]).stem}.<png|jpg|...>); a labels file takes its image's "
                        "name with .txt")
    classes = list(names) if names is not None else [str(k) for k in range(max(top + 1, 1))]
    return torch.stack(xs), boxes, classes
