"""The tree reads as the pipeline: imports run only downward, and never in a circle.

Layers, lowest first. A module may import its own layer or a lower one; every
import counts, including those inside functions (a lazy import is still a
dependency). engine/__init__.py is the public facade (`engine.compile`,
`engine.load`), not a layer, and is left out.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("dsl",),
    ("engine.errors", "engine.precision", "engine.text", "engine.device", "engine.resources", "engine.version"),
    ("engine.ir",),
    ("engine.passes",),
    ("engine.kernels",),
    ("engine.runtime",),
    ("engine.training",),
    ("engine.export",),
    ("engine.perf",),
    ("engine.cli",),
]
FACADE = "engine"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in ("dsl", "engine") for p in (ROOT / top).rglob("*.py")}


def _layer(module: str) -> int:
    for k, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return k
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (tests/test_layers.py) where it belongs")


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports (`from pkg import mod` names the module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import engine.kernels.conv as c` -> that module
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in ("dsl", "engine"):
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items() if m != FACADE}


def test_imports_run_only_downward():
    upward = []
    for module, deps in sorted(_graph().items()):
        for dep in sorted(deps):
            if dep != FACADE and _layer(dep) > _layer(module):
                upward.append(f"{module} (layer {_layer(module)}) imports {dep} (layer {_layer(dep)})")
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_facade_imports_nothing_at_import_time():
    """`import engine` is cheap: its entry points load lazily."""
    tree = ast.parse((ROOT / "engine" / "__init__.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in top)
