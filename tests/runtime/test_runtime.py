"""Every example network on the Triton backend against the PyTorch reference:
outputs, the input gradient and every parameter gradient, in train and eval
mode, plus proof that the forward pass dispatches no PyTorch arithmetic."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

import engine
from engine.ir.ops import Family
from engine.kernels.activations import ACTIVATIONS
from helpers import DATA_MOVEMENT_OPS, OpRecorder, assert_close, check_network_against_reference

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# (example, batch): the wide networks run at batch 1 to keep the interpreter quick.
CASES = [("digits", 3), ("lenet5", 2), ("unet_tiny", 2), ("resnet_small", 2), ("airbench94", 1), ("resnet9", 1),
         ("detect_shapes", 1)]
SLOW = {"airbench94", "resnet9"}
NET = "network_fp32"  # tolerance for whole fp32 networks (tests/helpers.py)


def _pair(name: str, precision: str = "fp32"):
    # Dropout masks come from different RNGs in the two backends; the dropout
    # kernel has its own tests, so whole-network comparisons switch it off.
    text = re.sub(r"dropout [0-9.]+", "dropout 0.0", (EXAMPLES / f"{name}.cnn").read_text())
    ref = engine.compile(text, backend="torch").double()
    tri = engine.compile(text, backend="triton", precision=precision)
    gen = torch.Generator().manual_seed(1)
    for m in ref.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.weight.data = torch.rand(m.weight.shape, generator=gen, dtype=torch.float64) + 0.5
            m.bias.data = torch.rand(m.bias.shape, generator=gen, dtype=torch.float64) - 0.5
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    tri.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    return ref, tri


# The wide networks run in train mode only (forward and backward through every
# kernel family they use); the eval path is the same kernels with BN folded.
@pytest.mark.parametrize(
    "name,batch,mode",
    [(n, b, m) for n, b in CASES for m in ("train", "eval") if n not in SLOW or m == "train"],
)
def test_example_matches_reference(name, batch, mode):
    ref, tri = _pair(name)
    ref.train(mode == "train")
    tri.train(mode == "train")
    x = torch.randn(batch, *tri.input_shape, generator=torch.Generator().manual_seed(2))
    # judged against the network's gradient scale: a conv bias before
    # training-mode batch norm has a gradient that is zero up to rounding
    check_network_against_reference(tri, ref, x, NET, grad_floor=1e-2)
    for (key, br), (_, bt) in zip(ref.named_buffers(), tri.named_buffers()):
        if br.is_floating_point():
            assert_close(bt, br, NET, what=f"buffer {key}")
        else:
            assert torch.equal(bt, br), key
    with torch.no_grad():  # inference path: batch norm folded into the conv epilogue
        assert_close(tri(x), ref(x.double()), NET, what=f"{name} {mode} no-grad output")


# aten ops that move or allocate memory but compute nothing, plus what the
# NCHW<->NHWC conversions and flatten at the module boundary use
DATA_MOVEMENT = DATA_MOVEMENT_OPS | {
    "_reshape_alias", "contiguous", "flatten", "full", "lift_fresh_copy", "new_empty_strided", "new_zeros",
    "resize_", "select", "split", "squeeze", "to", "transpose", "unsqueeze", "zeros_like",
}


def arithmetic_ops(ops: set[str]) -> set[str]:
    return {op for op in ops if op.rstrip("_") not in DATA_MOVEMENT and op not in DATA_MOVEMENT}


@pytest.mark.parametrize("name", ["digits", "unet_tiny", "resnet_small"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_dispatches_no_torch_arithmetic(name, mode):
    _, tri = _pair(name)
    tri.train(mode == "train")
    x = torch.randn(2, *tri.input_shape)
    with OpRecorder() as rec:
        tri(x)
    assert rec.ops, "the recorder saw nothing"
    assert arithmetic_ops(rec.ops) == set(), f"PyTorch computed something: {sorted(arithmetic_ops(rec.ops))}"


def test_recorder_catches_arithmetic():
    with OpRecorder() as rec:
        torch.ones(3) * 2
    assert "mul" in arithmetic_ops(rec.ops)


def test_fusion_plan_fuses_epilogues():
    tri = engine.compile(EXAMPLES / "resnet_small.cnn")
    plan = tri.kernel_plan(fold_bn=True)
    families = [g.family for g in plan]
    assert Family.BATCH_NORM not in families, "eval batch norm should fold into the conv epilogue"
    assert any(g.epilogue.residual is not None for g in plan), "residual add should fuse into a conv epilogue"
    assert len(plan) < len(plan.graph.nodes) - 1


STATS_NET = """
network conv_stats {
    input 3x9x7
    conv 8 kernel=3 pad=1 -> bn -> relu
    t = conv 6 kernel=3 stride=2 bias=false -> bn
    conv 6 kernel=1 -> bn -> add t -> relu
    global_avgpool
    linear 4
}
"""


def _bn_statistics_come_from(spec: str, family, kernel: str, x: torch.Tensor, producers: int,
                             finished: bool = False) -> None:
    """In training each `family` group of `spec` that feeds a bn emits the bn's partial sums (the
    STATS variant of `kernel`), no bn statistics pass runs, and the network matches the fp64
    reference: output, every gradient, the running statistics. `finished`: the producer's kernel
    also finishes them (FINALIZE: its last programs fold the sums, update the running statistics),
    so no bn finalize kernel runs either."""
    from engine.kernels.launch import recording

    tri = engine.compile(spec)
    ref = engine.compile(spec, backend="torch").double()
    ref.load_state_dict(tri.state_dict())
    plan = tri.kernel_plan()
    groups = [g for g in plan if g.family is family]
    assert len(groups) == producers and all(plan.graph.node(g.epilogue.stats).op == "bn" for g in groups)
    assert not any(g.epilogue.stats is not None for g in tri.kernel_plan(fold_bn=True))  # inference: bn folded
    tri.train()
    ref.train()
    with recording() as specs:
        check_network_against_reference(tri, ref, x, grad_floor=1e-2)
    for (key, ours), (_, theirs) in zip(tri.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-5, atol=1e-6, msg=key)
    names = {s.name for s in specs}
    assert "_bn_stats_kernel" not in names and ("_bn_finalize_kernel" in names) != finished
    assert sum(bool(dict(s.constexprs).get("STATS")) for s in specs if s.name == kernel) == producers
    assert sum(bool(dict(s.constexprs).get("FINALIZE")) for s in specs if s.name == kernel) == producers * finished


def test_training_bn_takes_its_statistics_from_the_conv_epilogue():
    """In training, each conv that feeds only a bn emits the bn's per-channel
    partial sums, so no bn statistics pass runs; the network still matches the
    reference (output, every gradient, running statistics)."""
    _bn_statistics_come_from(STATS_NET, Family.CONV, "_conv_fwd_kernel", torch.randn(5, 3, 9, 7), 3, finished=True)


POOL_STATS_NET = """
network pool_stats {
    input 3x13x15
    conv 5 kernel=3 pad=1 bias=false -> maxpool 3 stride=2 pad=1 -> bn -> relu
    conv 7 kernel=3 pad=1 -> relu -> maxpool 2 -> bn
    conv 3 kernel=1 -> maxpool 2x3 stride=1 -> bn momentum=0.3 -> gelu
    global_avgpool
    linear 4
}
"""


def test_training_bn_takes_its_statistics_from_the_max_pool():
    """conv -> maxpool -> bn -> act: in training each max pool emits the bn's partial sums,
    no bn statistics pass runs, and the network matches the reference (output, every
    gradient, the running statistics)."""
    _bn_statistics_come_from(POOL_STATS_NET, Family.POOL, "_max_pool_fwd_kernel", torch.randn(6, 3, 13, 15), 3)


# conv(+bias) -> maxpool K (stride K, no pad) -> bn: the conv runs the pool in its epilogue
# (odd sizes: the floor-mode pools drop a row and a column)
CONV_POOL_NET = """
network conv_pool_stats {
    input 3x13x15
    conv 5 kernel=3 pad=1 bias=false -> maxpool 2 -> bn -> relu
    conv 7 kernel=3 pad=1 -> maxpool 2 -> bn
    global_avgpool
    linear 4
}
"""


def test_training_bn_takes_its_statistics_from_a_conv_with_a_fused_pool():
    """conv -> maxpool 2 -> bn in training: the conv fuses the pool (no pool kernel forward; in the
    backward the bn's apply kernel writes the conv's full-resolution gradient through the argmax,
    engine.kernels.batchnorm.backward), emits the pooled output's partial sums for the bn, and the
    network matches the reference (output, every gradient, the running statistics)."""
    from engine.kernels.launch import recording

    tri = engine.compile(CONV_POOL_NET)
    assert all(g.epilogue.pool is not None for g in tri.kernel_plan() if g.family is Family.CONV)
    _bn_statistics_come_from(CONV_POOL_NET, Family.CONV, "_conv_fwd_kernel", torch.randn(3, 3, 13, 15), 2,
                             finished=True)
    with recording() as specs:
        tri.train()
        tri(torch.randn(2, 3, 13, 15)).sum().backward()
    names = [s.name for s in specs]
    assert "_max_pool_fwd_kernel" not in names and "_max_pool_bwd_kernel" not in names, names
    assert all(g.epilogue.pool_grad_by is not None for g in tri.kernel_plan() if g.family is Family.CONV)


def test_max_pool_statistics_in_bf16_match_the_statistics_pass(monkeypatch):
    """bf16: the same network with and without the pool's statistics (the bn's own pass),
    same weights: outputs, gradients and running statistics agree to bf16 rounding (a bf16
    network against the fp64 reference would route some max-pool gradients elsewhere on
    ties that bf16 rounding makes)."""
    from engine.passes import pipeline

    fused = engine.compile(POOL_STATS_NET, precision="bf16")
    with monkeypatch.context() as m:
        m.setattr(pipeline, "PLAN_PASSES", tuple(p for p in pipeline.PLAN_PASSES if p[0] != "plan_bn_stats"))
        plain = engine.compile(POOL_STATS_NET, precision="bf16")
    assert not any(g.epilogue.stats is not None for g in plain.kernel_plan())
    plain.load_state_dict(fused.state_dict())
    fused.train()
    plain.train()
    x = torch.randn(6, 3, 13, 15)
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    outs, grads = [], []
    for net in (fused, plain):
        xi = x.clone().requires_grad_()
        y = net(xi)
        y.backward(g.to(y.dtype))
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    assert_close(outs[0], outs[1], torch.bfloat16, what="output")
    for k, (a, b) in enumerate(zip(*grads)):
        assert_close(a, b, torch.bfloat16, what=f"gradient {k}")
    for (key, a), (_, b) in zip(fused.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-4, msg=key)


DROPOUT_NET = """
network fused_dropout {
    input 3x9x7
    conv 8 kernel=3 pad=1 -> relu -> dropout 0.3
    conv 8 kernel=3 pad=1 groups=8 -> dropout 0.2
    global_avgpool -> dropout 0.1
    linear 20 -> gelu -> dropout 0.25
    linear 5
}
"""


def test_fused_dropout_matches_reference_with_the_same_masks(monkeypatch):
    """Dropout in conv/linear epilogues and as its own kernel, against the
    reference given the same masks: seeds drawn from torch's generator in
    graph order, masks read off fusenet's dropout kernel."""
    from engine.kernels.dropout import dropout_forward

    tri = engine.compile(DROPOUT_NET)
    ref = engine.compile(DROPOUT_NET, backend="torch").double()
    ref.load_state_dict(tri.state_dict())
    plan = tri.kernel_plan()
    gemms = [g for g in plan if g.family in (Family.CONV, Family.LINEAR)]
    assert all(g.epilogue.dropout is not None for g in gemms[:3])

    def same_mask_dropout(v, p, training):
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        nhwc = (v.shape[0], *v.shape[2:], v.shape[1]) if v.dim() == 4 else tuple(v.shape)
        keep = dropout_forward(torch.ones(nhwc), p, seed).double()
        return v * (keep.permute(0, 3, 1, 2) if v.dim() == 4 else keep)

    monkeypatch.setattr(torch.nn.functional, "dropout", same_mask_dropout)
    check_network_against_reference(tri, ref, torch.randn(4, 3, 9, 7), NET, seed=11)


