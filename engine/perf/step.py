"""One training step (or one inference forward) of a compiled network, as a closure.

The performance tools run a network without caring about its data: `fusenet
inspect` and `fusenet bench` record the kernel variants a step launches (a dry
run: no kernel executes), `fusenet tune` times them on the GPU, and the AOT
tests compile them. They all need the same step, made here once: zero inputs of
the network's shape and class-0 labels (a detection network: placeholder
CenterNet targets and the spec's `loss centernet`), then in training the step `fusenet
train` runs (engine.training.step.TrainStep: logits, the fused loss under the
step clock, backward, the fused optimizer in device mode) with a fused SGD
(momentum, Nesterov, weight decay: the optimizer variant the examples train
with), so the variants recorded are the ones training launches.
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

    from engine.kernels.optim import SGD
    from engine.training.step import TrainStep

    def run() -> None:
        model.train(training)
        x = torch.zeros(batch, *model.input_shape)
        if not training:
            with torch.no_grad():
                model(x)
            return
        out = model.output_shape
        det = getattr(getattr(model, "train_config", None), "detection", None)
        if det is not None:  # loss centernet: targets of the right shapes
            from engine.kernels.centernet import placeholder_targets

            y = placeholder_targets(batch, out, x.device)
        else:
            y = torch.zeros((batch,) if len(out) == 1 else (batch, *out[1:]), dtype=torch.int64)
        opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        step = TrainStep(model, opt, backend="triton", device=x.device, lr_of=lambda k: 0.1, total_steps=1,
                         label_smoothing=0.0 if det is not None else 0.1, detection=det)
        try:
            step.body(x, y)
        finally:
            step.close()

    return run
