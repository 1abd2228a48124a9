"""Detection data: the synthetic shapes_boxes set, CenterNet targets, box-aware flips and crops,
detection batches, and the data checks against a detection network's output."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from dsl.train_config import AugmentConfig
from engine.errors import DataError
from engine.training import data as D
from engine.training.data import builtin
from engine.training.data import detection as det


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


# ---- shapes_boxes -------------------------------------------------------------------------------

def test_shapes_boxes_is_deterministic():
    x1, b1, c1 = builtin.shapes_boxes(3, 48, 48, seed=3, n=40)
    x2, b2, c2 = builtin.shapes_boxes(3, 48, 48, seed=3, n=40)
    assert x1.numpy().tobytes() == x2.numpy().tobytes()
    assert all(a.numpy().tobytes() == b.numpy().tobytes() for a, b in zip(b1, b2)) and c1 == c2
    x3, _, _ = builtin.shapes_boxes(3, 48, 48, seed=4, n=40)
    assert not torch.equal(x1, x3)


def test_shapes_boxes_varies_counts_classes_sizes_and_overlaps():
    x, boxes, classes = builtin.shapes_boxes(3, 48, 48, seed=0, n=300)
    assert classes == ["square", "circle", "triangle"] and x.shape == (300, 3, 48, 48)
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    counts = torch.tensor([len(b) for b in boxes])
    assert int(counts.min()) == 0 and int(counts.max()) == 4 and (counts == 0).sum() >= 10
    allb = torch.cat(boxes)
    assert set(allb[:, 0].long().tolist()) == {0, 1, 2}
    side = allb[:, 3] - allb[:, 1]
    assert float(side.min()) < 12 and float(side.max()) > 18  # from a sixth of the image to ~0.4 of it
    assert (allb[:, 1:] >= 0).all() and (allb[:, 1:] <= 48).all()
    overlapping = 0
    for b in boxes:
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                iw = min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1])
                ih = min(b[i, 4], b[j, 4]) - max(b[i, 2], b[j, 2])
                overlapping += bool(iw > 0 and ih > 0)
    assert overlapping >= 10


def test_shapes_boxes_box_is_where_the_shape_is():
    """A lone shape's bright pixels lie inside its box and fill it out to the edges (to a pixel)."""
    x, boxes, _ = builtin.shapes_boxes(3, 48, 48, seed=1, n=60)
    checked = 0
    for img, b in zip(x, boxes):
        if len(b) != 1:
            continue
        bright = img.max(0).values > 0.6  # every shape has one channel >= 0.8; the background stays under ~0.55
        ys, xs = torch.nonzero(bright, as_tuple=True)
        _, x1, y1, x2, y2 = b[0].tolist()
        assert xs.min() >= math.floor(x1) - 1 and xs.max() <= math.ceil(x2) and ys.min() >= math.floor(y1) - 1
        assert ys.max() <= math.ceil(y2)
        assert abs(float(xs.max() + 1 - xs.min()) - (x2 - x1)) <= 2.5
        checked += 1
    assert checked >= 5


def test_load_dataset_shapes_boxes_is_a_detection_set():
    ds = D.load_dataset("shapes_boxes", input_shape=(3, 64, 64), num_classes=5)
    assert ds.task == "detect" and ds.synthetic and ds.x.shape[1:] == (3, 64, 64)
    assert ds.classes == ["square", "circle", "triangle", "unused3", "unused4"]
    assert ds.y.tolist() == [len(b) for b in ds.boxes]
    assert "detection set" in ds.describe() and "objects" in ds.describe()
    assert abs(ds.x.mean().item()) < 1e-4
    tr, va = D.split(ds, 0.2, seed=0)
    assert len(tr.boxes) == len(tr) and len(va.boxes) == len(va) and len(tr) + len(va) == len(ds)
    assert tr.y.tolist() == [len(b) for b in tr.boxes] and va.y.tolist() == [len(b) for b in va.boxes]
    sub = ds.subset(torch.tensor([5, 2]))
    assert torch.equal(sub.boxes[0], ds.boxes[5]) and torch.equal(sub.boxes[1], ds.boxes[2])
    with pytest.raises(DataError, match="has 3 classes .* detects 2"):
        D.load_dataset("shapes_boxes", num_classes=2)


