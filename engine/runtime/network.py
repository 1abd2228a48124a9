"""The nn.Module contract shared by every backend.

Parameters and buffers live in plain torch.nn layers (Conv2d, BatchNorm, Linear)
named after their IR node (`conv0`, `bn0`, `linear0`) and registered in source
order, so a state dict maps one-to-one onto a hand-written PyTorch model and
weights move freely between backends. Backends differ only in `forward`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from engine.ir.frontend import Spec
from engine.ir.graph import Node


def make_layer(node: Node, in_shape: tuple[int, ...]) -> nn.Module:
    a = node.attrs
    if node.op == "conv":
        return nn.Conv2d(
            in_shape[0], a["out"], a["kernel"], a["stride"], a["pad"], a["dilation"], a["groups"], a["bias"]
        )
    if node.op == "linear":
        return nn.Linear(in_shape[0], a["out"], a["bias"])
    if node.op == "bn":
        cls = nn.BatchNorm2d if len(in_shape) == 3 else nn.BatchNorm1d
        return cls(in_shape[0], eps=a["eps"], momentum=a["momentum"])
    raise AssertionError(node.op)


class Network(nn.Module):
    """Base of the compiled modules: layers, attributes, input checks."""

    backend = "?"

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        self.graph = spec.graph
        self.name = spec.graph.name
        self.train_config = spec.train
        self.source_text = spec.source
        self.input_shape = tuple(spec.graph.input_shape)
        self.output_shape = tuple(spec.graph.output.shape)
        self.tap_layers = {k: list(v) for k, v in spec.graph.tap_layers.items()}
        for node in self.graph:
            if node.name:
                self.add_module(node.name, make_layer(node, self.graph.node(node.inputs[0]).shape))

    def layer(self, node: Node) -> nn.Module:
        return getattr(self, node.name)

    def check_input(self, x: torch.Tensor) -> None:
        want = self.input_shape
        if x.dim() != len(want) + 1 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"{self.name} expects input N x {'x'.join(map(str, want))}, got {'x'.join(map(str, x.shape))}"
            )

    def forward(self, x: torch.Tensor, taps: Sequence[str] = ()):  # pragma: no cover - abstract
        raise NotImplementedError
