"""Triton kernels, one module per op family, forward and backward side by side.

engine.device comes first: it switches on Triton's CPU interpreter where there
is no GPU, which must happen before triton is imported.
"""
from engine import device as _device  # noqa: F401