def test_check_compatible_for_a_detection_network():
    ds = D.load_dataset("shapes_boxes")
    D.check_compatible(ds, (3, 48, 48), (7, 12, 12))
    with pytest.raises(DataError, match=r"not a \[classes \+ 4\] x H x W map"):
        D.check_compatible(ds, (3, 48, 48), (7,))
    with pytest.raises(DataError, match="detects 2 .* 3 \\+ 4 = 7 channels"):
        D.check_compatible(ds, (3, 48, 48), (6, 12, 12))
    with pytest.raises(DataError, match="needs classes \\+ 4"):
        D.check_compatible(ds, (3, 48, 48), (4, 12, 12))
    with pytest.raises(DataError, match="not one integer stride"):
        D.check_compatible(ds, (3, 48, 48), (7, 12, 10))


# ---- targets ------------------------------------------------------------------------------------

def test_gaussian_radius_by_hand():
    """A 10x10 box, overlap 0.7: case 3 (a = 2.8, b = -28, c = -30) gives (-28 + sqrt(784 + 336)) / 2
    = 2.7332; cases 1 and 2 give 19.07 and 36.73, so the radius is 2.7332."""
    assert det.gaussian_radius(10, 10) == pytest.approx((-28 + math.sqrt(1120)) / 2)
    assert det.gaussian_radius(10, 10) == pytest.approx(2.7332, abs=1e-4)
    # a 4 x 20 box: case 3 is a = 2.8, b = -33.6, c = -24: (-33.6 + sqrt(1128.96 + 268.8)) / 2
    assert det.gaussian_radius(4, 20) == pytest.approx((-33.6 + math.sqrt(33.6 ** 2 + 4 * 2.8 * 24)) / 2)


def test_targets_of_one_box_by_hand():
    """A 20x20-pixel box centred at (16.5, 20) px, stride 4, 12x12 output: center (4.125, 5.0) cells,
    cell (4, 5), index 5 * 12 + 4 = 64, offset (0.125, 0), size (5, 5) cells; radius
    int(gaussian_radius(5, 5)) = 1, sigma 0.5: a neighbour cell gets exp(-1 / 0.5) = exp(-2)."""
    boxes = [_boxes([1, 6.5, 10, 26.5, 30]), _boxes()]
    t = det.build_targets(boxes, 3, (12, 12), 4, 4)
    assert t.heatmap.shape == (2, 12, 12, 3) and t.heatmap.dtype == torch.float32
    assert t.index.shape == (2, 4) and t.index.dtype == torch.int32
    assert t.size.shape == (2, 4, 2) and t.offset.shape == (2, 4, 2) and t.mask.shape == (2, 4)
    # case 3 for 5x5: a = 2.8, b = -14, c = -7.5: (-14 + sqrt(196 + 84)) / 2 = 1.3666
    assert int(gaussian := det.gaussian_radius(5, 5)) == 1 and gaussian == pytest.approx(1.3666, abs=1e-4)
    assert t.heatmap[0, 5, 4, 1] == 1.0
    assert t.heatmap[0, 5, 5, 1] == pytest.approx(math.exp(-2)) and t.heatmap[0, 4, 4, 1] == pytest.approx(math.exp(-2))
    assert t.heatmap[0, 6, 5, 1] == pytest.approx(math.exp(-4))
    assert t.heatmap[0, 5, 6, 1] == 0 and t.heatmap[0, :, :, 0].sum() == 0 and t.heatmap[0, :, :, 2].sum() == 0
    assert t.index[0].tolist() == [64, 0, 0, 0] and t.mask[0].tolist() == [1, 0, 0, 0]
    assert t.size[0, 0].tolist() == [5.0, 5.0] and t.offset[0, 0].tolist() == pytest.approx([0.125, 0.0])
    assert t.heatmap[1].sum() == 0 and t.mask[1].sum() == 0  # an image with no objects


