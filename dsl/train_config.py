"""The validated `train { }` section: what the training tool consumes.

The parser checks every option against `TRAIN_SCHEMA` in dsl/schema.py and
builds this dataclass; tools never see raw option dictionaries. Command-line
overrides go through `dataclasses.replace`.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.0  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = 0.0
    beta1: float = 0.9  # adam, adamw
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "constant"  # constant | step | cosine | plateau
    warmup: int = 0  # epochs of linear warmup (cosine, step, constant)
    step_size: int = 10  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor
    factor: float = 0.1  # plateau: decay factor
    patience: int = 5  # plateau: epochs without improvement
    min_lr: float = 0.0  # cosine floor / plateau floor


@dataclass(frozen=True)
class AugmentConfig:
    crop: int = 0  # random crop after zero padding by this many pixels (0: off)
    flip: bool = False  # random horizontal flip
    cutout: int = 0  # side of a random zeroed square (0: off)


@dataclass(frozen=True)
class DetectionConfig:
    """`loss centernet`: the weights of the CenterNet loss (engine.training.detection.loss).
    The class count and output stride come from the network's shapes
    (engine.ir.detection.detection_head), not from here."""

    size_weight: float = 0.1
    offset_weight: float = 1.0
    alpha: float = 2.0  # focal exponent
    beta: float = 4.0  # penalty reduction exponent


@dataclass(frozen=True)
class TrainConfig:
    data: str = "digits"  # built-in name (digits, mnist5k, shapes) or a path
    split: float = 0.2  # validation fraction
    batch: int = 64
    epochs: int = 10
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: str = "cross_entropy"
    label_smoothing: float = 0.0
    detection: DetectionConfig | None = None  # loss centernet: the detection loss's weights
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    precision: str = "fp32"  # fp32 | tf32 | fp16 | bf16
    clip_grad: float = 0.0  # max global grad norm (0: off)
    early_stop: int = 0  # patience in epochs on validation loss (0: off)
    freeze: tuple[str, ...] = ()  # tap names whose layers are not trained
    seed: int = 0
    sync_bn: bool = False  # synchronise batch-norm statistics across processes
