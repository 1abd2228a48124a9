"""The wheel: a built fusenet wheel holds every package and every data file of the
source tree, so that a non-editable install (`pip install .`, a built wheel) works
as the checkout does. Editable installs hide a missing package; this does not.

CI (.ci/run) also installs the wheel into a fresh virtual environment and runs
the command line from a folder outside the checkout.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("dsl", "engine")
# what the build reads: the project file, the README (the long description), the
# packages and the files engine/resources links to
BUILD_INPUTS = ("pyproject.toml", "README.md", "dsl", "engine", "examples", "benchmarks/workloads.toml")


def _source_files() -> dict[str, Path]:
    """Every file under the package folders, links followed: wheel name -> source path."""
    files = {}
    for top in PACKAGE_DIRS:
        for folder, dirs, names in os.walk(ROOT / top, followlinks=True):  # into engine/resources/examples
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(names):
                path = Path(folder) / name
                if path.suffix != ".pyc":
                    files[path.relative_to(ROOT).as_posix()] = path
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tree (so no build/ folder is left in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in BUILD_INPUTS:
        source, target = ROOT / name, src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (built,) = (tmp / "dist").glob("fusenet-*.whl")
    return built


def test_wheel_holds_every_package_module_and_data_file(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = sorted(set(_source_files()) - names)
        assert not missing, f"files of the source tree missing from the wheel: {missing}"
        for name, path in _source_files().items():
            assert z.read(name) == path.read_bytes(), f"{name} differs from {path}"
    packages = {p.relative_to(ROOT).as_posix() for top in PACKAGE_DIRS for p in (ROOT / top).rglob("*.py")}
    assert {"engine/perf/bench/layers.py", "engine/perf/aot_worker.py", "engine/cli/main.py"} <= packages
    assert not [n for n in names if n.startswith("tests/")]


def test_every_python_folder_is_a_package():
    """setuptools discovers packages by their __init__.py: a folder of modules without one would not ship."""
    for top in PACKAGE_DIRS:
        for folder in {p.parent for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts}:
            assert (folder / "__init__.py").is_file(), f"{folder} has modules but no __init__.py"


def test_wheel_ships_the_examples_and_workloads_the_readme_names(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        examples = sorted((ROOT / "examples").glob("*.cnn"))
        assert examples
        for path in examples:
            assert z.read(f"engine/resources/examples/{path.name}") == path.read_bytes()
        assert z.read("engine/resources/workloads.toml") == (ROOT / "benchmarks" / "workloads.toml").read_bytes()
        assert "dsl/grammar.lark" in names
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
        assert "fusenet = engine.cli:main" in entry


def test_shipped_files_are_the_repositorys_files():
    """One source of truth: engine/resources links to examples/ and benchmarks/workloads.toml."""
    from engine import resources

    assert resources.EXAMPLES.resolve() == (ROOT / "examples").resolve()
    assert resources.WORKLOADS.resolve() == (ROOT / "benchmarks" / "workloads.toml").resolve()
    assert [p.name for p in resources.example_paths()] == sorted(p.name for p in (ROOT / "examples").glob("*.cnn"))
    assert resources.shipped("examples/digits.cnn") == resources.EXAMPLES / "digits.cnn"
    assert resources.shipped("./benchmarks/workloads.toml") == resources.WORKLOADS
    assert resources.shipped("/abs/examples/digits.cnn") is None
    assert resources.shipped("examples/nope.cnn") is None
