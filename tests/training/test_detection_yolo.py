"""The YOLO text format: images/ + labels/, class names, resizing, split folders, and every kind of
malformed labels file reported at file:line with what is wrong and how to fix it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import DataError
from engine.training import data as D
from engine.training.data import yolo


def _close(t, rows, atol=1e-4):
    return torch.allclose(t, torch.tensor(rows, dtype=torch.float32), atol=atol)


def _folder(tmp_path, labels: dict[str, str], sizes: dict[str, tuple[int, int]] | None = None, names=None,
            sub: str = ""):
    """A YOLO folder: one RGB image per name (w, h), a labels file per entry of `labels`."""
    root = tmp_path / "set"
    (root / "images" / sub).mkdir(parents=True, exist_ok=True)
    (root / "labels" / sub).mkdir(parents=True, exist_ok=True)
    sizes = sizes or {k: (40, 20) for k in labels}
    for i, (stem, (w, h)) in enumerate(sizes.items()):
        arr = np.full((h, w, 3), 30 * i, dtype=np.uint8)
        Image.fromarray(arr).save(root / "images" / sub / f"{stem}.png")
    for stem, text in labels.items():
        if text is not None:
            (root / "labels" / sub / f"{stem}.txt").write_text(text)
    if names is not None:
        (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root


def test_reads_boxes_in_pixels_of_the_network_input(tmp_path):
    root = _folder(tmp_path, {"a": "0 0.5 0.5 0.5 0.5\n1 0.25 0.75 0.1 0.2\n", "b": "", "c": None},
                   sizes={"a": (40, 20), "b": (40, 20), "c": (80, 40)}, names=["cat", "dog"])
    assert yolo.is_yolo_folder(root)
    ds = D.load_dataset(str(root), input_shape=(3, 32, 64), num_classes=3)
    assert ds.task == "detect" and ds.x.shape == (3, 3, 32, 64)
    assert ds.classes == ["cat", "dog", "unused2"] and ds.y.tolist() == [2, 0, 0]
    # 64 wide, 32 high: (0.5 +- 0.25) -> x 16..48, y 8..24; (0.25 +- 0.05, 0.75 +- 0.1) -> x 12.8..19.2, y 20.8..27.2
    assert _close(ds.boxes[0], [[0, 16, 8, 48, 24], [1, 12.8, 20.8, 19.2, 27.2]])
    assert ds.boxes[1].shape == (0, 5) and ds.boxes[2].shape == (0, 5)  # empty file, no file: no objects


def test_without_a_network_the_first_image_sets_the_size_and_names_come_from_the_labels(tmp_path):
    root = _folder(tmp_path, {"a": "2 0.5 0.5 1 1\n", "b": "0 0.5 0.5 0.2 0.2\n"}, sizes={"a": (40, 20), "b": (10, 10)})
    x, boxes, classes = yolo.load_yolo(root)
    assert x.shape == (2, 3, 20, 40) and classes == ["0", "1", "2"]
    assert boxes[0].tolist() == [[2, 0, 0, 40, 20]] and _close(boxes[1], [[0, 16, 8, 24, 12]])


@pytest.mark.parametrize("text, names", [
    ("names: [cat, 'dog', bird]\nnc: 3\n", ["cat", "dog", "bird"]),
    ("path: /elsewhere\nnames:\n  - cat\n  - dog\ntrain: images/train\n", ["cat", "dog"]),
    ("names:\n  0: cat\n  1: 'dog'\n", ["cat", "dog"]),
])
def test_class_names_from_data_yaml(tmp_path, text, names):
    root = _folder(tmp_path, {"a": "1 0.5 0.5 0.2 0.2\n"})
    (root / "data.yaml").write_text(text)
    assert yolo.read_class_names(root) == names
    assert D.load_dataset(str(root)).classes == names


def test_a_bad_data_yaml_names_is_located(tmp_path):
    root = _folder(tmp_path, {"a": ""})
    (root / "data.yaml").write_text("nc: 2\nnames: cat dog\n")
    with pytest.raises(DataError, match=r"data.yaml:2: cannot read the class names 'cat dog'"):
        yolo.read_class_names(root)
    (root / "data.yaml").write_text("names:\n  0: cat\n  2: dog\n")
    with pytest.raises(DataError, match="must run 0, 1, 2"):
        yolo.read_class_names(root)


def test_split_folders_follow_the_part(tmp_path):
    _folder(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": ""}, sub="train")
    root = _folder(tmp_path, {"c": "1 0.5 0.5 0.2 0.2\n"}, sub="val")
    assert len(D.load_dataset(str(root), part="train")) == 2
    test = D.load_dataset(str(root), part="test")
    assert len(test) == 1 and test.y.tolist() == [1]


def test_a_folder_without_images_says_so(tmp_path):
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    with pytest.raises(DataError, match="no images in .*images"):
        D.load_dataset(str(root))


BAD = [
    ("0 0.5 0.5 0.2\n", 1, r"expected 5 values \(class cx cy w h\), found 4"),
    ("0 0.5 0.5 0.2 0.2\n\n1 0.1 0.1 0.2 0.3 0.3 0.2\n", 3, "found 7 .* segmentation polygon"),
    ("0 0.5 abc 0.2 0.2\n", 1, "the cy 'abc' is not a number"),
    ("cat 0.5 0.5 0.2 0.2\n", 1, "the class 'cat' is not a number"),
    ("1.5 0.5 0.5 0.2 0.2\n", 1, "the class '1.5' is not a whole number"),
    ("0 0.5 nan 0.2 0.2\n", 1, "the cy is nan .* finite"),
    ("-1 0.5 0.5 0.2 0.2\n", 1, "class -1 is negative"),
    ("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n", 2, r"class 7 is out of range: the network detects 3 classes \(0..2\)"),
    ("0 0.5 0.5 0 0.2\n", 1, "the box has width 0 .* greater than 0"),
    ("0 0.5 0.5 0.2 -0.1\n", 1, "the box has height -0.1"),
    ("0 0.95 0.5 0.2 0.2\n", 1, r"the box is outside the image: it spans x 0.85..1.05"),
    ("0 0.5 0.02 0.2 0.2\n", 1, r"outside the image: it spans y -0.08..0.12"),
    ("0 120 80 30 40\n", 1, "these look like pixels: divide by the image size"),
]


@pytest.mark.parametrize("text, line, message", BAD)
def test_malformed_labels_are_located_errors(tmp_path, text, line, message):
    root = _folder(tmp_path, {"good": "0 0.5 0.5 0.2 0.2\n", "bad": text})
    with pytest.raises(DataError) as e:
        D.load_dataset(str(root), num_classes=3)
    msg = str(e.value)
    assert f"{root / 'labels' / 'bad.txt'}:{line}: " in msg
    assert __import__("re").search(message, msg), msg


def test_class_out_of_range_of_the_names_file(tmp_path):
    root = _folder(tmp_path, {"a": "2 0.5 0.5 0.2 0.2\n"}, names=["cat", "dog"])
    with pytest.raises(DataError, match=r"a.txt:1: class 2 is out of range: the class names list 2 \(0..1\)"):
        D.load_dataset(str(root))


def test_edges_within_tolerance_are_clipped(tmp_path):
    root = _folder(tmp_path, {"a": "0 0.501 0.5 1.0 0.4\n"}, sizes={"a": (100, 100)})
    ds = D.load_dataset(str(root))
    assert _close(ds.boxes[0], [[0, 0.1, 30, 100, 70]])


def test_an_unreadable_labels_file_is_named(tmp_path):
    root = _folder(tmp_path, {"a": ""})
    (root / "labels" / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match=r"a.txt: cannot read this labels file"):
        D.load_dataset(str(root))


def test_a_yolo_folder_under_a_classifier_is_refused_before_training(tmp_path):
    root = _folder(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"}, sizes={"a": (8, 8)})
    ds = D.load_dataset(str(root), input_shape=(3, 8, 8), num_classes=10)
    with pytest.raises(DataError, match=r"is a detection set \(boxes\) but network 'net' outputs 10"):
        D.check_compatible(ds, (3, 8, 8), (10,), "net")
    assert torch.isfinite(ds.x).all()


def test_labels_that_match_no_image_and_sets_without_objects_are_refused(tmp_path):
    root = _folder(tmp_path, {"a": None}, sizes={"a": (8, 8)})
    (root / "labels" / "img_a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=r"no labels file matches an image \(e.g. .*img_a.txt has no images/img_a"):
        D.load_dataset(str(root))
    (root / "labels" / "img_a.txt").unlink()
    ds = D.load_dataset(str(root))
    with pytest.raises(DataError, match="has no objects in any of its 1 images"):
        D.check_trainable(ds)