FP16_CASES = [(name, mode) for name in ("digits", "lenet5", "resnet_small", "unet_tiny") for mode in ("train", "eval")]


@pytest.mark.parametrize("name,mode", FP16_CASES)
def test_fp16_network_matches_reference(name, mode):
    """fp16 activations, fp32 accumulation and master weights. Outputs are held to
    the fp16 tolerance elementwise. Gradients are compared norm-wise against the
    fp64 reference. fp16 itself costs accuracy here: without loss scaling small
    gradients fall into the subnormal range, and at batch 2 training-mode batch
    norm amplifies rounding through depth. PyTorch running the same network in
    fp16 (measured on resnet_small: up to ~12% in norm on BN parameters) is run
    alongside, and each gradient must be within 8% or within 1.5x PyTorch's own
    fp16 error, so the bound follows what the precision allows, not a guess."""
    ref, tri = _pair(name, "fp16")
    assert tri.dtype == torch.float16
    half = copy.deepcopy(ref).half()  # PyTorch in fp16, same weights and BN buffers
    for net in (ref, tri, half):
        net.train(mode == "train")
    x = torch.randn(2, *tri.input_shape, generator=torch.Generator().manual_seed(2))
    xr, xt, xh = x.double().requires_grad_(), x.clone().requires_grad_(), x.half().requires_grad_()
    yr, yt, yh = ref(xr), tri(xt), half(xh)
    assert_close(yt, yr, torch.float16, what=f"{name} fp16 {mode} output")
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    yr.backward(g)
    yt.backward(g.float())
    yh.backward(g.half())

    def rel(ours, theirs, floor=0.0):
        return float((ours.double() - theirs).norm() / max(float(theirs.norm()), floor, 1e-30))

    def bound(torch_half_err: float) -> float:
        return max(0.08, 1.5 * torch_half_err)

    assert rel(xt.grad, xr.grad) < bound(rel(xh.grad, xr.grad))
    top = max(float(p.grad.norm()) for p in ref.parameters())
    for (key, pr), (_, pt), (_, ph) in zip(ref.named_parameters(), tri.named_parameters(), half.named_parameters()):
        ours, pytorch = rel(pt.grad, pr.grad, 1e-2 * top), rel(ph.grad, pr.grad, 1e-2 * top)
        assert ours < bound(pytorch), f"{key}: {ours:.3f} off in norm; PyTorch in fp16: {pytorch:.3f}"


