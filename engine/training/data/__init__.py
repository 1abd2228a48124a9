"""Data sets for the training tools: loading, checking, splitting, augmenting, batching.

- dataset.py     `Dataset`: images, labels, classes and normalisation, in memory;
- builtin.py     the built-in sets by name: digits, mnist5k, shapes (synthetic);
- formats.py     user data from a path: image folders, .npz, IDX, CIFAR-10 batches; one image;
- transforms.py  normalisation and the training augmentations;
- loader.py      `load_dataset`, `check_compatible`, `split`, `epoch_order`, `batches`.

The names below are the package's API (`from engine.training import data as D`).
"""
from engine.training.data.builtin import BUILTIN, mnist5k_path
from engine.training.data.dataset import Dataset
from engine.training.data.formats import IMAGE_EXTS, load_image, read_idx, read_image
from engine.training.data.loader import (batches, check_compatible, check_trainable, epoch_order, load_dataset,
                                         split)
from engine.training.data.transforms import InputScaling, augment, normalise_images, renormalise

__all__ = ["BUILTIN", "IMAGE_EXTS", "Dataset", "InputScaling", "augment", "batches", "check_compatible",
           "check_trainable", "epoch_order", "load_dataset", "load_image", "mnist5k_path", "normalise_images",
           "read_idx", "read_image", "renormalise", "split"]
