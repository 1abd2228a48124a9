"""`gc_paused()`: no cyclic garbage collection while a big program is built.

Parsing and expanding a large spec allocate hundreds of thousands of objects
that all stay alive (tokens, AST nodes, graph nodes). CPython's collector
starts a pass every few hundred allocations and, as they survive, walks the
growing older generations again and again: about 40% of the time of loading a
90,000-line spec. Those objects form no reference cycles (an AST and a graph
are trees of immutable nodes), so reference counting frees whatever becomes
garbage, and pausing the collector changes nothing but the time. It is
switched back on, if it was on, however the block ends.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
