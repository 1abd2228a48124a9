"""detection_map against COCO's evaluator (pycocotools) on the same random detections, and the
cases a detector meets on its first and last epochs: perfect boxes, no boxes, empty images."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from engine.training.detection.metrics import NO_GT, detection_map


def _gt(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


def _det(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


def _coco(dets, gts, classes):
    """pycocotools' mAP@[.5:.95], mAP@0.5 and AP per class (maxDets 100, area all)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    anns = []
    for i, g in enumerate(gts):
        for c, x1, y1, x2, y2 in g.double().tolist():
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    res = [{"image_id": i + 1, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
           for i, d in enumerate(dets) for x1, y1, x2, y2, s, c in d.double().tolist()]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": [{"id": i + 1, "width": 64, "height": 64} for i in range(len(gts))],
                      "annotations": anns, "categories": [{"id": k + 1, "name": str(k)} for k in range(classes)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(res), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    p = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K] at area "all", maxDets 100
    per = [float(p[:, :, k].mean()) if (p[:, :, k] > -1).all() else NO_GT for k in range(classes)]
    per50 = [float(p[0, :, k].mean()) if (p[0, :, k] > -1).all() else NO_GT for k in range(classes)]
    return float(ev.stats[0]), float(ev.stats[1]), per, per50


def _random_set(rng, classes, images, missing_class=False, scores_decimals=2):
    """Random true boxes and detections: jittered copies of true boxes (some with the wrong class,
    some with x2 < x1), junk boxes, duplicate detections and tied scores."""
    gts, dets = [], []
    top = classes - 1 if missing_class else classes
    for _ in range(images):
        m = int(rng.integers(0, 6))
        xy, wh = rng.uniform(0, 50, (m, 2)), rng.uniform(2, 20, (m, 2))
        g = torch.tensor(np.concatenate([rng.integers(0, top, (m, 1)), xy, xy + wh], 1), dtype=torch.float32)
        rows = []
        for _ in range(int(rng.integers(0, 12))):
            if m and rng.random() < 0.7:
                j = int(rng.integers(0, m))
                box = g[j, 1:].numpy() + rng.normal(0, 2.0, 4)
                cls = float(g[j, 0]) if rng.random() < 0.9 else float(rng.integers(0, classes))
            else:
                p = rng.uniform(0, 50, 2)
                box, cls = np.concatenate([p, p + rng.uniform(2, 20, 2)]), float(rng.integers(0, classes))
            rows.append([*box, round(float(rng.uniform()), scores_decimals), cls])
        gts.append(g)
        dets.append(_det(*rows))
    return dets, gts


@pytest.mark.parametrize("seed", range(12))
def test_matches_pycocotools_on_random_detections(seed):
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(seed)
    classes = int(rng.integers(1, 5))
    dets, gts = _random_set(rng, classes, int(rng.integers(1, 15)), missing_class=seed % 3 == 0 and classes > 1,
                            scores_decimals=1 if seed % 2 else 3)
    if not sum(len(d) for d in dets):
        dets[0] = _det([1, 1, 9, 9, 0.5, 0])
    ours = detection_map(dets, gts, classes)
    m, m50, per, per50 = _coco(dets, gts, classes)
    assert ours["map"] == pytest.approx(m, abs=1e-12)
    assert ours["map50"] == pytest.approx(m50, abs=1e-12)
    assert ours["ap_per_class"] == pytest.approx(per, abs=1e-12)
    assert ours["ap50_per_class"] == pytest.approx(per50, abs=1e-12)


def test_matches_pycocotools_past_100_detections_per_image():
    """COCO keeps the best 100 detections per image and class; the rest never count."""
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(7)
    gts = [_gt(*[[0, x, x, x + 6, x + 6] for x in range(0, 40, 4)])]
    rows = [[*(rng.uniform(0, 40, 2).tolist() * 2), float(rng.uniform()), 0] for _ in range(150)]
    for r in rows:
        r[2], r[3] = r[0] + 6, r[1] + 6
    dets = [_det(*rows)]
    ours = detection_map(dets, gts, 1)
    m, m50, _, _ = _coco(dets, gts, 1)
    assert ours["detections"] == 100
    assert (ours["map"], ours["map50"]) == (pytest.approx(m, abs=1e-12), pytest.approx(m50, abs=1e-12))


def test_perfect_detections_score_one():
    gts = [_gt([0, 1, 2, 11, 12], [2, 20, 20, 30, 36]), _gt(), _gt([1, 5, 5, 9, 9])]
    dets = [torch.cat([g[:, 1:5], torch.full((len(g), 1), 0.9), g[:, :1]], 1) for g in gts]
    r = detection_map(dets, gts, 3)
    assert r["map"] == pytest.approx(1.0) and r["map50"] == pytest.approx(1.0)
    assert r["ap_per_class"] == pytest.approx([1.0, 1.0, 1.0]) and r["gt_per_class"] == [1, 1, 1]


def test_no_detections_score_zero():
    gts = [_gt([0, 1, 2, 11, 12]), _gt([1, 5, 5, 9, 9])]
    r = detection_map([_det(), _det()], gts, 2)
    assert r["map"] == 0.0 and r["map50"] == 0.0 and r["ap_per_class"] == [0.0, 0.0] and r["detections"] == 0


def test_classes_without_true_boxes_are_left_out_of_the_mean():
    gts = [_gt([0, 0, 0, 10, 10])]
    dets = [_det([0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 2])]  # class 2 has no true box: COCO's -1
    r = detection_map(dets, gts, 3)
    # precision is tp / (tp + fp + eps), as COCO computes it: "1" is 1 - 2e-16
    assert r["ap_per_class"] == pytest.approx([1.0, NO_GT, NO_GT]) and r["map"] == pytest.approx(1.0)
    assert r["map50"] == pytest.approx(1.0)


def test_empty_images_everywhere():
    r = detection_map([_det(), _det()], [_gt(), _gt()], 2)
    assert r["map"] == NO_GT and r["map50"] == NO_GT and r["ap_per_class"] == [NO_GT, NO_GT]
    assert detection_map([], [], 3)["map"] == NO_GT


def test_false_positives_on_an_empty_image_lower_precision():
    """Two true boxes found (scores 0.9, 0.7) with a false detection on an empty image between them
    (0.8): precision after each detection 1, 1/2, 2/3 -> made non-increasing 1, 2/3, 2/3. Recall 0.5
    is reached at the first detection, recall 1 at the third: 51 points at precision 1, 50 at 2/3."""
    gts = [_gt([0, 0, 0, 10, 10]), _gt(), _gt([0, 20, 20, 30, 30])]
    dets = [_det([0, 0, 10, 10, 0.9, 0]), _det([5, 5, 15, 15, 0.8, 0]), _det([20, 20, 30, 30, 0.7, 0])]
    r = detection_map(dets, gts, 1)
    assert r["map50"] == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)


