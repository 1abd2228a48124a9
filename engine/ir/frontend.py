"""Source to checked graph: parse, expand, infer shapes, validate the train section.

`load(source)` is the single entry from text to a `Spec`; every tool (check,
compile, train, bench) starts here, so every tool reports the same errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsl import ast
from dsl.errors import Collector, Diagnostic, FusenetError
from dsl.parser import parse
from dsl.train_config import TrainConfig
from dsl.train_section import build_train_config
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


def read_source(source: str | Path) -> tuple[str, str]:
    """(text, filename) from a path or from program text."""
    if isinstance(source, Path) or (source and "\n" not in source and "{" not in source):
        path = Path(source)
        if not path.exists():
            raise FusenetError([Diagnostic(f"no such file: {path}", ast.Pos(0, 0))], "", str(path))
        if path.is_dir():
            raise FusenetError([Diagnostic(f"{path} is a directory, not a .cnn file", ast.Pos(0, 0))], "", str(path))
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError:
            raise FusenetError([Diagnostic("not a text file (invalid UTF-8)", ast.Pos(0, 0))], "", str(path)) from None
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
    errors.raise_if_any()
    return Spec(program, graph, train, text, name)
