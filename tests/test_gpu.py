"""The GPU tier (`pytest -m gpu`): every example network on CUDA in fp32, tf32,
fp16 and bf16 against the fp64 PyTorch reference, forward and backward, plus a
whole training step. Skipped without a CUDA device (see conftest.py)."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

import engine
from engine.kernels.loss import cross_entropy
from engine.kernels.optim import SGD
from helpers import assert_close

pytestmark = pytest.mark.gpu

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ["digits", "lenet5", "resnet_small", "unet_tiny", "airbench94", "resnet9", "detect_shapes"]
# output tolerance per precision (tests/helpers.py names); gradients are compared
# norm-wise: each must be within GRAD_NORM or within 1.5x the error PyTorch itself
# makes at that precision (eager with autocast / tf32) on the same network, since
# half-precision gradients lose small values to rounding and subnormals
OUT_TOL = {"fp32": "network_fp32", "tf32": "tf32", "fp16": torch.float16, "bf16": torch.bfloat16}
GRAD_NORM = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 0.08, "bf16": 0.15}


def _pair(name: str, precision: str):
    text = re.sub(r"dropout [0-9.]+", "dropout 0.0", (EXAMPLES / f"{name}.cnn").read_text())
    tri = engine.compile(text, precision=precision).cuda()
    ref = engine.compile(text, backend="torch").double().cuda()
    ref.load_state_dict(tri.state_dict())
    return tri, ref


def _pytorch_at(precision: str, net, x, g):
    """PyTorch's own gradients for `net` (fp32 master weights) at `precision`."""
    from engine.perf.bench.contenders import matmul_precision
    from engine.precision import autocast_dtype

    xp = x.float().requires_grad_()
    with matmul_precision(precision):
        if autocast_dtype(precision) is not None:
            with torch.autocast("cuda", dtype=autocast_dtype(precision)):
                y = net(xp)
        else:
            y = net(xp)
        y.float().backward(g.float())
    return xp.grad, [p.grad for p in net.parameters()]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_example_on_gpu(name, precision, mode):
    tri, ref = _pair(name, precision)
    pyt = copy.deepcopy(ref).float()  # same weights and BN buffers, before any forward
    for net in (tri, ref, pyt):
        net.train(mode == "train")
    x = torch.randn(16, *tri.input_shape, device="cuda")
    xt, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    yt, yr = tri(xt), ref(xr)
    assert_close(yt, yr, OUT_TOL[precision], what=f"{name} {precision} {mode} output")
    g = torch.randn_like(yr)
    yt.backward(g.float())
    yr.backward(g)
    xp_grad, p_grads = _pytorch_at(precision, pyt, x, g)
    top = max(float(p.grad.norm()) for p in ref.parameters())

    def rel(ours, theirs):
        return float((ours.double() - theirs).norm()) / max(float(theirs.norm()), 1e-2 * top)

    def bound(pytorch_err):
        return max(GRAD_NORM[precision], 1.5 * pytorch_err)

    assert rel(xt.grad, xr.grad) < bound(rel(xp_grad, xr.grad)), "input gradient"
    for (key, pt), (_, pr), gp in zip(tri.named_parameters(), ref.named_parameters(), p_grads):
        ours, pytorch = rel(pt.grad, pr.grad), rel(gp, pr.grad)
        assert ours < bound(pytorch), f"{key}: gradient off by {ours:.3g} in norm (PyTorch at {precision}: {pytorch:.3g})"
    with torch.no_grad():
        assert_close(tri(x), ref(x.double()), OUT_TOL[precision], what=f"{name} {precision} {mode} no-grad")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_on_gpu_reduces_the_loss(precision):
    tri, _ = _pair("resnet_small", precision)
    opt = SGD(tri.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, *tri.input_shape, device="cuda", generator=gen)
    y = torch.randint(0, 10, (64,), device="cuda", generator=gen)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = cross_entropy(tri(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
