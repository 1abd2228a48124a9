"""The reference backend against hand-written PyTorch models.

For every example network there is an nn.Module written by hand from the
architecture's description (not from the spec). The compiled reference
network must have the same parameter count, a state dict that maps one-to-one
(same order, same shapes) onto the hand-written one, and, with those weights
loaded by position, the same outputs in eval and in train mode.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine
from engine.ir.frontend import load

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


# ---- hand-written models ------------------------------------------------------------


def conv_bn_relu(cin, cout, **kw):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU()]


class Digits(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5, padding=2)
        self.c3 = nn.Conv2d(6, 16, 5)
        self.f5 = nn.Linear(16 * 5 * 5, 120)
        self.f6 = nn.Linear(120, 84)
        self.out = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        x = x.flatten(1)
        return self.out(F.relu(self.f6(F.relu(self.f5(x)))))


class BasicBlock(nn.Module):
    def __init__(self, cin, c, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.short = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.short(x))


class ResNetSmall(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_relu(3, 16))
        self.layers = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2), BasicBlock(64, 64, 2))
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.layers(self.stem(x)).mean(dim=(2, 3))
        return self.fc(self.drop(x))


class UNetTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = nn.Conv2d(3, 16, 3, padding=1)
        self.enc2 = nn.Conv2d(16, 32, 3, padding=1)
        self.mid = nn.Conv2d(32, 64, 3, padding=1)
        self.dec2 = nn.Conv2d(64, 32, 3, padding=1)
        self.dec1 = nn.Conv2d(64, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        e1 = F.relu(self.enc1(x))
        e2 = F.relu(self.enc2(F.max_pool2d(e1, 2)))
        m = F.relu(self.mid(F.max_pool2d(e2, 2)))
        d2 = F.relu(self.dec2(F.interpolate(m, scale_factor=2, mode="nearest")))
        d2 = torch.cat([d2, e2], dim=1)
        d1 = F.leaky_relu(self.dec1(F.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False)), 0.1)
        return self.head(d1 + e1)


class Airbench94(nn.Module):
    """Keller Jordan's airbench94 layout (with PyTorch-default batch norms)."""

    def __init__(self):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, bias=False)
        self.bn0 = nn.BatchNorm2d(24)
        layers = []
        cin = 24
        for w in (64, 256, 256):
            layers += [
                nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(w), nn.GELU(),
                nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.GELU(),
            ]
            cin = w
        self.groups = nn.Sequential(*layers)
        self.head = nn.Linear(256, 10, bias=False)

    def forward(self, x):
        x = self.groups(F.gelu(self.bn0(self.whiten(x))))
        x = F.max_pool2d(x, 3).flatten(1)
        return self.head(x) * 0.1154


