"""What a run minimises and how: the spec's optimizer and loss, for the backend in use.

Backend triton uses fusenet's fused kernels (engine.kernels.optim: single-launch
SGD, Adam, AdamW; engine.kernels.loss: the fused softmax cross-entropy);
backend torch uses torch.optim and F.cross_entropy. A missing fused piece is a
clear FusenetTrainError that points to --backend torch.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F

from engine.errors import FusenetTrainError

OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}  # spec name -> class name (both backends)


def build_optimizer(params, ocfg, backend: str) -> tuple[torch.optim.Optimizer, str]:
    """The spec's optimizer: fused Triton (`engine.kernels.optim`) or torch.optim for backend torch."""
    cls_name = OPTIMIZERS.get(ocfg.name)
    if cls_name is None:
        raise FusenetTrainError(f"unknown optimizer '{ocfg.name}' (known: {', '.join(OPTIMIZERS)})")
    if backend == "torch":
        cls, impl = getattr(torch.optim, cls_name), "torch.optim"
    else:
        try:
            import engine.kernels.optim as fused
            cls = getattr(fused, cls_name)
        except (ImportError, AttributeError) as e:
            raise FusenetTrainError(
                f"backend triton needs the fused optimizer engine.kernels.optim.{cls_name}, which is not "
                f"available ({e}); use --backend torch to train with torch.optim") from None
        impl = "fused Triton, engine.kernels.optim"
    if ocfg.name == "sgd":
        opt = cls(params, lr=ocfg.lr, momentum=ocfg.momentum, nesterov=ocfg.nesterov, weight_decay=ocfg.weight_decay)
    else:
        opt = cls(params, lr=ocfg.lr, betas=(ocfg.beta1, ocfg.beta2), eps=ocfg.eps, weight_decay=ocfg.weight_decay)
    return opt, f"{cls_name} ({impl})"


def loss_fn(backend: str, label_smoothing: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Mean softmax cross-entropy of logits [N,K] or [N,K,H,W] (NCHW) against labels [N] or [N,H,W]."""
    ls = float(label_smoothing)
    if backend == "torch":
        return lambda out, y: F.cross_entropy(out.float(), y, label_smoothing=ls)
    try:
        from engine.kernels.loss import cross_entropy
    except ImportError as e:
        raise FusenetTrainError(
            f"backend triton needs the fused loss engine.kernels.loss.cross_entropy, which is not available "
            f"({e}); use --backend torch") from None
    if ls:
        try:
            ok = "label_smoothing" in inspect.signature(cross_entropy).parameters
        except (TypeError, ValueError):
            ok = True
        if not ok:
            raise FusenetTrainError("the fused Triton cross-entropy does not take label_smoothing; "
                                    "remove it from the spec or use --backend torch")
    kw = {"label_smoothing": ls} if ls else {}

    def fused_loss(out, y):
        if out.ndim == 4:  # the kernel takes NHWC logits for segmentation
            out = out.permute(0, 2, 3, 1).contiguous()
        return cross_entropy(out, y, **kw)

    return fused_loss
