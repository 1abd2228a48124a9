"""Triton kernels, one module per op family, forward and backward side by side."""
