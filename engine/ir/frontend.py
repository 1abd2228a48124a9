"""Source to checked graph: parse, expand, infer shapes, validate the train section.

`load(source)` is the single entry from text to a `Spec`; every tool (check,
compile, train, bench) starts here, so every tool reports the same errors.
"""
from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from dsl import ast
from dsl.errors import Collector, Diagnostic, FusenetError
from dsl.limits import MAX_SOURCE_BYTES
from dsl.parser import parse
from dsl.train_config import TrainConfig
from dsl.train_section import build_train_config
from engine.ir.detection import check_detection_head
from engine.ir.expand import expand_with_call_sites
from engine.ir.graph import Graph
from engine.ir.shapes import infer_shapes


@dataclass(frozen=True)
class Spec:
    program: ast.Program
    graph: Graph
    train: TrainConfig
    source: str
    filename: str


def _file_error(path: Path, message: str) -> FusenetError:
    return FusenetError([Diagnostic(message, ast.Pos(0, 0))], "", str(path))


def read_source(source: str | Path) -> tuple[str, str]:
    """(text, filename) from a path or from program text.

    Only a regular file is read: a FIFO or a device such as /dev/zero would
    block or never end. At most MAX_SOURCE_BYTES are read, and a UTF-8
    byte-order mark (as Notepad writes one) is dropped."""
    if isinstance(source, Path) or (source and "\n" not in source and "{" not in source):
        path = Path(source)
        try:
            info = path.stat()  # stat, unlike open, never blocks on a FIFO
        except FileNotFoundError:
            raise _file_error(path, f"no such file: {path}") from None
        except OSError as e:
            raise _file_error(path, f"cannot read {path}: {e.strerror or e}") from None
        if stat.S_ISDIR(info.st_mode):
            raise _file_error(path, f"{path} is a directory, not a .cnn file")
        if not stat.S_ISREG(info.st_mode):
            raise _file_error(path, "not a regular file (a spec is read from a .cnn file, not a pipe or device)")
        limit = f"specs are at most {MAX_SOURCE_BYTES // 2**20} MiB (MAX_SOURCE_BYTES in dsl/limits.py)"
        if info.st_size > MAX_SOURCE_BYTES:
            raise _file_error(path, f"file too large ({info.st_size:,} bytes); {limit}")
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SOURCE_BYTES + 1)  # the file may grow after the stat
        except OSError as e:
            raise _file_error(path, f"cannot read {path}: {e.strerror or e}") from None
        if len(data) > MAX_SOURCE_BYTES:
            raise _file_error(path, f"file too large; {limit}")
        try:
            return data.decode("utf-8-sig"), str(path)
        except UnicodeDecodeError:
            raise _file_error(path, "not a text file (invalid UTF-8)") from None
    return source, "<string>"


def load(source: str | Path, filename: str | None = None) -> Spec:
    text, name = read_source(source)
    name = filename or name
    program = parse(text, name)
    errors = Collector(text, name)
    graph, call_sites = expand_with_call_sites(program, errors)
    if graph is not None:
        graph = infer_shapes(graph, errors, call_sites)
    train = build_train_config(program.train, errors)
    if graph is not None and program.train is not None:
        for opt in program.train.options:
            layer = opt.layers[0] if isinstance(opt, ast.Chain) and opt.layers else None
            if layer is not None and layer.name == "freeze":
                for arg in layer.args:
                    if isinstance(arg, ast.Name) and arg.id not in graph.taps:
                        known = ", ".join(graph.taps) or "none defined"
                        errors.error(f"freeze: no tap named '{arg.id}'", arg.pos, f"taps: {known}")
            if layer is not None and layer.name == "loss" and train.loss == "centernet":
                check_detection_head(graph, layer.pos, errors)
    errors.raise_if_any()
    return Spec(program, graph, train, text, name)
