"""Shape inference: output sizes, parameter counts and FLOPs, checked against
PyTorch's own layers where PyTorch has one."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsl.errors import FusenetError
from engine.ir.frontend import load


def graph(body: str, input: str = "3x16x16"):
    text = f"network n {{\n    input {input}\n" + "".join(f"    {line}\n" for line in body.splitlines()) + "}\n"
    return load(text).graph


def out_shape(body: str, input: str = "3x16x16"):
    return graph(body, input).output.shape


@pytest.mark.parametrize(
    "kw,torch_kw",
    [
        ("kernel=3", dict(kernel_size=3)),
        ("kernel=3 pad=1", dict(kernel_size=3, padding=1)),
        ("kernel=3 stride=2", dict(kernel_size=3, stride=2)),
        ("kernel=3 stride=2 pad=1", dict(kernel_size=3, stride=2, padding=1)),
        ("kernel=4 stride=3 pad=2", dict(kernel_size=4, stride=3, padding=2)),
        ("kernel=3 dilation=2", dict(kernel_size=3, dilation=2)),
        ("kernel=3 dilation=3 pad=2 stride=2", dict(kernel_size=3, dilation=3, padding=2, stride=2)),
        ("kernel=1x7 pad=0x3", dict(kernel_size=(1, 7), padding=(0, 3))),
        ("kernel=5x3 stride=2x1 pad=2x0 dilation=1x2", dict(kernel_size=(5, 3), stride=(2, 1), padding=(2, 0), dilation=(1, 2))),
        ("kernel=13", dict(kernel_size=13)),
        ("kernel=3 pad=same", dict(kernel_size=3, padding="same")),
        ("kernel=5 pad=same dilation=2", dict(kernel_size=5, padding="same", dilation=2)),
        ("kernel=1x5 pad=same", dict(kernel_size=(1, 5), padding="same")),
    ],
)
def test_conv_output_size_matches_torch(kw, torch_kw):
    g = graph(f"conv 8 {kw}", "3x16x13")
    ref = nn.Conv2d(3, 8, **torch_kw)
    want = ref(torch.zeros(1, 3, 16, 13)).shape[1:]
    assert g.output.shape == tuple(want)
    assert g.output.params == sum(p.numel() for p in ref.parameters())


def test_pad_same_is_resolved_to_numbers():
    node = graph("conv 4 kernel=5x3 pad=same dilation=2").output
    assert node.attrs["pad"] == (4, 2)


@pytest.mark.parametrize(
    "layer,fn",
    [
        ("maxpool 2", lambda x: F.max_pool2d(x, 2)),
        ("maxpool 3", lambda x: F.max_pool2d(x, 3)),
        ("maxpool 3 stride=2 pad=1", lambda x: F.max_pool2d(x, 3, 2, 1)),
        ("maxpool 2x3", lambda x: F.max_pool2d(x, (2, 3))),
        ("avgpool 2", lambda x: F.avg_pool2d(x, 2)),
        ("avgpool 3 stride=1 pad=1", lambda x: F.avg_pool2d(x, 3, 1, 1)),
        ("avgpool 5 stride=2", lambda x: F.avg_pool2d(x, 5, 2)),
    ],
)
def test_pool_output_size_matches_torch(layer, fn):
    assert out_shape(layer, "3x17x16") == tuple(fn(torch.zeros(1, 3, 17, 16)).shape[1:])


def test_pool_stride_defaults_to_kernel():
    node = graph("maxpool 3").output
    assert node.attrs["stride"] == (3, 3) and node.shape == (3, 5, 5)
    node = graph("avgpool 2x4").output
    assert node.attrs["stride"] == (2, 4) and node.shape == (3, 8, 4)
    assert graph("maxpool 3 stride=1").output.attrs["stride"] == (1, 1)


@pytest.mark.parametrize(
    "layer,hw,want",
    [("blurpool", (16, 16), (8, 8)), ("blurpool", (15, 9), (8, 5)), ("blurpool stride=1", (7, 6), (7, 6)),
     ("blurpool stride=3 filter=5", (16, 16), (6, 6)), ("blurpool filter=4", (8, 8), (4, 4)), ("blurpool filter=1", (5, 5), (3, 3))],
)
def test_blurpool_size(layer, hw, want):
    from engine.ir.ops import blurpool_reference

    assert out_shape(layer, f"3x{hw[0]}x{hw[1]}") == (3, *want)
    node = graph(layer, f"3x{hw[0]}x{hw[1]}").output
    ref = blurpool_reference(torch, torch.zeros(1, 3, *hw), node.attrs["stride"], node.attrs["filter"])
    assert tuple(ref.shape[1:]) == (3, *want)


def test_blurpool_filter_larger_than_input_is_rejected():
    with pytest.raises(FusenetError, match="needs reflect padding of 2"):
        graph("blurpool filter=5", "3x2x2")


@pytest.mark.parametrize("layer,want", [("upsample 2", (3, 10, 14)), ("upsample 3 mode=bilinear", (3, 15, 21)), ("upsample 1", (3, 5, 7))])
def test_upsample(layer, want):
    assert out_shape(layer, "3x5x7") == want


def test_concat_puts_current_channels_first():
    g = graph("a = conv 5 kernel=1\nconv 7 kernel=3 pad=1\nconcat a")
    assert g.output.shape == (12, 16, 16)
    assert g.output.inputs == (2, 1)  # (current tensor, the tap)


def test_add_keeps_shape_and_residual():
    g = graph("a = conv 3 kernel=1\nrelu\nadd a\nresidual {\n    conv 3 kernel=3 pad=1\n}")
    assert [n.shape for n in g.nodes[-2:]] == [(3, 16, 16), (3, 16, 16)]
    assert g.output.attrs == {"merge": "residual"}


def test_flatten_and_global_pools():
    assert out_shape("conv 4 kernel=3 -> flatten") == (4 * 14 * 14,)
    assert out_shape("global_avgpool") == (3,)
    assert out_shape("global_maxpool") == (3,)
    assert out_shape("global_avgpool -> linear 7 -> bn -> relu") == (7,)
    assert out_shape("flatten -> flatten") == (3 * 16 * 16,)


def test_shape_preserving_layers():
    for layer in ["relu", "leaky_relu slope=0.2", "sigmoid", "tanh", "gelu", "silu", "softmax", "dropout 0.3", "scale 2.5", "bn"]:
        assert out_shape(layer, "3x5x7") == (3, 5, 7), layer


def test_conv_params_and_flops():
    node = graph("conv 8 kernel=3 pad=1", "4x10x10").output
    k = 4 * 3 * 3
    assert node.params == 8 * k + 8
    assert node.flops == 2 * 8 * 10 * 10 * k
    node = graph("conv 8 kernel=3x1 stride=2 groups=4 bias=false", "4x10x10").output
    assert node.shape == (8, 4, 5)
    assert node.params == 8 * 1 * 3 * 1
    assert node.flops == 2 * 8 * 4 * 5 * (1 * 3 * 1)


def test_linear_params_and_flops():
    node = graph("flatten -> linear 10", "2x3x4").output
    assert node.shape == (10,)
    assert node.params == 24 * 10 + 10
    assert node.flops == 2 * 24 * 10
    node = graph("flatten -> linear 10 bias=false", "2x3x4").output
    assert node.params == 240


def test_bn_and_elementwise_costs():
    g = graph("bn -> relu -> maxpool 2", "4x6x6")
    bn, relu, pool = g.nodes[1:]
    assert (bn.params, bn.flops) == (8, 2 * 144)
    assert (relu.params, relu.flops) == (0, 144)
    assert (pool.shape, pool.flops) == ((4, 3, 3), 36 * 4)


def test_parameter_owner_names_and_order():
    g = graph("conv 4 kernel=1 -> bn -> relu\nconv 4 kernel=1 -> bn\nglobal_avgpool -> linear 3 -> linear 2")
    assert [n.name for n in g if n.name] == ["conv0", "bn0", "conv1", "bn1", "linear0", "linear1"]


def test_repeat_and_blocks_unroll():
    text = (
        "block b(c, s=1) {\n    conv c*2 kernel=3 stride=s pad=1 -> bn\n}\n"
        "network n {\n    input 3x32x32\n    repeat 3 {\n        b 4 s=2\n    }\n    repeat 0 {\n        b 99\n    }\n}\n"
    )
    g = load(text).graph
    assert g.output.shape == (8, 4, 4)
    assert [n.op for n in g] == ["input"] + ["conv", "bn"] * 3


def test_block_default_may_use_earlier_parameter():
    text = "block b(c, d=c*2+1) {\n    conv d kernel=1\n}\nnetwork n {\n    input 3x4x4\n    b 3\n    b 1 d=(10 - 4) // 2 % 5\n}\n"
    g = load(text).graph
    assert [n.shape[0] for n in g.nodes[1:]] == [7, 3]


def test_shape_error_formula_has_the_numbers():
    with pytest.raises(FusenetError) as info:
        graph("conv 4 kernel=5 stride=2 pad=1 dilation=2", "3x6x30")
    msg = info.value.diagnostics[0].message
    assert "conv shrinks height to 0" in msg
    assert "= (6 + 2*1 - 2*(5-1) - 1)/2 + 1 = 0" in msg


def shape_error(body: str, input: str):
    with pytest.raises(FusenetError) as info:
        graph(body, input)
    (d,) = info.value.diagnostics
    return d


def test_shape_error_names_the_width_when_only_the_width_fails():
    # non-square everything: the formula must carry the width's numbers, not the height's
    d = shape_error("conv 4 kernel=3x5 stride=2x1 pad=1x0", "3x9x4")
    assert d.message == "conv shrinks width to 0: (W + 2*pad - dilation*(k-1) - 1)/stride + 1 = (4 + 2*0 - 1*(5-1) - 1)/1 + 1 = 0"
    assert d.hint == "the input width is 4; use a smaller kernel or stride, more padding, or remove a downsampling layer"
    d = shape_error("maxpool 2", "3x8x1")
    assert d.message == "maxpool shrinks width to 0: (W + 2*pad - dilation*(k-1) - 1)/stride + 1 = (1 + 2*0 - 1*(2-1) - 1)/2 + 1 = 0"


def test_shape_error_names_the_height_first_when_both_fail():
    d = shape_error("conv 4 kernel=4x5", "3x2x3")
    assert d.message == "conv shrinks height to -1: (H + 2*pad - dilation*(k-1) - 1)/stride + 1 = (2 + 2*0 - 1*(4-1) - 1)/1 + 1 = -1"
    assert d.hint.startswith("the input height is 2;")


# ---- 1-D inputs: `input F` is a vector of F features --------------------------------------------


def test_feature_input_shapes():
    g = graph("linear 32 -> bn -> relu\ndropout 0.1\ne = linear 16 -> gelu -> scale -0.5\nadd e\nflatten -> linear 3 -> softmax", "20")
    assert g.input_shape == (20,)
    assert [n.shape for n in g] == [(20,), (32,), (32,), (32,), (32,), (16,), (16,), (16,), (16,), (16,), (3,), (3,)]
    assert [n.params for n in g if n.params] == [20 * 32 + 32, 2 * 32, 32 * 16 + 16, 16 * 3 + 3]


def test_image_layer_on_feature_input_says_why():
    with pytest.raises(FusenetError) as info:
        graph("conv 4 kernel=3", "20")
    (d,) = info.value.diagnostics
    assert d.message == "'conv' needs a CxHxW image, but its input has shape 20"
    assert "`input F` features" in d.hint


FEATURE_NET = """network mlp {
    input 20
    linear 32 -> bn -> relu
    e = linear 16 -> tanh
    linear 16 -> leaky_relu slope=0.2 -> scale -0.5
    add e
    dropout 0.0
    linear 5 -> softmax
}
"""


def test_feature_network_runs_forward_and_backward_on_both_backends():
    import engine
    from helpers import check_network_against_reference

    ref = engine.compile(FEATURE_NET, backend="torch").double()
    tri = engine.compile(FEATURE_NET)  # the Triton kernels (interpreted without a GPU)
    tri.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(2))
    for mode in (True, False):
        ref.train(mode)
        tri.train(mode)
        for p in list(ref.parameters()) + list(tri.parameters()):
            p.grad = None
        check_network_against_reference(tri, ref, x, grad_floor=1e-2)