def test_concat_producer_writes_in_place(monkeypatch):
    """unet_tiny's `concat e2`: the conv before it writes into its channel slice
    of the concat buffer; only the tap e2 (read by a maxpool too) is copied in."""
    from engine.kernels import concat

    tri = engine.compile(EXAMPLES / "unet_tiny.cnn")
    plan = tri.kernel_plan()
    writers = [g for g in plan if g.writes_into is not None]
    assert len(writers) == 1 and writers[0].family is Family.CONV
    copies = []
    real_copy = concat.copy_into
    monkeypatch.setattr(concat, "copy_into", lambda dst, src: copies.append(src.shape) or real_copy(dst, src))
    x = torch.randn(1, *tri.input_shape, requires_grad=True)
    tri(x).sum().backward()
    assert copies == [torch.Size([1, 16, 16, 32])], copies  # e2 only


CHAIN_NET = """
network chain {
    input 3x6x5
    conv 8 kernel=3 pad=1
    tanh -> scale 0.5 -> leaky_relu slope=0.2 -> sigmoid -> gelu
    flatten
    linear 4 -> scale 2.0 -> silu
}
"""


def test_pointwise_chains_fuse_and_match_reference():
    from engine.kernels import pointwise
    from engine.passes import fusion

    assert fusion.CHAIN_MAX == pointwise.CHAIN_MAX  # the pass plans what the kernel can run
    tri = engine.compile(CHAIN_NET)
    ref = engine.compile(CHAIN_NET, backend="torch").double()
    ref.load_state_dict(tri.state_dict())
    plan = tri.kernel_plan()
    chains = [[plan.graph.node(i).op for i in g.nodes] for g in plan if g.family is Family.POINTWISE]
    assert chains == [["scale", "leaky_relu", "sigmoid", "gelu"], ["scale", "silu"]]
    check_network_against_reference(tri, ref, torch.randn(3, 3, 6, 5), NET)


