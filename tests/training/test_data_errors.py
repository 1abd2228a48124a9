"""Bad data gets one clear DataError, before anything is built from it: a huge label
(bounded by the network's outputs), labels shaped [N,1], strings, complex numbers,
an empty file, a single class."""
from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import DataError
from engine.training import data as D


def _npz(tmp_path, x, y, name="d.npz"):
    p = tmp_path / name
    np.savez(p, x=x, y=y)
    return str(p)


def test_one_huge_label_is_refused_at_once(tmp_path):
    y = np.zeros(20, np.int64)
    y[3] = 10**15
    p = _npz(tmp_path, np.zeros((20, 8, 8), np.uint8), y)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="labels go up to 1000000000000000: the network has 10 outputs"):
        D.load_dataset(p, num_classes=10)
    with pytest.raises(DataError, match="more than 100,000 classes"):
        D.load_dataset(p)  # without a network to bound it
    assert time.perf_counter() - t0 < 5


def test_labels_in_a_column_are_accepted(tmp_path):
    ds = D.load_dataset(_npz(tmp_path, np.zeros((6, 8, 8), np.uint8), np.arange(6).reshape(6, 1) % 2))
    assert ds.y.shape == (6,) and ds.y.tolist() == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((4, 8, 8)), np.array(["a", "b", "a", "b"]), "labels must be integers; got dtype <U1"),
    (np.array([["a"] * 8] * 8 * 4).reshape(4, 8, 8), np.arange(4), "images must be real numbers; got dtype <U1"),
    (np.zeros((4, 8, 8), np.complex64), np.arange(4), "images must be real numbers; got complex numbers"),
    (np.zeros((4, 8, 8)), np.zeros((4, 2)), r"labels must be \[N\] \(one per image\)"),
    (np.zeros((0, 8, 8)), np.zeros(0), "holds no images"),
    (np.zeros((4, 8, 8)), np.array([0, 1.5, 2, 3]), "fractional"),
])
def test_malformed_npz_is_one_clear_error(tmp_path, x, y, message):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning or UserWarning on the way
        with pytest.raises(DataError, match=message):
            D.load_dataset(_npz(tmp_path, x, y), num_classes=10)


def test_a_single_class_is_refused_for_training(tmp_path):
    root = tmp_path / "folder"
    (root / "cats").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / "cats" / f"{i}.png")
    ds = D.load_dataset(str(root))
    with pytest.raises(DataError, match="single class \\('cats', all 3 images\\)"):
        D.check_trainable(ds)
    D.check_trainable(ds.subset(torch.arange(0)))  # nothing to say about an empty subset


def test_pixel_scale_follows_the_data(tmp_path):
    as_float = D.load_dataset(_npz(tmp_path, np.full((4, 8, 8), 200.0, np.float32) * np.arange(4)[:, None, None] / 3,
                                   np.arange(4)))
    as_uint8 = D.load_dataset(_npz(tmp_path, np.arange(4 * 64, dtype=np.uint8).reshape(4, 8, 8), np.arange(4),
                                   "u8.npz"))
    as_uint16 = D.load_dataset(_npz(tmp_path, np.arange(4 * 64, dtype=np.uint16).reshape(4, 8, 8) * 200,
                                    np.arange(4), "u16.npz"))
    assert (as_float.pixel_scale, as_uint8.pixel_scale, as_uint16.pixel_scale) == (255.0, 1.0, 65535.0)
    assert D.load_dataset("digits").pixel_scale == 1.0
