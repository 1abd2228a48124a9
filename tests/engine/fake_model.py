"""A stand-in for `engine.compile`, built from torch.nn, implementing exactly the model API
the training tool uses (train_config, source_text, name, input_shape, output_shape,
tap_layers, forward(x, taps=())). It parses a small subset of the DSL.
"""
from __future__ import annotations

import dataclasses
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsl.train_config import AugmentConfig, OptimizerConfig, ScheduleConfig, TrainConfig


def _val(v: str):
    if v in ("true", "false"):
        return v == "true"
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def _split(words):
    pos, kw = [], {}
    for w in words:
        if "=" in w:
            k, v = w.split("=", 1)
            kw[k] = _val(v)
        else:
            pos.append(_val(w))
    return pos, kw


def parse_train(lines) -> TrainConfig:
    cfg = TrainConfig()
    for line in lines:
        words = line.split()
        key, rest = words[0], words[1:]
        pos, kw = _split(rest)
        if key == "optimizer":
            kw = {("beta1" if k == "b1" else k): v for k, v in kw.items()}
            cfg = dataclasses.replace(cfg, optimizer=OptimizerConfig(name=pos[0], **kw))
        elif key == "schedule":
            cfg = dataclasses.replace(cfg, schedule=ScheduleConfig(name=pos[0], **kw))
        elif key == "loss":
            cfg = dataclasses.replace(cfg, loss=pos[0], label_smoothing=float(kw.get("label_smoothing", 0.0)))
        elif key == "augment":
            cfg = dataclasses.replace(cfg, augment=AugmentConfig(**kw))
        elif key == "freeze":
            cfg = dataclasses.replace(cfg, freeze=tuple(rest))
        elif key == "data":
            cfg = dataclasses.replace(cfg, data=rest[0])
        else:
            cfg = dataclasses.replace(cfg, **{key: pos[0] if pos else True})
    return cfg


class FakeNet(nn.Module):
    def __init__(self, text: str):
        super().__init__()
        self.source_text = text
        body = re.sub(r"#.*", "", text)
        m = re.search(r"network\s+(\w+)\s*\{(.*?)\}", body, re.S)
        self.name = m.group(1)
        lines = [ln.strip() for ln in m.group(2).splitlines() if ln.strip()]
        t = re.search(r"train\s*\{(.*?)\}", body, re.S)
        self.train_config = parse_train([ln.strip() for ln in t.group(1).splitlines() if ln.strip()]) if t else TrainConfig()
        self.ops: list[tuple] = []  # (kind, module name or None, args, bind name or None)
        self.tap_layers: dict[str, list[str]] = {}
        counts: dict[str, int] = {}
        c = None
        for line in lines:
            bind = None
            if re.match(r"^\w+\s*=", line):
                bind, line = [s.strip() for s in line.split("=", 1)]
                self.tap_layers[bind] = []
            for layer in [s.strip() for s in line.split("->")]:
                words = layer.split()
                kind, (pos, kw) = words[0], _split(words[1:])
                if kind == "input":
                    self.input_shape = tuple(int(v) for v in str(words[1]).split("x"))
                    c, h, w = self.input_shape
                    shapes = {}
                    continue
                mod = None
                if kind == "conv":
                    k = kw.get("kernel", 1)
                    mod = nn.Conv2d(c, pos[0], k, stride=kw.get("stride", 1), padding=kw.get("pad", 0),
                                    bias=kw.get("bias", True))
                    c = pos[0]
                    st, pd = kw.get("stride", 1), kw.get("pad", 0)
                    h, w = (h + 2 * pd - k) // st + 1, (w + 2 * pd - k) // st + 1
                elif kind == "bn":
                    mod = nn.BatchNorm2d(c)
                elif kind == "linear":
                    mod = nn.Linear(c, pos[0], bias=kw.get("bias", True))
                    c = pos[0]
                elif kind == "maxpool":
                    h, w = h // pos[0], w // pos[0]
                elif kind == "upsample":
                    h, w = h * pos[0], w * pos[0]
                elif kind == "flatten":
                    c, h, w = c * h * w, 1, 1
                elif kind == "global_avgpool":
                    h, w = 1, 1
                elif kind == "concat":
                    c = c + shapes[pos[0]]
                name = None
                if mod is not None:
                    i = counts.get(kind, 0)
                    counts[kind] = i + 1
                    name = f"{kind}{i}"
                    self.add_module(name, mod)
                    if bind:
                        self.tap_layers[bind].append(name)
                self.ops.append((kind, name, pos, kw))
            if bind:
                self.ops.append(("bind", None, [bind], {}))
                shapes[bind] = c
        with torch.no_grad():
            was = self.training
            self.eval()
            self.output_shape = tuple(self.forward(torch.zeros(1, *self.input_shape)).shape[1:])
            self.train(was)

    def forward(self, x, taps=()):
        bound = {}
        for kind, name, pos, kw in self.ops:
            if name is not None:
                x = getattr(self, name)(x)
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "leaky_relu":
                x = F.leaky_relu(x, kw.get("slope", 0.01))
            elif kind == "tanh":
                x = torch.tanh(x)
            elif kind == "maxpool":
                x = F.max_pool2d(x, pos[0])
            elif kind == "global_avgpool":
                x = x.mean(dim=(2, 3))
            elif kind == "flatten":
                x = x.flatten(1)
            elif kind == "dropout":
                x = F.dropout(x, pos[0], self.training)
            elif kind == "upsample":
                x = F.interpolate(x, scale_factor=pos[0], mode=kw.get("mode", "nearest"))
            elif kind == "add":
                x = x + bound[pos[0]]
            elif kind == "concat":
                x = torch.cat([x, bound[pos[0]]], 1)
            elif kind == "bind":
                bound[pos[0]] = x
            else:
                raise ValueError(f"fake model: unsupported layer {kind}")
        if taps:
            return x, {t: bound[t] for t in taps}
        return x


def compile(path_or_text: str, backend: str = "torch", precision=None) -> FakeNet:  # noqa: A001
    text = path_or_text
    if "\n" not in path_or_text and os.path.exists(path_or_text):
        with open(path_or_text) as f:
            text = f.read()
    return FakeNet(text)


DIGITS_SPEC = """\
network tiny {
    input 1x8x8
    e1 = conv 8 kernel=3 pad=1 -> bn -> relu
    e2 = conv 16 kernel=3 pad=1 -> relu -> maxpool 2
    global_avgpool
    linear 10
}
train {
    data digits
    split 0.2
    batch 64
    epochs 3
    optimizer sgd lr=0.1 momentum=0.9 nesterov=true weight_decay=5e-4
    schedule cosine warmup=1
    loss cross_entropy label_smoothing=0.1
    seed 0
}
"""

NOBN_SPEC = """\
network nobn {
    input 1x8x8
    e1 = conv 8 kernel=3 pad=1 -> relu
    conv 16 kernel=3 pad=1 -> relu -> maxpool 2
    flatten
    dropout 0.1
    linear 10
}
train {
    data digits
    batch 32
    epochs 2
    optimizer sgd lr=0.05 momentum=0.9
    augment crop=1 flip=true cutout=2
    seed 1
}
"""

SEG_SPEC = """\
network seg {
    input 3x16x16
    e1 = conv 8 kernel=3 pad=1 -> relu
    maxpool 2 -> conv 8 kernel=3 pad=1 -> relu
    upsample 2
    add e1
    conv 2 kernel=1
}
train {
    data shapes
    batch 32
    epochs 2
    optimizer adam lr=0.01
    seed 0
}
"""
