"""Small network specs for the training-tool tests, compiled with the real
`engine.compile` (the PyTorch backend unless a test asks for Triton: the tool's
logic is the same on both, and the Triton path is exercised separately)."""
from __future__ import annotations

import engine


def compile(source: str, backend: str = "torch", precision=None):  # noqa: A001
    return engine.compile(source, backend=backend, precision=precision)


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