class ResNet9(nn.Module):
    def __init__(self):
        super().__init__()
        self.prep = nn.Sequential(*conv_bn_relu(3, 64))
        self.layer1 = nn.Sequential(*conv_bn_relu(64, 128), nn.MaxPool2d(2))
        self.res1 = nn.Sequential(*conv_bn_relu(128, 128), *conv_bn_relu(128, 128))
        self.layer2 = nn.Sequential(*conv_bn_relu(128, 256), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(*conv_bn_relu(256, 512), nn.MaxPool2d(2))
        self.res3 = nn.Sequential(*conv_bn_relu(512, 512), *conv_bn_relu(512, 512))
        self.fc = nn.Linear(512, 10, bias=False)

    def forward(self, x):
        x = self.layer1(self.prep(x))
        x = x + self.res1(x)
        x = self.layer3(self.layer2(x))
        x = x + self.res3(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.fc(x) * 0.125


class DetectShapes(nn.Module):
    """CenterNet-style: a stride-4 backbone, then 3 class heatmaps + width, height, offset x, y."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn_relu(3, 16, stride=2), *conv_bn_relu(16, 32), *conv_bn_relu(32, 32, stride=2),
            *conv_bn_relu(32, 64), nn.Conv2d(64, 64, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(64),
            nn.ReLU(), nn.Conv2d(64, 3 + 4, 1),
        )

    def forward(self, x):
        return self.body(x)


HAND_WRITTEN = {
    "digits": Digits,
    "lenet5": LeNet5,
    "resnet_small": ResNetSmall,
    "unet_tiny": UNetTiny,
    "airbench94": Airbench94,
    "resnet9": ResNet9,
    "detect_shapes": DetectShapes,
}
OUTPUT_SHAPES = {
    "digits": (10,),
    "lenet5": (10,),
    "resnet_small": (10,),
    "unet_tiny": (2, 32, 32),
    "airbench94": (10,),
    "resnet9": (10,),
    "detect_shapes": (7, 12, 12),
}
NAMES = sorted(HAND_WRITTEN)


def test_every_example_has_a_hand_written_model():
    assert sorted(p.stem for p in EXAMPLES.glob("*.cnn")) == NAMES


@pytest.fixture(scope="module")
def compiled():
    """Each example compiled once with the reference backend (read-only use: tests that
    change weights or attributes compile their own)."""
    return {name: engine.compile(EXAMPLES / f"{name}.cnn", backend="torch") for name in NAMES}


def _randomise(model: nn.Module, seed: int) -> None:
    """Random weights and batch-norm statistics, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("weight") and t.dim() == 1:  # bn gamma
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                fan_in = t[0].numel() if t.dim() > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g) / fan_in**0.5)


def _load_by_position(hand: nn.Module, ref: nn.Module) -> None:
    keys = list(hand.state_dict().keys())
    values = list(ref.state_dict().values())
    assert len(keys) == len(values)
    hand.load_state_dict(OrderedDict(zip(keys, values)))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_maps_one_to_one(name, compiled):
    ref, hand = compiled[name], HAND_WRITTEN[name]()
    ref_sd, hand_sd = ref.state_dict(), hand.state_dict()
    assert [tuple(t.shape) for t in ref_sd.values()] == [tuple(t.shape) for t in hand_sd.values()]
    assert [k.rsplit(".", 1)[-1] for k in ref_sd] == [k.rsplit(".", 1)[-1] for k in hand_sd]
    assert [tuple(p.shape) for p in ref.parameters()] == [tuple(p.shape) for p in hand.parameters()]
    assert [tuple(b.shape) for b in ref.buffers()] == [tuple(b.shape) for b in hand.buffers()]


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_hand_written(name, compiled):
    spec = load(EXAMPLES / f"{name}.cnn")
    hand = HAND_WRITTEN[name]()
    want = sum(p.numel() for p in hand.parameters())
    assert sum(n.params for n in spec.graph) == want
    assert sum(p.numel() for p in compiled[name].parameters()) == want


