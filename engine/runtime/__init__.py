"""Runtimes of a checked graph: fusenet's fused Triton kernels and the PyTorch reference."""
