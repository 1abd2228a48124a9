"""Detection metrics as COCO's evaluator computes them: mAP@0.5, mAP@[.5:.95], AP per class.

Users compare detectors by the numbers pycocotools prints, so this is that
computation (bounding boxes, area range "all", no crowd boxes, at most 100
detections per image and class), written in numpy without its JSON bookkeeping.
tests/training/test_detection_metrics.py checks it against pycocotools on the same
random detections. The steps, per class:

1. per image, detections sorted by score (stable, so ties keep their order) and cut
   to the best 100; each is matched greedily, best score first, to the not yet
   matched true box of the highest IoU at or above the threshold (ties: the later
   box, as COCO's loop does); unmatched detections are false positives;
2. all images' detections of the class sorted by score (stable, image order kept on
   ties); cumulative true and false positives give recall and precision;
3. precision made non-increasing from the right, then read at 101 recall points
   0, 0.01, ..., 1 (the first detection reaching each recall; 0 past the last);
4. AP = the mean over the recall points (and over the 10 IoU thresholds 0.5, 0.55,
   ..., 0.95 for mAP@[.5:.95]); a class without true boxes has no AP (-1, as COCO
   marks it) and is left out of the mean over classes.

One quirk is kept for parity: an unmatched detection whose w * h falls outside the
area range (a negative area: x2 < x1 or y2 < y1, from a badly regressed size) is
ignored rather than counted as a false positive, as COCO does.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's np.linspace(.5, .95, round((.95 - .5) / .05) + 1)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETS = 100
NO_GT = -1.0  # the AP of a class that has no true boxes (COCO's marker); excluded from the means
AREA_RANGE = (0.0, 1e5 ** 2)  # COCO's area range "all"


def box_iou(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """IoU [n, m] of boxes d [n, 4] and g [m, 4] given as (x, y, w, h) in float64.

    The right and bottom edges are x + w and y + h, as COCO computes them from the (x, y, w, h)
    it stores, so thresholds are compared on the same floating-point values."""
    iw = np.minimum(d[:, None, 0] + d[:, None, 2], g[None, :, 0] + g[None, :, 2]) - np.maximum(d[:, None, 0], g[None, :, 0])
    ih = np.minimum(d[:, None, 1] + d[:, None, 3], g[None, :, 1] + g[None, :, 3]) - np.maximum(d[:, None, 1], g[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = (d[:, 2] * d[:, 3])[:, None] + (g[:, 2] * g[:, 3])[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _xywh(b: np.ndarray) -> np.ndarray:
    """(x1, y1, x2, y2) -> (x, y, w, h), float64."""
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def _match(ious: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """Greedy matching of score-sorted detections (rows of `ious`) to true boxes (columns), at every
    IoU threshold at once: [n, T] whether detection i is a true positive at threshold t.

    Each detection, best score first, takes the free true box of the highest IoU at or above the
    threshold; among equal IoUs the last box, as COCO's loop (`if iou < best: continue;
    best = iou`) ends up choosing. A box taken at one threshold stays free at the others."""
    n, m = ious.shape
    tp = np.zeros((n, len(thresholds)), dtype=bool)
    if not m:
        return tp
    free = np.ones((len(thresholds), m), dtype=bool)  # [T, m]
    floor = np.minimum(thresholds, 1 - 1e-10)  # COCO's: an IoU of exactly 1 still passes a threshold of 1
    cols = np.arange(m)
    for i in range(n):
        if ious[i].max() < floor[0]:
            continue  # overlaps nothing enough at any threshold: a false positive everywhere
        row = np.where(free, ious[i][None, :], -1.0)  # [T, m]
        best = row.max(axis=1)  # [T]
        last = np.where(row == best[:, None], cols[None, :], -1).max(axis=1)  # [T]: the last box at the max
        hit = best >= floor
        free[hit, last[hit]] = False
        tp[i] = hit
    return tp


def _ap(scores: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_gt: int) -> float:
    """101-point interpolated AP of detections with `scores` and true/false-positive flags, n_gt > 0."""
    order = np.argsort(-scores, kind="mergesort")
    tp, fp = tp[order], fp[order]
    tps = np.cumsum(tp, dtype=np.float64)
    fps = np.cumsum(fp, dtype=np.float64)
    if not len(tp):
        return 0.0
    recall = tps / n_gt
    precision = tps / (tps + fps + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # non-increasing: the best precision at any higher recall
    at = np.searchsorted(recall, RECALL_POINTS, side="left")
    q = np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0)
    return float(q.mean())


def _as_numpy(t, cols: int) -> np.ndarray:
    a = t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)
    return a.reshape(-1, cols)


def detection_map(dets: Sequence[torch.Tensor], gts: Sequence[torch.Tensor], classes: int) -> dict:
    """COCO mAP of detections against true boxes, image by image.

    dets: one [n_i, 6] tensor per image of (x1, y1, x2, y2, score, class), input pixels;
    gts:  one [m_i, 5] tensor per image of (class, x1, y1, x2, y2); n_i and m_i may be 0.
    Returns a dict:
      map50, map:      mAP@0.5 and mAP@[.5:.95] over the classes that have true boxes
                       (-1.0 when no class has any, as COCO prints);
      ap50_per_class, ap_per_class: lists of `classes` floats, -1.0 for a class without true boxes;
      gt_per_class:    the number of true boxes of each class (what makes an AP -1);
      detections:      the number of detections scored (after the 100-per-image-and-class cut).
    """
    if len(dets) != len(gts):
        raise ValueError(f"detection_map: {len(dets)} images of detections but {len(gts)} of true boxes")
    t_count = len(IOU_THRESHOLDS)
    scores: list[list[np.ndarray]] = [[] for _ in range(classes)]
    hits: list[list[np.ndarray]] = [[] for _ in range(classes)]  # per class: [n, T] true-positive flags
    misses: list[list[np.ndarray]] = [[] for _ in range(classes)]  # per class: [n, T] false-positive flags
    n_gt = np.zeros(classes, dtype=np.int64)
    scored = 0
    for d, g in zip(dets, gts):
        d, g = _as_numpy(d, 6), _as_numpy(g, 5)
        for k in range(classes):
            gk = g[g[:, 0] == k][:, 1:5]
            dk = d[d[:, 5] == k]
            n_gt[k] += len(gk)
            if not len(dk):
                continue
            dk = dk[np.argsort(-dk[:, 4], kind="mergesort")][:MAX_DETS]
            dxywh = _xywh(dk[:, :4])
            ious = box_iou(dxywh, _xywh(gk))
            area = dxywh[:, 2] * dxywh[:, 3]
            outside = ((area < AREA_RANGE[0]) | (area > AREA_RANGE[1]))[:, None]  # [n, 1]
            tp = _match(ious)  # [n, T]
            scores[k].append(dk[:, 4])
            hits[k].append(tp)
            misses[k].append(~tp & ~outside)
            scored += len(dk)
    ap = np.full((classes, t_count), NO_GT)
    for k in range(classes):
        if n_gt[k] == 0:
            continue
        s = np.concatenate(scores[k]) if scores[k] else np.zeros(0)
        h = np.concatenate(hits[k]) if hits[k] else np.zeros((0, t_count), dtype=bool)
        f = np.concatenate(misses[k]) if misses[k] else np.zeros((0, t_count), dtype=bool)
        ap[k] = [_ap(s, h[:, t], f[:, t], int(n_gt[k])) for t in range(t_count)]
    valid = n_gt > 0
    mean = lambda v: float(v[valid].mean()) if valid.any() else NO_GT  # noqa: E731
    per_class = np.where(valid, ap.mean(axis=1), NO_GT)
    return {"map50": mean(ap[:, 0]), "map": mean(ap.mean(axis=1)), "ap50_per_class": ap[:, 0].tolist(),
            "ap_per_class": per_class.tolist(), "gt_per_class": n_gt.tolist(), "detections": scored}
