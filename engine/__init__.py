"""fusenet engine: graph IR, shapes, passes, Triton kernels, runtime, training."""
from engine import device as _device  # noqa: F401  (must come before any triton import)
from engine.runtime.backends import compile  # noqa: E402,F401
from engine.ir.frontend import load  # noqa: E402,F401
