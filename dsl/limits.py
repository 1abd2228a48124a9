"""The language's documented limits: how big and how deep a program may be.

Every limit exists so that any input, however hostile, gets one located error
in bounded time and memory instead of a hang, a MemoryError or a
RecursionError. Each is far beyond what a real network needs; the error that
enforces one names it in its hint.

Source text
    MAX_SOURCE_BYTES   a spec file is at most 16 MiB (read_source refuses more).

Syntax (checked by the parser, so the formatter and every later stage can rely
on them)
    MAX_NESTING        residual / shortcut / repeat bodies nested inside one
                       another: at most 64 deep. The expander applies the same
                       bound to nesting reached through block calls.
    MAX_EXPR_DEPTH     an argument expression nests at most 100 deep. Unary
                       minus and a parenthesised right operand (`a - (b - c)`)
                       each add a level; a left-associative chain such as a
                       sum of 10,000 terms is one level, and redundant
                       parentheses add none.
    MAX_INT            an integer, written or computed, lies within
                       +-(2**63 - 1); a float literal must be finite
                       (1e309 is refused, as is a 400-digit float).

Expansion (checked while blocks and repeats are expanded; see engine/ir/expand.py)
    MAX_LAYERS         at most 250,000 layers after expansion (a written
                       spec of 100,000 two-layer lines still loads). A repeat or
                       block call whose size the source fixes is sized before
                       it is expanded, so an exponential program is refused
                       before any of it is built; layers, including those
                       refused with an error, and block calls are also counted
                       as they are expanded.
    MAX_REPEAT         a repeat count is 0..1000.
    MAX_CALL_DEPTH     block calls nested inside block calls: at most 32.
    (and checking stops after 200 errors: MAX_KEPT in dsl/errors.py)

Sizes (checked when arguments are bound and shapes inferred)
    MAX_CHANNELS       channels, features, conv/linear OUT and groups: at most 2**20.
    MAX_SIZE           spatial sizes (input H and W, every inferred H and W),
                       kernel, stride, pad, dilation, upsample factor, crop and
                       cutout: at most 2**16.
    MAX_BATCH          a train batch: at most 2**24.
    MAX_COUNT          epochs, patience, warmup and step counts: at most 10**6.
"""
from __future__ import annotations

MAX_SOURCE_BYTES = 16 * 1024 * 1024

MAX_NESTING = 64
MAX_EXPR_DEPTH = 100
MAX_INT = 2**63 - 1

MAX_LAYERS = 250_000
MAX_REPEAT = 1000
MAX_CALL_DEPTH = 32

MAX_CHANNELS = 2**20
MAX_SIZE = 2**16
MAX_BATCH = 2**24
MAX_COUNT = 10**6
