"""One training step (or one inference forward) of a compiled network, as a closure.

The performance tools run a network without caring about its data: `fusenet
inspect` and `fusenet bench` record the kernel variants a step launches (a dry
run: no kernel executes), `fusenet tune` times them on the GPU, and the AOT
tests compile them. They all need the same step, made here once: zero inputs of
the network's shape, then forward, and in training the fused cross-entropy,
backward and a fused SGD step (momentum, Nesterov, weight decay: the optimizer
variant the examples train with).
"""
from __future__ import annotations

from typing import Callable


def network_step(model, batch: int, training: bool) -> Callable[[], None]:
    """A closure running one step of `model` on `batch` zero images: the forward
    pass, and in training the loss, backward pass and optimizer step.

    Inputs are made on torch's current default device (tune makes them on the GPU
    with `with torch.device("cuda"):`).
    """
    import torch

    from engine.kernels.loss import network_loss
    from engine.kernels.optim import SGD

    def run() -> None:
        model.train(training)
        x = torch.zeros(batch, *model.input_shape)
        if not training:
            with torch.no_grad():
                model(x)
            return
        opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        network_loss(model(x), label_smoothing=0.1).backward()  # class 0 everywhere: values do not matter
        opt.step()

    return run
