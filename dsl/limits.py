"""The language's documented limits: how big and how deep a program may be.

Every limit exists so that any input, however hostile, gets one located error
in bounded time and memory instead of a hang, a MemoryError or a
RecursionError. Each is far beyond what a real network needs; the error that
enforces one names it in its hint.

Expansion (checked while blocks and repeats are expanded; see engine/ir/expand.py)
    MAX_LAYERS         at most 250,000 layers after expansion (a written
                       spec of 100,000 two-layer lines still loads). A repeat or
                       block call whose size the source fixes is sized before
                       it is expanded, so an exponential program is refused
                       before any of it is built; layers, including those
                       refused with an error, are also counted as they are
                       expanded.
    MAX_REPEAT         a repeat count is 0..1000.
    MAX_CALL_DEPTH     block calls nested inside block calls: at most 32.
    MAX_NESTING        residual / shortcut / repeat bodies nested inside one
                       another, counting through block calls: at most 64 deep.
"""
from __future__ import annotations

MAX_NESTING = 64

MAX_LAYERS = 250_000
MAX_REPEAT = 1000
MAX_CALL_DEPTH = 32
