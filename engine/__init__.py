"""fusenet engine: graph IR, passes, Triton kernels, runtimes, training, performance tools, CLI.

`engine.compile(spec)` and `engine.load(spec)` are the entry points. Importing
`engine` itself is cheap (no torch, no triton): `fusenet check` and `fmt` never
load them. engine.kernels imports engine.device before triton, which switches
on Triton's CPU interpreter where there is no GPU.
"""
from __future__ import annotations


def __getattr__(name: str):
    if name == "compile":
        from engine.runtime.backends import compile

        return compile
    if name == "load":
        from engine.ir.frontend import load

        return load
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
