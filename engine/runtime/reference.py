"""The PyTorch reference executor: the same graph run with torch.nn.functional.

It is the oracle of every test and the `--backend torch` for CPU users.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from engine.runtime.network import Network


def binomial_filter(size: int) -> list[float]:
    """Normalised binomial coefficients: [1,2,1]/4 for size 3."""
    row = [1.0]
    for _ in range(size - 1):
        row = [a + b for a, b in zip([0.0] + row, row + [0.0])]
    total = sum(row)
    return [v / total for v in row]


def blurpool_reference(x: torch.Tensor, stride: int, size: int) -> torch.Tensor:
    left, right = (size - 1) // 2, size // 2
    if size > 1:
        x = F.pad(x, (left, right, left, right), mode="reflect")
    f1 = torch.tensor(binomial_filter(size), dtype=x.dtype, device=x.device)
    kernel = (f1[:, None] * f1[None, :]).expand(x.shape[1], 1, size, size)
    return F.conv2d(x, kernel, stride=stride, groups=x.shape[1])


_ACTS = {
    "none": lambda v, slope: v,
    "relu": lambda v, slope: F.relu(v),
    "leaky_relu": lambda v, slope: F.leaky_relu(v, slope),
    "sigmoid": lambda v, slope: torch.sigmoid(v),
    "tanh": lambda v, slope: torch.tanh(v),
    "gelu": lambda v, slope: F.gelu(v),
    "silu": lambda v, slope: F.silu(v),
}


def torch_activation(name: str, v: torch.Tensor, slope: float = 0.01) -> torch.Tensor:
    """Activation `name` (a language activation, or "none") in plain PyTorch:
    the oracle the fused kernels' epilogues are compared with."""
    return _ACTS[name](v, slope)


class ReferenceNetwork(Network):
    backend = "torch"

    def forward(self, x: torch.Tensor, taps: Sequence[str] = ()):
        self.check_input(x)
        values: dict[int, torch.Tensor] = {}
        for node in self.graph:
            a = node.attrs
            v = values[node.inputs[0]] if node.inputs else x
            op = node.op
            if op == "input":
                out = x
            elif op in ("conv", "linear", "bn"):
                out = self.layer(node)(v)
            elif op in _ACTS:
                out = torch_activation(op, v, a.get("slope", 0.01))
            elif op == "softmax":
                out = F.softmax(v, dim=1)
            elif op == "maxpool":
                out = F.max_pool2d(v, a["kernel"], a["stride"], a["pad"])
            elif op == "avgpool":
                out = F.avg_pool2d(v, a["kernel"], a["stride"], a["pad"])
            elif op == "global_avgpool":
                out = v.mean(dim=(2, 3))
            elif op == "global_maxpool":
                out = F.adaptive_max_pool2d(v, 1).flatten(1)
            elif op == "blurpool":
                out = blurpool_reference(v, a["stride"], a["filter"])
            elif op == "dropout":
                out = F.dropout(v, a["p"], self.training)
            elif op == "flatten":
                out = v.flatten(1)
            elif op == "upsample":
                kw = {"align_corners": False} if a["mode"] == "bilinear" else {}
                out = F.interpolate(v, scale_factor=a["factor"], mode=a["mode"], **kw)
            elif op == "scale":
                out = v * a["factor"]
            elif op == "add":
                out = v + values[node.inputs[1]]
            elif op == "concat":
                out = torch.cat([v, values[node.inputs[1]]], dim=1)
            else:  # pragma: no cover
                raise AssertionError(op)
            values[node.id] = out
        result = values[self.graph.output.id]
        if taps:
            return result, {t: values[self.graph.taps[t]] for t in taps}
        return result