def test_known_bad_interpreter_pairing_is_named_with_its_fix():
    from engine.device import interpreter_incompatibility

    msg = interpreter_incompatibility("3.6.0", "2.4.0")
    assert "Triton 3.6.0" in msg and "numpy<2.4" in msg
    assert interpreter_incompatibility("3.6.0", "2.3.5") is None
    assert interpreter_incompatibility("3.7.0", "2.4.6") is None
    assert interpreter_incompatibility("3.10.0+git1234", "2.4.0rc1") is None


ACTIVATION_NET = """
network act_{act} {{
    input 3x7x6
    conv 6 kernel=3 pad=1 -> {act}
    conv 6 kernel=3 pad=1 -> bn -> {act}
    t = maxpool 2
    {act} -> add t -> {act}
    flatten
    linear 5 -> {act}
    scale 0.5 -> {act}
}}
"""


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_activation_in_every_fusion_site_matches_the_reference(act, mode):
    """Each activation of the table in a conv epilogue, after a batch norm, alone,
    after an add, in a linear epilogue and in a pointwise chain, on both
    backends: output and every gradient (a new activation joins by itself)."""
    src = ACTIVATION_NET.format(act=act)
    tri, ref = engine.compile(src), engine.compile(src, backend="torch").double()
    ref.load_state_dict(tri.state_dict())
    tri.train(mode == "train")
    ref.train(mode == "train")
    check_network_against_reference(tri, ref, torch.randn(3, 3, 7, 6), NET, grad_floor=1e-2)