def test_iou_threshold_ladder_by_hand():
    """One true box 10x10 and one detection shifted by 1 pixel: IoU = 90 / 110 = 0.818..., a hit at
    the thresholds 0.5 .. 0.8 (7 of 10) and a miss at 0.85 .. 0.95: mAP@[.5:.95] = 0.7."""
    r = detection_map([_det([1, 0, 11, 10, 0.5, 0])], [_gt([0, 0, 0, 10, 10])], 1)
    assert r["map50"] == pytest.approx(1.0) and r["map"] == pytest.approx(0.7)


def test_duplicates_are_false_positives_and_best_iou_wins():
    """The second detection of the same box is a false positive; with two true boxes, a detection
    takes the one it overlaps most, leaving the other for the next detection."""
    gts = [_gt([0, 0, 0, 10, 10], [0, 4, 0, 14, 10])]
    dup = detection_map([_det([0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0])], [_gt([0, 0, 0, 10, 10])], 1)
    assert dup["map50"] == pytest.approx(1.0)  # the duplicate comes after full recall: precision there is not read
    r = detection_map([_det([4, 0, 14, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0])], gts, 1)
    assert r["map50"] == pytest.approx(1.0)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 images of detections but 1"):
        detection_map([_det(), _det()], [_gt()], 1)


def test_equal_ious_go_to_the_later_true_box_as_in_coco():
    """The first detection overlaps A = (0,0,10,12) and B = (0,0,12,10) equally (IoU 100/120); COCO's
    loop gives it the later box, B, leaving A to the second detection (IoU 120/130 = 0.92 with A,
    100/150 with B). Thresholds 0.5 .. 0.8: both hit, AP 1; 0.85 and 0.9: only the second hits
    (precision 1/2 up to recall 1/2: AP 51 * 0.5 / 101); 0.95: none. Had the first taken A, the
    second would only reach B's 0.67, and mAP would be 0.602 instead of 0.7505."""
    gts = [_gt([0, 0, 0, 10, 12], [0, 0, 0, 12, 10])]
    dets = [_det([0, 0, 10, 10, 0.9, 0], [0, 0, 10, 13, 0.8, 0])]
    r = detection_map(dets, gts, 1)
    assert r["map"] == pytest.approx((7 + 2 * 51 * 0.5 / 101) / 10)
    if __import__("importlib").util.find_spec("pycocotools"):
        assert r["map"] == pytest.approx(_coco(dets, gts, 1)[0], abs=1e-12)
