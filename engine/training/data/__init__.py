"""Data sets for the training tools: loading, checking, splitting, augmenting, batching.

- dataset.py     `Dataset`: images, labels, classes and normalisation, in memory;
- builtin.py     the built-in sets by name: digits, mnist5k, shapes and shapes_boxes (synthetic);
- formats.py     user data from a path: image folders, .npz, IDX, CIFAR-10 batches; one image;
- yolo.py        detection data from a path: the YOLO text format (images/ + labels/);
- detection.py   CenterNet targets from boxes, box-aware flips and crops, detection batches;
- transforms.py  normalisation and the training augmentations;
- loader.py      `load_dataset`, `check_compatible`, `split`, `epoch_order`, `batches`.

The names below are the package's API (`from engine.training import data as D`).
"""
from engine.training.data.builtin import BUILTIN, mnist5k_path
from engine.training.data.dataset import Dataset
from engine.training.data.detection import (CenterNetTargets, DetectionBatch, build_targets, detection_batches,
                                            gaussian_radius)
from engine.training.data.formats import IMAGE_EXTS, load_image, read_idx, read_image
from engine.training.data.loader import (batches, check_compatible, check_trainable, epoch_order, load_dataset,
                                         split)
from engine.training.data.transforms import InputScaling, augment, normalise_images, renormalise

__all__ = ["BUILTIN", "IMAGE_EXTS", "CenterNetTargets", "Dataset", "DetectionBatch", "InputScaling", "augment",
           "batches", "build_targets", "check_compatible", "detection_batches", "gaussian_radius",
           "check_trainable", "epoch_order", "load_dataset", "load_image", "mnist5k_path", "normalise_images",
           "read_idx", "read_image", "renormalise", "split"]
