"""User data from a path: the file formats fusenet reads.

- an image folder: one subfolder per class (PNG, JPEG, BMP, GIF, PPM/PGM, TIFF, WebP);
- an `.npz` file with arrays `x` (images) and `y` (labels);
- IDX files (MNIST format, optionally gzipped): an images file beside its labels file;
- a folder of CIFAR-10 python batches, read with an allow-listed unpickler
  (plain containers and numpy arrays only: a data file cannot run code).

`load_path(path, part, max_classes)` returns (images [N,C,H,W] float32, labels,
class names); a label at or past `max_classes` (the network's outputs) is refused
before any list of class names is built. `read_image` reads one image file with
notes on what it converted (what `fusenet predict` prints); `load_image` the same
without the notes.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from engine.errors import DataError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


MAX_CLASSES = 100_000  # without a network to bound them: more is a broken label, not a data set


def load_path(path: Path, part: str, max_classes: int | None = None):
    if path.is_file():
        if path.suffix == ".npz":
            return _npz(path, max_classes)
        if "idx" in path.name or path.name.endswith("-ubyte") or path.name.endswith("-ubyte.gz"):
            return _idx_pair(path, max_classes)
        raise DataError(
            f"data '{path}': unknown file type (expected a .npz file, an IDX images file, or a folder)")
    files = sorted(p for p in path.iterdir() if p.is_file())
    names = [p.name for p in files]
    if any(n.startswith("data_batch") or n == "test_batch" for n in names):
        return _cifar(path, part, max_classes)
    idx = [p for p in files if "images-idx3" in p.name or "images.idx3" in p.name]
    if idx:
        want = "t10k" if part == "test" else "train"
        chosen = [p for p in idx if p.name.startswith(want)] or idx
        return _idx_pair(chosen[0], max_classes)
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        return _image_folder(path, subdirs)
    raise DataError(
        f"data folder '{path}' holds no class subfolders, IDX files or CIFAR-10 batches")


def _as_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """Images as [N,C,H,W]; vectors [N,F] (for networks with `input F`) as they are."""
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x
    raise DataError(f"{where}: images must be [N,H,W], [N,C,H,W] or [N,H,W,C] (vectors [N,F]); "
                    f"got shape {list(x.shape)}")


def _to_unit_float(x: np.ndarray, where: str = "data") -> torch.Tensor:
    """uint8 pixels to [0, 1]; other real numbers as they are (their scale is recorded, see transforms)."""
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_):
        kind = "complex numbers" if np.issubdtype(x.dtype, np.complexfloating) else f"dtype {x.dtype}"
        raise DataError(f"{where}: images must be real numbers; got {kind}")
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32) / 255.0)
    return torch.from_numpy(x.astype(np.float32))


def _labels(y: np.ndarray, where: str, n: int, max_classes: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Integer labels [N] (or label maps [N,H,W]) and their class names "0".."K-1"."""
    if y.ndim == 2 and y.shape[1] == 1:  # a column of labels, [N, 1]
        y = y[:, 0]
    if y.ndim not in (1, 3) or len(y) != n:
        raise DataError(f"{where}: labels must be [N] (one per image) or [N,H,W] (label maps) for {n} images; "
                        f"got shape {list(y.shape)}")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating) or y.dtype == np.bool_):
        raise DataError(f"{where}: labels must be integers; got dtype {y.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.all(np.isfinite(y)) and np.all(np.mod(y, 1) == 0)):
            raise DataError(f"{where}: labels must be integers; got dtype {y.dtype} with fractional or non-finite values")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: labels must be >= 0; found {y.min():g}")
    top = float(y.max()) if y.size else -1.0
    bound = max_classes or MAX_CLASSES
    if top >= bound:
        why = (f"the network has {max_classes} outputs; make its last layer output {int(top) + 1} classes "
               "or fix the labels") if max_classes else f"more than {MAX_CLASSES:,} classes is not a data set fusenet reads"
        raise DataError(f"{where}: labels go up to {top:.0f}: {why}")
    y = y.astype(np.int64)
    k = int(top) + 1
    return torch.from_numpy(y), [str(i) for i in range(k)]


def _npz(path: Path, max_classes: int | None = None):
    where = f"data '{path}'"
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise DataError(f"{where}: an .npz data file needs arrays 'x' and 'y'; found {sorted(z.files)}")
            x, y = z["x"], z["y"]
    except (ValueError, OSError) as e:
        raise DataError(f"{where}: cannot read .npz file ({e})") from None
    x = _as_nchw(x, where)
    if len(x) == 0:
        raise DataError(f"{where}: holds no images (x has shape {list(x.shape)})")
    if y.ndim == 0 or len(x) != len(y):
        raise DataError(f"{where}: {len(x)} images but {y.size if y.ndim == 0 else len(y)} labels")
    xt = _to_unit_float(x, where)
    yt, classes = _labels(y, where, len(x), max_classes)
    return xt, yt, classes


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


def _idx_pair(images: Path, max_classes: int | None = None):
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
    yt, classes = _labels(y, where, len(x), max_classes)
    return _to_unit_float(x, where), yt, classes


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


def _cifar(path: Path, part: str, max_classes: int | None = None):
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
    y, classes = _labels(np.concatenate(ys), f"data '{path}'", sum(map(len, ys)), max_classes)
    meta = path / "batches.meta"
    if meta.exists():
        names_ = _unpickle(meta).get("label_names")
        if names_ and len(names_) >= len(classes):
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names_]
    return _to_unit_float(np.concatenate(xs)), y, classes