def test_heatmap_peaks_are_one_and_overlaps_take_the_max():
    boxes = [_boxes([0, 0, 0, 24, 24], [0, 8, 8, 32, 32], [2, 30, 30, 46, 46])]
    t = det.build_targets(boxes, 3, (12, 12), 4, 8)
    h = t.heatmap[0]
    assert h[3, 3, 0] == 1.0 and h[5, 5, 0] == 1.0 and h[9, 9, 2] == 1.0
    assert float(h.max()) == 1.0 and (h == 1.0).sum() == 3
    one = det.build_targets([boxes[0][:1]], 3, (12, 12), 4, 8).heatmap[0, ..., 0]
    two = det.build_targets([boxes[0][1:2]], 3, (12, 12), 4, 8).heatmap[0, ..., 0]
    assert torch.equal(h[..., 0], torch.maximum(one, two))
    assert t.offset.min() >= 0 and t.offset.max() < 1


def test_more_objects_than_slots_keeps_the_first_and_warns_once(monkeypatch):
    monkeypatch.setattr(det, "_warned_overflow", False)
    boxes = [_boxes(*[[k % 3, 4 * k, 0, 4 * k + 4, 4] for k in range(5)])]
    with pytest.warns(UserWarning, match="more than 3 objects"):
        t = det.build_targets(boxes, 3, (12, 12), 4, 3)
    assert t.mask[0].tolist() == [1, 1, 1] and t.index[0].tolist() == [0, 1, 2]
    assert (t.heatmap[0] == 1.0).sum() == 3  # the dropped ones leave no peak either
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det.build_targets(boxes, 3, (12, 12), 4, 3)  # once only


def test_targets_skip_empty_boxes_and_refuse_unknown_classes():
    t = det.build_targets([_boxes([0, 5, 5, 5, 9], [0, 8, 8, 16, 16])], 1, (12, 12), 4, 4)
    assert t.mask[0].tolist() == [1, 0, 0, 0] and t.index[0, 0] == 3 * 12 + 3
    with pytest.raises(DataError, match="class 3, but the network detects 2 classes"):
        det.build_targets([_boxes([3, 0, 0, 8, 8])], 2, (12, 12), 4, 4)


def test_the_radius_is_taken_of_the_size_rounded_up_to_whole_cells():
    """CenterNet rounds the size in cells up before taking the radius: a 14-pixel box at stride 4 is
    3.5 cells, whose radius 0.96 would be 0 (a single hot cell); rounded up to 4 cells it is 1.09,
    radius 1, and the neighbouring cells get heat."""
    assert int(det.gaussian_radius(3.5, 3.5)) == 0 and int(det.gaussian_radius(4, 4)) == 1
    t = det.build_targets([_boxes([0, 0, 0, 14, 14])], 1, (12, 12), 4, 1)
    assert t.heatmap[0, 1, 1, 0] == 1.0 and float(t.heatmap[0, 1, 2, 0]) > 0  # radius 1: the neighbour is warm


def test_a_center_on_the_far_edge_stays_in_the_last_cell():
    t = det.build_targets([_boxes([0, 47.5, 0, 48.5, 8])], 1, (12, 12), 4, 1)
    assert t.index[0, 0] == 1 * 12 + 11 and 0 <= float(t.offset[0, 0, 0]) < 1


# ---- augmentation and batches -------------------------------------------------------------------

