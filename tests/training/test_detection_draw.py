"""draw_detections: a PNG montage of predicted (solid) and true (dashed) boxes, written atomically."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from engine.training.detection.draw import draw_detections


def _inputs(n=3, c=3, size=32):
    images = torch.full((n, c, size, size), 0.2)
    gts = [torch.tensor([[k % 2, 4.0, 4.0, 20.0, 20.0]]) for k in range(n)]
    dets = [torch.tensor([[5.0, 5.0, 21.0, 19.0, 0.9, float(k % 2)], [1.0, 1.0, 3.0, 3.0, 0.1, 0.0]]) for k in range(n)]
    return images, dets, gts


def test_writes_a_png_with_boxes_drawn(tmp_path):
    images, dets, gts = _inputs()
    out = draw_detections(images, dets, gts, ["square", "circle"], tmp_path / "predictions.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.png"]  # no temporary file left behind
    blank = draw_detections(images, [d[:0] for d in dets], [g[:0] for g in gts], ["square", "circle"],
                            tmp_path / "blank.png")
    a = np.asarray(Image.open(out).convert("RGB")).astype(int)
    b = np.asarray(Image.open(blank).convert("RGB")).astype(int)
    assert a.shape == b.shape
    # the flat grey images and white gaps are all that the blank montage shows; boxes add colour
    assert (np.abs(a - b).sum(-1) > 60).sum() > 200
    saturated = lambda im: ((im.max(-1) - im.min(-1)) > 80).sum()  # noqa: E731
    assert saturated(a) > saturated(b) + 100


def test_undoes_normalisation_and_takes_grey_images_and_no_truth(tmp_path):
    images, dets, _ = _inputs(n=5, c=1)
    normalised = (images - 0.5) / 0.25
    out = draw_detections(normalised, dets, None, 2, tmp_path / "p.png", mean=(0.5,), std=(0.25,), title="epoch 3")
    assert out.read_bytes()[:4] == b"\x89PNG"
