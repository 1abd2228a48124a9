"""The on-disk cache of tuned tile configs: one JSON file per machine (or cluster).

The file: `$FUSENET_TUNE_CACHE`, else `~/.cache/fusenet/tune.json`; JSON
`{"schema": 1, "entries": {key: entry}}` with key
`kernel|shape|dtype|device|triton-version`, e.g.
`conv2d_fwd|M=4096,N=64,K=576,...|bfloat16|NVIDIA H100 80GB HBM3 (sm_90)|triton-3.6.0`
and entry the chosen config plus its time (and the heuristic's, for comparison).
It is read lazily once per process. Writes take a lock file, merge with what is
on disk at that moment and replace the file atomically (temp file + os.replace),
so concurrent tuners keep each other's entries. An unreadable or malformed file
gives one warning line and counts as empty; nothing here ever raises because of
the cache file.

Public API: TuneCache, cache_path, current_cache, cache_entries, cache_key,
dtype_key, SCHEMA.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import triton

from engine.kernels.tune_config import Config

SCHEMA = 1


def dtype_key(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cache_key(kernel: str, shape: dict, dtype: torch.dtype, device_name: str) -> str:
    """kernel|k1=v1,k2=v2|dtype|device|triton-X.Y.Z (shape items in the launcher's order)."""
    shape_text = ",".join(f"{k}={v}" for k, v in shape.items())
    return f"{kernel}|{shape_text}|{dtype_key(dtype)}|{device_name}|triton-{triton.__version__}"


# --------------------------------------------------------------------------- #
# The cache file
# --------------------------------------------------------------------------- #
def cache_path() -> Path:
    """$FUSENET_TUNE_CACHE if set, else ~/.cache/fusenet/tune.json."""
    env = os.environ.get("FUSENET_TUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fusenet" / "tune.json"


_warned: set[tuple[str, str]] = set()


def _warn(path: Path, kind: str, message: str) -> None:
    """One warning line per cache path and kind ("read", "write") per process."""
    if (str(path), kind) in _warned:
        return
    _warned.add((str(path), kind))
    print(f"fusenet: autotune cache {path}: {message}", file=sys.stderr)


def _check_entry(entry: Any) -> None:
    if not isinstance(entry, dict):
        raise ValueError("an entry is not an object")
    Config.from_json(entry.get("config"))
    ms = entry.get("ms")
    if ms is not None and not isinstance(ms, (int, float)):
        raise ValueError(f"an entry's time is {ms!r}")


def _read_file(path: Path) -> tuple[dict, str | None]:
    """(entries, problem): the entries of a cache file, and a warning about it (or None).

    A missing file is an empty cache, not a problem. A file that is not a
    schema-1 cache counts as empty; individual malformed entries are dropped.
    """
    hint = "treating it as empty (the next tuning rewrites it; delete the file to start afresh)"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, None
    except (OSError, UnicodeDecodeError) as e:
        return {}, f"unreadable ({type(e).__name__}: {e}); {hint}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return {}, f"not valid JSON ({e}); {hint}"
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), dict):
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        return {}, f"not a fusenet tune cache of schema {SCHEMA} (its schema is {found!r}); {hint}"
    entries, bad = {}, 0
    for key, entry in data["entries"].items():
        try:
            _check_entry(entry)
        except ValueError:
            bad += 1
            continue
        entries[key] = entry
    return entries, (f"{bad} malformed entries ignored (the next tuning drops them; "
                     "delete the file to start afresh)" if bad else None)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path`.lock (POSIX); a no-op where locking is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield  # cannot create the lock file: the write will say what is wrong
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temp file in path's folder, then os.replace it over path."""
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)  # not sort_keys: a shape's items keep the launcher's order
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class TuneCache:
    """The tuned configs of one cache file, read on first use."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict | None = None
        self._ours: dict = {}  # entries this process tuned: they win over the file's when merging

    @property
    def entries(self) -> dict:
        if self._entries is None:
            self._entries, problem = _read_file(self.path)
            if problem:
                _warn(self.path, "read", problem)
        return self._entries

    def get(self, key: str) -> Config | None:
        entry = self.entries.get(key)
        return Config.from_json(entry["config"]) if entry is not None else None

    def put(self, key: str, entry: dict) -> None:
        """Store an entry here and in the file (merged with the file's current contents)."""
        self.entries[key] = entry
        self._ours[key] = entry
        self.save()

    def save(self) -> None:
        """Merge this process's entries into the file on disk; warn (once) instead of raising on failure."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path):
                on_disk, problem = _read_file(self.path)
                if problem:
                    _warn(self.path, "read", problem)
                merged = {**on_disk, **self._ours}
                _write_atomic(self.path, {"schema": SCHEMA, "entries": dict(sorted(merged.items()))})
            # the file now also holds what other processes tuned meanwhile
            self._entries = {**(self._entries or {}), **merged}
        except (OSError, TypeError, ValueError) as e:  # TypeError/ValueError: an entry JSON cannot hold
            _warn(self.path, "write", f"cannot write it ({type(e).__name__}: {e}); "
                                      "configs tuned now are kept for this process only")


_caches: dict[Path, TuneCache] = {}


def current_cache() -> TuneCache:
    """The cache of the current cache_path(), loaded once per process (per path)."""
    path = cache_path()
    if path not in _caches:
        _caches[path] = TuneCache(path)
    return _caches[path]


def cache_entries() -> dict:
    """The entries of the current cache file (key -> entry), as this process sees them."""
    return dict(current_cache().entries)


__all__ = ["TuneCache", "cache_path", "current_cache", "cache_entries", "cache_key", "dtype_key", "SCHEMA"]