def _painted(n=16, size=48, seed=0):
    """Images with one bright rectangle each (zero elsewhere) and its box: what moves must move together."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    boxes = []
    for i in range(n):
        x1, y1 = (int(v) for v in torch.randint(0, size - 12, (2,), generator=g))
        w, h = (int(v) for v in torch.randint(4, 12, (2,), generator=g))
        x[i, 0, y1:y1 + h, x1:x1 + w] = 1.0
        boxes.append(_boxes([i % 2, x1, y1, x1 + w, y1 + h]))
    return x, boxes


def _bright_box(img):
    ys, xs = torch.nonzero(img[0] > 0.5, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize("cfg", [AugmentConfig(flip=True), AugmentConfig(crop=6), AugmentConfig(crop=6, flip=True)])
def test_flips_and_crops_move_boxes_with_the_pixels(cfg):
    x, boxes = _painted()
    out, moved = det.augment_detection(x, boxes, cfg, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    changed = 0
    for img, b, b0 in zip(out, moved, boxes):
        if (img > 0.5).sum() == 0:
            assert len(b) == 0  # cropped out entirely: no box either
            continue
        visible = float((img > 0.5).sum()) / float((b0[0, 3] - b0[0, 1]) * (b0[0, 4] - b0[0, 2]))
        if visible < det.KEEP_AREA:
            assert len(b) == 0
            continue
        assert len(b) == 1 and b[0, 1:].tolist() == _bright_box(img)
        changed += b[0, 1:].tolist() != b0[0, 1:].tolist()
    assert changed >= 4


def test_a_flip_mirrors_the_target_center_cell():
    """Center at x = 16.5 px (cell 4 of 12): flipped, at 48 - 16.5 = 31.5 px, cell 7 = 12 - 1 - 4."""
    x = torch.zeros(64, 1, 48, 48)
    boxes = [_boxes([0, 6.5, 10, 26.5, 30])] * 64
    out, moved = det.augment_detection(x, boxes, AugmentConfig(flip=True), torch.Generator().manual_seed(0))
    t = det.build_targets(moved, 1, (12, 12), 4, 2)
    cells = t.index[:, 0] % 12
    assert set(cells.tolist()) == {4, 7}
    flipped = cells == 7
    assert t.offset[flipped, 0, 0].tolist() == pytest.approx([0.875] * int(flipped.sum()))
    assert torch.equal(t.heatmap[flipped], t.heatmap[~flipped][:1].flip(2).expand(int(flipped.sum()), -1, -1, -1))


def test_clip_boxes_drops_boxes_that_lose_most_of_their_area():
    # kept: 4 of 10, 6 of 10, nothing, 64 of 400, 100 of 144 of their widths / areas
    b = _boxes([0, -6, 0, 4, 10], [1, -4, 0, 6, 10], [2, 50, 0, 60, 10], [0, 40, 40, 60, 60], [2, 38, 38, 50, 50])
    out = det.clip_boxes(b, 48, 48)
    assert out.tolist() == [[1, 0, 0, 6, 10], [2, 38, 38, 48, 48]]
    assert det.clip_boxes(_boxes(), 48, 48).shape == (0, 5)


def test_cutout_is_refused_for_detection():
    ds = D.load_dataset("shapes_boxes")
    with pytest.raises(DataError, match="cutout is not supported for detection"):
        next(det.detection_batches(ds, 8, augment_cfg=AugmentConfig(cutout=8), gen=torch.Generator(),
                                   out_hw=(12, 12), stride=4))


def test_detection_batches_yield_images_targets_and_boxes():
    ds = D.load_dataset("shapes_boxes").subset(torch.arange(20))
    got = list(det.detection_batches(ds, 8, out_hw=(12, 12), stride=4, max_objects=6))
    assert [len(x) for x, _ in got] == [8, 8, 4]
    x, b = got[0]
    assert isinstance(b, det.DetectionBatch) and isinstance(b.targets, det.CenterNetTargets)
    assert b.targets.heatmap.shape == (8, 12, 12, 3) and b.targets.mask.shape == (8, 6)
    assert torch.equal(x, ds.x[:8]) and all(torch.equal(p, q) for p, q in zip(b.boxes, ds.boxes[:8]))
    assert b.targets.mask.sum(1).tolist() == [len(q) for q in ds.boxes[:8]]
    assert len(list(det.detection_batches(ds, 8, drop_last=True, out_hw=(12, 12), stride=4))) == 2
    # two processes share a global batch: each gets its half, augmented as one batch would be
    cfg, order = AugmentConfig(crop=4, flip=True), torch.randperm(20, generator=torch.Generator().manual_seed(0))
    whole = next(det.detection_batches(ds, 8, order=order, augment_cfg=cfg, gen=torch.Generator().manual_seed(5),
                                       out_hw=(12, 12), stride=4))
    half = next(det.detection_batches(ds, 8, order=order, augment_cfg=cfg, gen=torch.Generator().manual_seed(5),
                                      rank=1, world=2, out_hw=(12, 12), stride=4))
    assert torch.equal(half[0], whole[0][4:]) and torch.equal(half[1].targets.heatmap, whole[1].targets.heatmap[4:])
    assert all(torch.equal(p, q) for p, q in zip(half[1].boxes, whole[1].boxes[4:]))


def test_detection_batches_need_boxes():
    ds = D.Dataset("labels", torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64), ["a", "b"])
    with pytest.raises(DataError, match="has no boxes"):
        next(det.detection_batches(ds, 8, out_hw=(2, 2), stride=4))