def _batch(name: str, n: int = 2) -> torch.Tensor:
    shape = load(EXAMPLES / f"{name}.cnn").graph.input_shape
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", NAMES)
def test_outputs_match_hand_written_eval(name):
    ref, hand = engine.compile(EXAMPLES / f"{name}.cnn", backend="torch"), HAND_WRITTEN[name]()
    _randomise(ref, seed=NAMES.index(name))
    _load_by_position(hand, ref)
    ref.eval(), hand.eval()
    x = _batch(name)
    with torch.no_grad():
        out, want = ref(x), hand(x)
    assert out.shape == (2, *OUTPUT_SHAPES[name])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_outputs_match_hand_written_train(name):
    ref, hand = engine.compile(EXAMPLES / f"{name}.cnn", backend="torch"), HAND_WRITTEN[name]()
    _randomise(ref, seed=10 + NAMES.index(name))
    _load_by_position(hand, ref)
    ref.train(), hand.train()
    # dropout off: both sides drop nothing, batch norm still uses batch statistics
    for m in hand.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for node in ref.graph:
        if node.op == "dropout":
            node.attrs["p"] = 0.0  # attrs is a plain dict, and this compiled model is the test's own
    x = _batch(name, n=2)
    out, want = ref(x), hand(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # the batch-norm running statistics moved the same way
    for (k, a), b in zip(ref.state_dict().items(), hand.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    # and gradients flow to the same parameters (the small nets only, to keep the suite fast)
    if sum(p.numel() for p in hand.parameters()) > 1_000_000:
        return
    out.square().sum().backward()
    want.square().sum().backward()
    for (k, a), b in zip(ref.named_parameters(), hand.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=k)


# ---- `fusenet check` agrees with the hand-written models ------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_check_table_total_equals_hand_written(name, capsys):
    from engine.cli import main

    assert main(["check", str(EXAMPLES / f"{name}.cnn")]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"network {name}: ")
    total = int(last.split(", ")[1].split(" parameters")[0].replace(",", ""))
    assert total == sum(p.numel() for p in HAND_WRITTEN[name]().parameters())
    # the per-layer column adds up to the same total
    rows = [r for r in out.splitlines()[2:-2]]
    column = sum(int(r.split()[-2].replace(",", "")) for r in rows if r.split()[-2] != "-")
    assert column == total


# ---- the reference backend on its own ------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_every_example(name, compiled):
    net = compiled[name]
    net.eval()
    with torch.no_grad():
        out = net(_batch(name, n=3))
    assert tuple(out.shape) == (3, *OUTPUT_SHAPES[name])
    assert net.output_shape == OUTPUT_SHAPES[name]
    assert tuple(net.graph.output.shape) == OUTPUT_SHAPES[name]
    assert torch.isfinite(out).all()


def test_module_attributes(compiled):
    net = compiled["digits"]
    assert net.backend == "torch"
    assert net.name == "digits"
    assert net.input_shape == (1, 8, 8)
    assert net.train_config.epochs == 15 and net.train_config.optimizer.nesterov is True
    assert [n for n, _ in net.named_children()] == ["conv0", "bn0", "conv1", "bn1", "linear0"]


def test_forward_returns_taps(compiled):
    net = compiled["unet_tiny"].eval()
    x = _batch("unet_tiny")
    with torch.no_grad():
        out, taps = net(x, taps=("e1",))
        out2, both = net(x, taps=("e2", "e1"))
        plain = net(x)
    assert list(taps) == ["e1"]
    assert taps["e1"].shape == (2, 16, 32, 32)
    assert list(both) == ["e2", "e1"] and both["e2"].shape == (2, 32, 16, 16)
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(out2, plain)
    # e1 is relu(conv0(x)), computed independently
    torch.testing.assert_close(taps["e1"], F.relu(net.conv0(x)))


def test_tap_layers(compiled):
    assert compiled["unet_tiny"].tap_layers == {"e1": ["conv0"], "e2": ["conv1"]}
    assert compiled["digits"].tap_layers == {}
    net = engine.compile(
        "block b(c) {\n    conv c kernel=1 -> bn\n}\n"
        "network n {\n    input 3x8x8\n    stem = conv 4 kernel=3 pad=1 -> b 4 -> relu\n    pool = maxpool 2\n    head = flatten -> linear 5\n}\n",
        backend="torch",
    )
    assert net.tap_layers == {"stem": ["conv0", "conv1", "bn0"], "pool": [], "head": ["linear0"]}


def test_unknown_tap_in_forward_is_an_error(compiled):
    with pytest.raises(KeyError):
        compiled["unet_tiny"](_batch("unet_tiny"), taps=("nope",))


@pytest.mark.parametrize(
    "shape", [(2, 3, 32, 31), (2, 1, 32, 32), (3, 32, 32), (2, 3, 32, 32, 1)], ids=["width", "channels", "no-batch", "5d"]
)
def test_bad_input_shape_is_a_clear_value_error(shape, compiled):
    with pytest.raises(ValueError, match=r"unet_tiny expects input N x 3x32x32, got " + "x".join(map(str, shape))):
        compiled["unet_tiny"](torch.randn(*shape))


def test_compile_accepts_text_and_path(tmp_path):
    text = (EXAMPLES / "digits.cnn").read_text()
    a = engine.compile(text, backend="torch")
    p = tmp_path / "d.cnn"
    p.write_text(text)
    b = engine.compile(p, backend="torch")
    c = engine.compile(str(p), backend="torch")
    assert [t.shape for t in a.state_dict().values()] == [t.shape for t in b.state_dict().values()] == [
        t.shape for t in c.state_dict().values()
    ]


def test_compile_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        engine.compile(EXAMPLES / "digits.cnn", backend="numpy")


def test_compile_invalid_program_raises_fusenet_error():
    from dsl.errors import FusenetError

    with pytest.raises(FusenetError, match="unknown layer 'cnov'"):
        engine.compile("network n {\n    input 3x8x8\n    cnov 4\n}\n", backend="torch")


OPS_PROGRAM = """
network ops {
    input 4x12x12
    conv 8 kernel=3x1 stride=1x2 pad=1x0 dilation=1 groups=2 bias=false -> bn eps=1e-3 momentum=0.2 -> leaky_relu slope=0.2
    a = sigmoid -> tanh -> gelu -> silu
    avgpool 3 stride=1 pad=1 -> maxpool 2 stride=1
    blurpool -> blurpool stride=1 filter=1 -> upsample 2 mode=bilinear -> upsample 2
    conv 8 kernel=3 pad=same dilation=2 -> avgpool 2
    add a
    concat a
    dropout 0.25 -> scale 0.5 -> softmax -> global_maxpool
    bn -> linear 3 -> softmax
}
"""


def test_every_op_against_functional():
    """Every built-in layer, checked against torch.nn.functional written out by hand."""
    net = engine.compile(OPS_PROGRAM, backend="torch").eval()
    _randomise(net, seed=3)
    x = torch.randn(2, 4, 12, 12)
    with torch.no_grad():
        out = net(x)
        y = F.conv2d(x, net.conv0.weight, None, (1, 2), (1, 0), 1, 2)
        bn0 = net.bn0
        assert (bn0.eps, bn0.momentum) == (1e-3, 0.2)
        y = F.batch_norm(y, bn0.running_mean, bn0.running_var, bn0.weight, bn0.bias, False, 0.0, 1e-3)
        y = F.leaky_relu(y, 0.2)
        a = F.silu(F.gelu(torch.tanh(torch.sigmoid(y))))
        y = F.max_pool2d(F.avg_pool2d(a, 3, 1, 1, count_include_pad=True), 2, 1)
        assert y.shape == (2, 8, 11, 5)
        f = torch.tensor([1.0, 2.0, 1.0]) / 4
        k = (f[:, None] * f[None, :]).expand(8, 1, 3, 3)
        y = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="reflect"), k, stride=2, groups=8)
        assert y.shape == (2, 8, 6, 3)
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        y = F.interpolate(y, scale_factor=2, mode="nearest")
        y = F.conv2d(y, net.conv1.weight, net.conv1.bias, 1, 2, 2)
        y = F.avg_pool2d(y, 2)
        assert y.shape == a.shape
        y = y + a
        y = torch.cat([y, a], dim=1)
        y = torch.softmax(y * 0.5, dim=1)
        y = F.adaptive_max_pool2d(y, 1).flatten(1)
        bn1 = net.bn1
        assert isinstance(bn1, nn.BatchNorm1d)
        y = F.batch_norm(y, bn1.running_mean, bn1.running_var, bn1.weight, bn1.bias, False, 0.0, 1e-5)
        y = torch.softmax(F.linear(y, net.linear0.weight, net.linear0.bias), dim=1)
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-6)
    assert net.conv0.weight.shape == (8, 2, 3, 1) and net.conv0.bias is None


def test_dropout_active_only_in_train_mode():
    net = engine.compile("network d {\n    input 4x4x4\n    dropout 0.5\n}\n", backend="torch")
    x = torch.ones(4, 4, 4, 4)
    torch.testing.assert_close(net.eval()(x), x)
    y = net.train()(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0} and (y == 0).any()