HIGH_BIT_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "F": 1.0}


def read_image(path: str | Path, shape: Sequence[int] | None = None) -> tuple[torch.Tensor, list[str]]:
    """One image file as [C,H,W] in [0,1], and notes on what was changed to get there:
    converted to the network's channels (`shape` C,H,W), resized, rescaled from 16 bits.
    An unreadable file is a DataError naming it."""
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
        raise DataError(f"cannot read image '{path}' ({type(e).__name__}: {e})") from None
    notes = []
    want_c = shape[0] if shape is not None else None
    if img.mode in HIGH_BIT_MODES:  # 16-bit or float grey: scale to [0,1] before anything converts (and clips) it
        full = HIGH_BIT_MODES[img.mode]
        a = np.asarray(img, dtype=np.float32) / full
        if full != 1.0:
            notes.append(f"16-bit grey image scaled to [0, 1] (divided by {full:.0f})")
        img = Image.fromarray(np.clip(a, 0.0, 1.0).astype(np.float32), mode="F")
    else:
        target = ("L" if want_c == 1 else "RGB") if want_c is not None else ("L" if img.mode in ("L", "1", "LA") else "RGB")
        if img.mode != target:
            if want_c is not None:
                notes.append(f"converted from {img.mode} to {'grey' if target == 'L' else 'RGB'} "
                             f"(the network takes {want_c} channel{'s' if want_c > 1 else ''})"
                             + ("; the alpha channel is dropped" if "A" in img.mode else ""))
            img = img.convert(target)
    if shape is not None:
        c, h, w = shape
        if img.size != (w, h):
            notes.append(f"resized from {img.size[0]}x{img.size[1]} to {w}x{h} (the network's input)")
            img = img.resize((w, h), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32)
    if img.mode != "F":
        a = a / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    if shape is not None and a.shape[0] != shape[0]:  # a float grey image for a colour network
        notes.append(f"grey image repeated over the network's {shape[0]} channels")
        a = np.repeat(a[:1], shape[0], axis=0)
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True)), notes


def load_image(path: str | Path, shape: Sequence[int] | None = None) -> torch.Tensor:
    """One image file as [C,H,W] in [0,1]; converted and resized to `shape` (C,H,W) if given."""
    return read_image(path, shape)[0]


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
