"""Data files shipped inside the fusenet package, so that an installed `fusenet`
finds them from any folder:

- `examples/*.cnn`: the example network specs;
- `workloads.toml`: the workloads of the GPU benchmark (`fusenet bench --layers`).

In the repository both are symbolic links to the files users know,
`examples/` and `benchmarks/workloads.toml`, which stay the one copy to edit; a
built wheel holds the files themselves (setuptools follows the links), and a
test checks that it does.

`shipped(path)` is how the command line reaches them: a path that does not
exist in the current folder but names a shipped file the way the README does
(`examples/digits.cnn`, `benchmarks/workloads.toml`) means the shipped file.
"""
from __future__ import annotations

from pathlib import Path, PurePath

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE / "examples"
WORKLOADS = HERE / "workloads.toml"


def example_paths() -> list[Path]:
    """The shipped example specs, sorted by name."""
    return sorted(EXAMPLES.glob("*.cnn"))


def shipped(path: str | PurePath) -> Path | None:
    """The shipped file that a relative `path` names as the README does, or None.

    `examples/NAME.cnn` -> the shipped example NAME; `benchmarks/workloads.toml`
    -> the shipped workloads. Only relative paths qualify: an absolute path names
    one place on purpose.
    """
    p = PurePath(path)
    if p.is_absolute():
        return None
    parts = tuple(x for x in p.parts if x != ".")
    if len(parts) == 2 and parts[0] == "examples" and parts[1].endswith(".cnn"):
        candidate = EXAMPLES / parts[1]
    elif parts == ("benchmarks", "workloads.toml"):
        candidate = WORKLOADS
    else:
        return None
    return candidate if candidate.is_file() else None


def resolve(path: str) -> str:
    """`path` itself if it exists (or names nothing shipped); else the shipped file it names."""
    if Path(path).exists():
        return path
    found = shipped(path)
    return str(found) if found is not None else path
