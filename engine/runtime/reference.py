"""The PyTorch reference executor: the same graph run with torch.nn layers and
torch.nn.functional, each op as its registry entry (engine.ir.ops) defines it.

It is the oracle of every test and the `--backend torch` for CPU users.
Activations run their PyTorch oracle from engine.kernels.activations, where
each activation is defined once.
"""
from __future__ import annotations

from typing import Sequence

import torch

from engine.ir.ops import RefCall, op
from engine.kernels.activations import ACTIVATIONS
from engine.runtime.network import Network


class ReferenceNetwork(Network):
    backend = "torch"

    def forward(self, x: torch.Tensor, taps: Sequence[str] = ()):
        self.check_input(x)
        values: dict[int, torch.Tensor] = {}
        for node in self.graph:
            if node.op == "input":
                values[node.id] = x
                continue
            inputs = tuple(values[i] for i in node.inputs)
            act = ACTIVATIONS.get(node.op)
            if act is not None:
                values[node.id] = act.torch(inputs[0], node.attr(act.param) if act.param else 0.0)
                continue
            layer = self.layer(node) if node.name else None
            values[node.id] = op(node.op).reference(RefCall(torch, node, inputs, layer, self.training))
        result = values[self.graph.output.id]
        if taps:
            return result, {t: values[self.graph.taps[t]] for t in taps}
        return result
