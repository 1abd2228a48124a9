"""A whole training step on fusenet kernels: forward, fused cross-entropy,
backward and the fused optimizer, checked against PyTorch for 20 steps, proven
free of PyTorch arithmetic, and deterministic."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine
from engine.kernels.launch import recording
from engine.kernels.loss import cross_entropy
from engine.kernels.optim import SGD, Adam
from helpers import DATA_MOVEMENT_OPS, OpRecorder, assert_close

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# What a step may dispatch besides allocation, views and copies: the NCHW<->NHWC
# and flatten copies at the module boundary, autograd's seed gradient for the
# scalar loss (ones_like), and torch.optim's profiler hooks around step().
STEP_ALLOWED = DATA_MOVEMENT_OPS | {
    "_reshape_alias", "contiguous", "flatten", "full", "lift_fresh_copy", "new_empty_strided", "new_zeros",
    "resize_", "select", "split", "squeeze", "to", "transpose", "unsqueeze", "zeros_like", "ones_like",
    "_record_function_enter_new", "_record_function_exit",
    # dropout draws its mask seed from torch's generator (RNG, not arithmetic)
    "randint", "random_", "_local_scalar_dense",
}


def _nets(name: str):
    tri = engine.compile(EXAMPLES / f"{name}.cnn")
    ref = engine.compile(EXAMPLES / f"{name}.cnn", backend="torch").double()
    ref.load_state_dict(tri.state_dict())
    return tri, ref


def _batch(tri, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *tri.input_shape, generator=gen)
    y = torch.randint(0, tri.output_shape[0], (n,), generator=gen)
    return x, y


def _step_loss(tri, x, y):
    out = tri(x)
    if out.dim() == 4:  # segmentation: per-pixel logits, NHWC for the fused loss (a copy)
        return cross_entropy(out.permute(0, 2, 3, 1).contiguous(), y, label_smoothing=0.1)
    return cross_entropy(out, y, label_smoothing=0.1)


# airbench94 and resnet9 are slow under the interpreter; which PyTorch ops a step
# dispatches does not depend on tensor values, so they run as a dry run (every
# host launcher runs, no kernel executes).
@pytest.mark.parametrize(
    "name,dry", [("digits", False), ("lenet5", False), ("resnet_small", False), ("unet_tiny", False),
                 ("airbench94", True), ("resnet9", True)]
)
def test_whole_step_dispatches_no_torch_arithmetic(name, dry):
    tri, _ = _nets(name)
    opt = SGD(tri.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, _ = _batch(tri, 2, 0)
    classes = tri.output_shape[0]
    y = torch.randint(0, classes, (2, *tri.output_shape[1:]) if len(tri.output_shape) == 3 else (2,))
    opt.zero_grad()
    with recording(dry_run=dry), OpRecorder() as rec:
        loss = _step_loss(tri, x, y)
        loss.backward()
        opt.step()
    assert {"mm", "convolution", "add", "mul", "sum"} & rec.ops == set()
    assert rec.ops <= STEP_ALLOWED, f"PyTorch computed something: {sorted(rec.ops - STEP_ALLOWED)}"


# Adam runs on lenet5 (no batch norm): a conv bias before training-mode batch
# norm has a gradient that is rounding noise, which Adam's normalisation turns
# into full-size steps, so no two implementations agree on it.
@pytest.mark.parametrize(
    "name,opt_name,batch,make_ours,make_ref",
    [
        (
            "digits",
            "sgd-nesterov",
            32,
            lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        ),
        # eps 1e-6: fp32 gradients differ from fp64 ones by ~3e-9 (relative 3e-7); with eps 1e-8
        # Adam turns an element whose gradient is that small into a step of lr/2 whose sign is
        # rounding noise, and 20 steps of that decide the comparison, not the implementation
        # batch 8: the interpreted lenet5 step is the slowest in the suite (a quarter of its time at 32)
        ("lenet5", "adam", 8, lambda p: Adam(p, lr=2e-3, eps=1e-6), lambda p: torch.optim.Adam(p, lr=2e-3, eps=1e-6)),
    ],
)
def test_twenty_steps_track_the_reference(name, opt_name, batch, make_ours, make_ref):
    tri, ref = _nets(name)
    ours, theirs = make_ours(tri.parameters()), make_ref(ref.parameters())
    start = {k: p.detach().clone() for k, p in ref.named_parameters()}
    losses = []
    for step in range(20):
        x, y = _batch(tri, batch, step)
        for opt in (ours, theirs):
            opt.zero_grad()
        lt = cross_entropy(tri(x), y, label_smoothing=0.1)
        lr = torch.nn.functional.cross_entropy(ref(x.double()), y, label_smoothing=0.1)
        lt.backward()
        lr.backward()
        ours.step()
        theirs.step()
        losses.append((lt.item(), lr.item()))
    got, want = torch.tensor([a for a, _ in losses]), torch.tensor([b for _, b in losses])
    assert_close(got, want, "network_fp32", what=f"{opt_name} losses over 20 steps")
    assert want[-5:].mean() < want[:5].mean(), "the reference did not learn; the comparison says little"
    for (key, pt), (_, pr) in zip(tri.state_dict().items(), ref.state_dict().items()):
        if not pr.is_floating_point():
            assert torch.equal(pt, pr), key
        elif opt_name == "adam" and key in start:
            # Adam moves a weight whose gradient is rounding noise by ~lr per step,
            # so compare each tensor's whole update: equal to 1% of its size.
            update = (pr - start[key]).norm()
            assert (pt.double() - pr).norm() <= 1e-2 * update, f"{key}: updates disagree"
        else:
            assert_close(pt, pr, "network_fp32", what=f"{key} after 20 steps")


@pytest.mark.parametrize("name", ["digits", "resnet_small"])
def test_backward_is_deterministic(name):
    tri, _ = _nets(name)
    x, y = _batch(tri, 4, 7)
    grads = []
    for _ in range(2):
        torch.manual_seed(123)  # the same dropout masks
        tri.zero_grad()
        cross_entropy(tri(x), y).backward()
        grads.append([p.grad.clone() for p in tri.parameters()])
    for (key, _), a, b in zip(tri.named_parameters(), *grads):
        assert torch.equal(a, b), f"gradient of {key} differs between two identical backward passes"
