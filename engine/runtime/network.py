"""The nn.Module contract shared by every backend.

Parameters and buffers live in plain torch.nn layers (Conv2d, BatchNorm, Linear)
named after their IR node (`conv0`, `bn0`, `linear0`) and registered in source
order, so a state dict maps one-to-one onto a hand-written PyTorch model and
weights move freely between backends. Each parametric op's registry entry
(engine.ir.ops) builds its layer. Backends differ only in `forward`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from engine.ir.frontend import Spec
from engine.ir.graph import Node
from engine.ir.ops import op


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
                in_shape = self.graph.node(node.inputs[0]).shape
                self.add_module(node.name, op(node.op).layer(nn, node, in_shape))

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
