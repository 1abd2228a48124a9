"""Activation functions as Triton device functions, shared by every fused kernel.

An activation is picked by an integer `tl.constexpr` code so a kernel compiles
only the branch it uses. Gradients are written in terms of the pre-activation z,
which is what fused kernels save for the backward pass.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Codes used as tl.constexpr ACT flags. Keep in sync with ACTIVATIONS below.
NONE, RELU, LEAKY_RELU, SIGMOID, TANH, GELU, SILU = range(7)
ACTIVATIONS = {
    "none": NONE,
    "relu": RELU,
    "leaky_relu": LEAKY_RELU,
    "sigmoid": SIGMOID,
    "tanh": TANH,
    "gelu": GELU,
    "silu": SILU,
}

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def act_code(name: str) -> int:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    # tanh(z) = 2*sigmoid(2z) - 1, stable for large |z| in fp32.
    return 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0


@triton.jit
def apply_act(z, ACT: tl.constexpr, slope):
    """act(z), computed in z's dtype (callers pass fp32)."""
    if ACT == 1:
        return tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        return tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        return _sigmoid(z)
    elif ACT == 4:
        return _tanh(z)
    elif ACT == 5:
        # exact (erf) GELU, PyTorch's default
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 6:
        return z * _sigmoid(z)
    else:
        return z


@triton.jit
def act_grad(dy, z, ACT: tl.constexpr, slope):
    """d act(z) / dz * dy."""
    if ACT == 1:
        return tl.where(z > 0, dy, 0.0)
    elif ACT == 2:
        return tl.where(z > 0, dy, dy * slope)
    elif ACT == 3:
        s = _sigmoid(z)
        return dy * s * (1.0 - s)
    elif ACT == 4:
        t = _tanh(z)
        return dy * (1.0 - t * t)
    elif ACT == 5:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return dy * (cdf + z * pdf)
    elif ACT == 6:
        s = _sigmoid(z)
        return dy * (s + z * s * (1.0 - s))
    else:
        return dy
