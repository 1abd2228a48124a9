"""Detection beyond the data: how good the boxes are, and pictures of them.

- metrics.py  `detection_map`: COCO's mAP@0.5, mAP@[.5:.95] and AP per class;
- draw.py     `draw_detections`: a montage PNG of predicted and true boxes.

The data side (targets, augmentation, the YOLO format, `shapes_boxes`) lives in
engine/training/data/ with the other data sets.
"""
from engine.training.detection.draw import draw_detections
from engine.training.detection.metrics import detection_map

__all__ = ["detection_map", "draw_detections"]
