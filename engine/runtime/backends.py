"""`engine.compile`: from a spec to a ready nn.Module."""
from __future__ import annotations

from pathlib import Path

from engine.ir.frontend import load

BACKENDS = ("triton", "torch")


def compile(source: str | Path, backend: str = "triton", precision: str | None = None):
    """Compile a network spec (a path or the program text) to an nn.Module.

    backend="torch" builds the reference network from torch.nn layers;
    backend="triton" runs fusenet's fused Triton kernels. Raises FusenetError
    for an invalid program.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    spec = load(source)
    if backend == "torch":
        from engine.runtime.reference import ReferenceNetwork

        return ReferenceNetwork(spec)
    from engine.runtime.fused import TritonNetwork

    return TritonNetwork(spec, precision=precision or spec.train.precision)
