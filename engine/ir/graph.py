"""The graph IR: a small, immutable list of nodes in execution order.

A node is one layer after block expansion: an op name from the language
(`conv`, `bn`, `relu`, `add`, ...), its input node ids, its bound attributes,
and, once shape inference has run, its per-sample output shape, parameter
count and forward FLOPs. Passes return new graphs; nothing is mutated.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping

from dsl.ast import Pos


@dataclass(frozen=True)
class Node:
    id: int
    op: str
    inputs: tuple[int, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    pos: Pos = field(default=Pos(0, 0), compare=False)
    name: str = ""  # owner name of parameters (conv0, bn3, linear0); "" if none
    shape: tuple[int, ...] | None = None  # per-sample output: (C, H, W) or (F,)
    params: int = 0
    flops: int = 0  # forward FLOPs per sample (multiply-add = 2)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def describe(self) -> str:
        """`conv 16 kernel=3x3 pad=1x1`-style text for tables and error notes."""
        from dsl.schema import LAYERS  # the language's defaults, to leave them out

        sig = LAYERS.get(self.op)
        defaults = {p.name: p.default for p in (sig.positional + sig.keywords)} if sig else {}
        parts = [self.op]
        for k, v in self.attrs.items():
            if k in ("tap",):
                parts.append(str(v))
                continue
            default = defaults.get(k)
            if v == default or (isinstance(v, tuple) and len(set(v)) == 1 and v[0] == default):
                continue
            if k == "stride" and v == self.attrs.get("kernel") and self.op in ("maxpool", "avgpool"):
                continue
            if k == "merge":
                continue
            if isinstance(v, tuple) and len(set(v)) == 1:
                v = v[0]
            if isinstance(v, tuple):
                v = "x".join(map(str, v))
            elif isinstance(v, float):
                v = f"{v:g}"
            elif isinstance(v, bool):
                v = str(v).lower()
            bare = sig is not None and k in [p.name for p in sig.positional]
            parts.append(str(v) if bare else f"{k}={v}")
        return " ".join(parts)


@dataclass(frozen=True)
class Graph:
    name: str
    nodes: tuple[Node, ...]
    input_shape: tuple[int, ...]
    taps: Mapping[str, int] = field(default_factory=dict)  # tap name -> node id
    tap_layers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # tap -> parameter owners

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def node(self, node_id: int) -> Node:
        return self.nodes[node_id]

    def with_nodes(self, nodes) -> "Graph":
        return replace(self, nodes=tuple(nodes))

    def users(self, node_id: int) -> list[Node]:
        return [n for n in self.nodes if node_id in n.inputs]

    def pretty(self) -> str:
        """The IR as text, one node per line (printed after each pass)."""
        lines = [f"graph {self.name} (input {'x'.join(map(str, self.input_shape))})"]
        tap_of = {v: k for k, v in self.taps.items()}
        for n in self.nodes:
            args = ", ".join(f"%{i}" for i in n.inputs)
            shape = "x".join(map(str, n.shape)) if n.shape else "?"
            owner = f" [{n.name}]" if n.name else ""
            tap = f"  # = {tap_of[n.id]}" if n.id in tap_of else ""
            lines.append(f"  %{n.id} = {n.describe()}({args}) : {shape}{owner}  @{n.pos.line}{tap}")
        return "\n".join(lines)
