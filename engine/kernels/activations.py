"""Activations, each defined once: its device forward and gradient, its PyTorch
meaning, and the initialisation it calls for.

`ACTIVATIONS` is the table every layer reads: fused kernels pick an activation
by its integer code (`act_code(name)`, a `tl.constexpr`, so a kernel compiles
only the branch it uses); the reference backend and the tests run its `torch`
oracle; training initialises ReLU-like networks with Kaiming's gain. The
language declares each activation's name and parameters in dsl/schema.py; the
op registry makes their ops from that list.

Adding an activation: declare it in dsl/schema.py, then here add its entry to
ACTIVATIONS, its code constant, and its forward/gradient branches in
`apply_act` and `act_grad`. Codes follow the table's order and are never
written as numbers in kernels, so no two can collide.

Gradients are written in terms of the pre-activation z, which fused kernels
save (or recompute) for the backward pass; every gradient is linear in dy
(masked lanes load dy = 0 and must give 0). The one runtime float `p` carries
the activation's parameter (leaky_relu's slope, elu's alpha).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@dataclass(frozen=True)
class Activation:
    name: str
    torch: Callable[[torch.Tensor, float], torch.Tensor]  # the PyTorch oracle: (z, p) -> act(z)
    param: str | None = None  # the DSL keyword whose value the kernels receive as `p`
    rectifier: bool = False  # ReLU-like: initialised with Kaiming's ReLU gain (He et al. 2015)


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("relu", lambda z, p: F.relu(z), rectifier=True),
    Activation("leaky_relu", lambda z, p: F.leaky_relu(z, p), param="slope", rectifier=True),
    Activation("sigmoid", lambda z, p: torch.sigmoid(z)),
    Activation("tanh", lambda z, p: torch.tanh(z)),
    Activation("gelu", lambda z, p: F.gelu(z), rectifier=True),
    Activation("silu", lambda z, p: F.silu(z), rectifier=True),
    Activation("relu6", lambda z, p: F.relu6(z), rectifier=True),
    Activation("hardswish", lambda z, p: F.hardswish(z), rectifier=True),
    Activation("hardsigmoid", lambda z, p: F.hardsigmoid(z)),
    Activation("elu", lambda z, p: F.elu(z, p), param="alpha", rectifier=True),
    Activation("mish", lambda z, p: F.mish(z), rectifier=True),
)}

# The ACT constexpr of every kernel: 0 is the identity, then the table's order.
CODES: dict[str, int] = {"none": 0, **{name: k + 1 for k, name in enumerate(ACTIVATIONS)}}
NONE = tl.constexpr(CODES["none"])
RELU = tl.constexpr(CODES["relu"])
LEAKY_RELU = tl.constexpr(CODES["leaky_relu"])
SIGMOID = tl.constexpr(CODES["sigmoid"])
TANH = tl.constexpr(CODES["tanh"])
GELU = tl.constexpr(CODES["gelu"])
SILU = tl.constexpr(CODES["silu"])
RELU6 = tl.constexpr(CODES["relu6"])
HARDSWISH = tl.constexpr(CODES["hardswish"])
HARDSIGMOID = tl.constexpr(CODES["hardsigmoid"])
ELU = tl.constexpr(CODES["elu"])
MISH = tl.constexpr(CODES["mish"])


def act_code(name: str) -> int:
    """The ACT constexpr for an activation name ("none" for the identity)."""
    if not isinstance(name, str) or name not in CODES:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(CODES)}")
    return CODES[name]


def oracle(name: str, z: torch.Tensor, p: float = 0.0) -> torch.Tensor:
    """Activation `name` (or "none") in plain PyTorch, with its parameter p."""
    return z if name == "none" else ACTIVATIONS[name].torch(z, p)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    # tanh(z) = 2*sigmoid(2z) - 1, stable for large |z| in fp32
    return 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0


@triton.jit
def _softplus(z):
    # log(1 + e^z) without overflow: max(z, 0) + log(1 + e^-|z|)
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def apply_act(z, ACT: tl.constexpr, p):
    """act(z), computed in z's dtype (callers pass fp32)."""
    if ACT == RELU:
        return tl.where(z > 0, z, 0.0)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0, z, z * p)
    elif ACT == SIGMOID:
        return _sigmoid(z)
    elif ACT == TANH:
        return _tanh(z)
    elif ACT == GELU:
        # exact (erf) GELU, PyTorch's default
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == SILU:
        return z * _sigmoid(z)
    elif ACT == RELU6:
        return tl.minimum(tl.where(z > 0, z, 0.0), 6.0)
    elif ACT == HARDSWISH:
        return z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif ACT == HARDSIGMOID:
        return tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif ACT == ELU:
        return tl.where(z > 0, z, p * (tl.exp(tl.minimum(z, 0.0)) - 1.0))
    elif ACT == MISH:
        return z * _tanh(_softplus(z))
    else:
        return z


@triton.jit
def act_grad(dy, z, ACT: tl.constexpr, p):
    """d act(z) / dz * dy, with PyTorch's choice at the kinks."""
    if ACT == RELU:
        return tl.where(z > 0, dy, 0.0)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0, dy, dy * p)
    elif ACT == SIGMOID:
        s = _sigmoid(z)
        return dy * s * (1.0 - s)
    elif ACT == TANH:
        t = _tanh(z)
        return dy * (1.0 - t * t)
    elif ACT == GELU:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return dy * (cdf + z * pdf)
    elif ACT == SILU:
        s = _sigmoid(z)
        return dy * (s + z * s * (1.0 - s))
    elif ACT == RELU6:
        return tl.where((z > 0) & (z < 6.0), dy, 0.0)
    elif ACT == HARDSWISH:
        return tl.where(z < -3.0, 0.0, tl.where(z <= 3.0, dy * (z / 3.0 + 0.5), dy))
    elif ACT == HARDSIGMOID:
        return tl.where((z > -3.0) & (z < 3.0), dy / 6.0, 0.0)
    elif ACT == ELU:
        return tl.where(z > 0, dy, dy * p * tl.exp(tl.minimum(z, 0.0)))
    elif ACT == MISH:
        t = _tanh(_softplus(z))
        return dy * (t + z * _sigmoid(z) * (1.0 - t * t))
    else:
        return dy
