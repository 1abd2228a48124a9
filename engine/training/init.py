"""Where a run's weights start: seeded initialisation, and frozen layers.

`init_weights` seeds torch and initialises every conv, linear and batch-norm
parameter; `freeze` stops training the layers behind named taps (transfer
learning) and `restore_buffers` puts their batch-norm statistics back after
each step.
"""
from __future__ import annotations

import math

import torch

from engine.errors import FusenetTrainError
from engine.kernels.activations import ACTIVATIONS

def uses_relu_family(graph) -> bool:
    """Whether the network has a ReLU-like activation (a rectifier in the
    activation table, engine.kernels.activations): then its weights get
    Kaiming normal init."""
    return any(node.op in ACTIVATIONS and ACTIVATIONS[node.op].rectifier for node in graph)


def init_weights(model: torch.nn.Module, seed: int) -> str:
    """Seeded initialisation: Kaiming (fan_in, ReLU gain) for ReLU-family networks,
    PyTorch's default rule otherwise; BN weight 1, bias 0. Returns a description."""
    torch.manual_seed(seed)
    relu = uses_relu_family(model.graph)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            prefix, _, kind = name.rpartition(".")
            w = params.get(f"{prefix}.weight")
            if w is not None and w.dim() in (2, 4):  # conv / linear
                fan_in = w[0].numel()
                if kind == "weight":
                    if relu:
                        torch.nn.init.kaiming_normal_(p, mode="fan_in", nonlinearity="relu")
                    else:
                        torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                elif kind == "bias":
                    if relu:
                        p.zero_()
                    else:
                        b = 1 / math.sqrt(fan_in) if fan_in else 0
                        p.uniform_(-b, b)
            elif w is not None and w.dim() == 1:  # batch norm
                p.fill_(1.0 if kind == "weight" else 0.0)
    return "Kaiming normal (ReLU family)" if relu else "PyTorch default (no ReLU-family activation)"


def _matches(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def freeze(model: torch.nn.Module, names) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Stop training the layers of the named taps: their parameters get no gradient and
    their buffers (BN statistics) are restored after every step. Returns (params, buffer snapshot)."""
    if not names:
        return [], {}
    taps = getattr(model, "tap_layers", {}) or {}
    unknown = [n for n in names if n not in taps]
    if unknown:
        raise FusenetTrainError(
            f"freeze: no tap named {', '.join(unknown)} in network '{getattr(model, 'name', '?')}' "
            f"(named taps: {', '.join(taps) or 'none; bind one with  name = layer ...'})")
    prefixes = [p for n in names for p in taps[n]]
    frozen = []
    for k, p in model.named_parameters():
        if _matches(k, prefixes):
            p.requires_grad_(False)
            frozen.append(k)
    snap = {k: b.detach().clone() for k, b in model.named_buffers() if _matches(k, prefixes)}
    return frozen, snap


def restore_buffers(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    """Put back the frozen layers' buffers (batch-norm statistics) that a training step updated."""
    if snap:
        bufs = dict(model.named_buffers())
        with torch.no_grad():
            for k, v in snap.items():
                bufs[k].copy_(v)
