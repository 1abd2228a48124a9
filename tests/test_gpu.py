"""The GPU tier (`pytest -m gpu`): every example network on CUDA in fp32, tf32,
fp16 and bf16 against the fp64 PyTorch reference, forward and backward, plus a
whole training step. Skipped without a CUDA device (see conftest.py)."""
from __future__ import annotations

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
NAMES = ["digits", "lenet5", "resnet_small", "unet_tiny", "airbench94", "resnet9"]
# output tolerance per precision (tests/helpers.py names); gradients are compared
# norm-wise with the bound below, since half-precision gradients lose the small
# values to rounding and subnormals (measured on CPU in fp16: 1-5% in norm)
OUT_TOL = {"fp32": "network_fp32", "tf32": "tf32", "fp16": torch.float16, "bf16": torch.bfloat16}
GRAD_NORM = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 0.08, "bf16": 0.15}


def _pair(name: str, precision: str):
    text = re.sub(r"dropout [0-9.]+", "dropout 0.0", (EXAMPLES / f"{name}.cnn").read_text())
    tri = engine.compile(text, precision=precision).cuda()
    ref = engine.compile(text, backend="torch").double().cuda()
    ref.load_state_dict(tri.state_dict())
    return tri, ref


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_example_on_gpu(name, precision, mode):
    tri, ref = _pair(name, precision)
    tri.train(mode == "train")
    ref.train(mode == "train")
    x = torch.randn(16, *tri.input_shape, device="cuda")
    xt, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    yt, yr = tri(xt), ref(xr)
    assert_close(yt, yr, OUT_TOL[precision], what=f"{name} {precision} {mode} output")
    g = torch.randn_like(yr)
    yt.backward(g.float())
    yr.backward(g)
    top = max(float(p.grad.norm()) for p in ref.parameters())
    for (key, pt), (_, pr) in zip(tri.named_parameters(), ref.named_parameters()):
        err = float((pt.grad.double() - pr.grad).norm()) / max(float(pr.grad.norm()), 1e-2 * top)
        assert err < GRAD_NORM[precision], f"{key}: gradient off by {err:.3g} in norm"
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
