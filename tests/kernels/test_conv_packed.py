"""Convolutions under the fused optimizer: forward, dgrad and depthwise kernels read the
optimizer's packed weight copies (no per-call repack or cast), the wgrad writes dW and
dbias straight into the parameters' slots of the flat gradient buffer in PyTorch's
layout, and the padded RGB stem reads the plain permuted copy with its padded channel
rows masked (W_PAD). Checked against F.conv2d / autograd in fp64, interpreted (fp32,
fp16; the bf16 variants compile in tests/engine/test_aot.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import engine.device
import engine.kernels.conv.weights as conv_weights
from engine.kernels import autotune, optim
from engine.kernels.conv import conv2d, conv2d_forward
from engine.kernels.launch import recording
from engine.kernels.params import packed, request_packed
from engine.kernels.tune_config import Config


def nhwc(t):
    return t.permute(0, 2, 3, 1).contiguous()


def nchw(t):
    return t.permute(0, 3, 1, 2)


def _optimized(cout, cin_g, k, dtype, *, bias=True, dgrad=True, lr=0.1):
    """(w, b, opt): conv parameters with the packed copies the runtime asks for, and a fused SGD."""
    w = torch.nn.Parameter(torch.randn(cout, cin_g, k, k) / (cin_g * k * k) ** 0.5)
    b = torch.nn.Parameter(torch.randn(cout)) if bias else None
    request_packed(w, conv_weights.forward_packing(dtype))
    if dgrad:
        request_packed(w, conv_weights.dgrad_packing(dtype))
    return w, b, optim.SGD([p for p in (w, b) if p is not None], lr=lr, momentum=0.9)


class _Repacks:
    """Counts the per-call packs (the fallback): none may run while the optimizer keeps copies."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in ("pack_weight_for_forward", "pack_weight_for_dgrad", "pack_weight_depthwise"):
            orig = getattr(conv_weights, name)

            def spy(*a, _orig=orig, _name=name):
                self.calls.append(_name)
                return _orig(*a)

            monkeypatch.setattr(conv_weights, name, spy)


def _reference(x, w, b, dy, **kw):
    """(y, dx, dw, db) of F.conv2d in fp64, NHWC x/dy, with w as the kernels read it."""
    xd = nchw(x).double().requires_grad_()
    wd = w.double().requires_grad_()
    bd = b.detach().double().requires_grad_() if b is not None else None
    y = F.conv2d(xd, wd, bd, **kw)
    y.backward(nchw(dy).double())
    return nhwc(y.detach()), nhwc(xd.grad), wd.grad, (bd.grad if b is not None else None)


# (N, H, W, Cin, Cout, k, stride, padding, groups): awkward sizes, groups, depthwise, stride 2,
# input channels padded for 16-byte rows (3 -> 4/8, 10 -> 12, 13 -> 16, 18 -> 24)
CASES = {
    "plain": (2, 7, 9, 16, 24, 3, 1, 1, 1),
    "stride2_odd": (2, 9, 8, 12, 20, 3, 2, 1, 1),
    "groups": (2, 6, 7, 12, 18, 3, 1, 1, 3),
    "depthwise": (2, 7, 6, 8, 16, 3, 2, 1, 8),
    "stem_rgb": (2, 9, 10, 3, 24, 3, 1, 1, 1),
    "stem_2x2_s2": (2, 8, 9, 3, 16, 2, 2, 0, 1),
    "padded_10": (2, 6, 7, 10, 16, 3, 1, 1, 1),
    "padded_18": (2, 5, 6, 18, 8, 3, 2, 1, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES)
def test_conv_reads_the_packed_copies_and_writes_the_flat_slots(case, dtype, monkeypatch):
    n, h, wd, cin, cout, k, stride, pad, groups = CASES[case]
    depthwise = groups > 1 and cin == groups
    w, b, opt = _optimized(cout, cin // groups, k, dtype, dgrad=not depthwise)
    fg = opt._flat[0]
    x = torch.randn(n, h, wd, cin).to(dtype).requires_grad_()
    repacks = _Repacks(monkeypatch)
    for it in range(2):
        opt.zero_grad()
        wk = w.detach().to(dtype)  # what the kernels read: the packed copy's values
        with recording() as specs:
            y = conv2d(x, w, b, stride=stride, padding=pad, groups=groups)
            dy = torch.randn(y.shape).to(dtype)
            x.grad = None
            y.backward(dy)
        assert not repacks.calls, f"packed per call: {repacks.calls}"
        kernels = {s.name for s in specs}
        assert ({"_dwconv_fwd_kernel", "_dwconv_dgrad_kernel"} if depthwise else
                {"_conv_fwd_kernel", "_conv_dgrad_kernel"}) <= kernels
        w_args = {dict(s.signature).get("w_op", dict(s.signature).get("w_ptr")) for s in specs
                  if s.name in ("_conv_fwd_kernel", "_dwconv_fwd_kernel")}
        assert w_args == {"*fp32" if dtype == torch.float32 else "*fp16"}, w_args
        # the gradients are the flat buffer's slots, in PyTorch's layout
        assert w.grad.data_ptr() == fg.flat_grad.data_ptr() and w.grad.shape == w.shape and w.grad.is_contiguous()
        assert b.grad.data_ptr() == fg.flat_grad.data_ptr() + 4 * w.numel()
        ry, rdx, rdw, rdb = _reference(x.detach().float(), wk.float(), b, dy.float(), stride=stride, padding=pad,
                                       groups=groups)
        what = f"{case} {dtype} step {it}"
        assert_close(y, ry, dtype, what=f"{what}: y")
        assert_close(x.grad, rdx, dtype, what=f"{what}: dx")
        assert_close(w.grad, rdw, dtype, what=f"{what}: dw")
        assert_close(b.grad, rdb, dtype, what=f"{what}: db")
        opt.step()


@pytest.mark.parametrize("cin,block_k,tpc", [(3, 32, 8), (3, 16, 4), (10, 16, 1), (13, 16, 1), (10, 8, 1)])
def test_padded_input_channels_meet_masked_weight_rows(cin, block_k, tpc):
    """W_PAD: x stores Cs > Cin channels (zeros), the weight is the plain [KH*KW*Cin, Cout] copy:
    taps per chunk (TPC > 1, lane offsets) and chunks of one tap, a partial last chunk included."""
    w, b, opt = _optimized(20, cin, 3, torch.float32, dgrad=False)
    x = torch.randn(2, 7, 6, cin)
    with autotune.forced(Config(32, 32, block_k), kernels=["conv2d_fwd"]), recording() as specs:
        y = conv2d_forward(x, w, b, padding=1).y
    (fwd,) = [s for s in specs if s.name == "_conv_fwd_kernel"]
    c = dict(fwd.constexprs)
    assert c["W_PAD"] and c["TPC"] == tpc, c
    assert packed(w, conv_weights.forward_packing(torch.float32)).shape == (3, 3, cin, 20)
    assert_close(y, _reference(x, w.detach(), b, torch.zeros(2, 7, 6, 20), padding=1)[0], what=f"Cin {cin}")


@pytest.mark.parametrize("cin,tma", [(10, True), (3, False)])
def test_padded_channels_through_tma(cin, tma, monkeypatch):
    """TMA reads whole B rows: with padded channels and one tap per chunk it serves (the next
    tap's rows meet zero channels), with several taps per chunk it is turned off."""
    monkeypatch.setattr(conv_weights, "TMA_MIN_N", 16)
    w, b, _ = _optimized(32, cin, 3, torch.float32, dgrad=False)
    x = torch.randn(2, 6, 7, cin)
    with autotune.forced(Config(32, 32, 16), kernels=["conv2d_fwd"]), recording() as specs:
        y = conv2d_forward(x, w, b, padding=1).y
    (fwd,) = [s for s in specs if s.name == "_conv_fwd_kernel"]
    assert dict(fwd.constexprs)["W_PAD"] and dict(fwd.constexprs)["W_TMA"] == tma
    assert_close(y, _reference(x, w.detach(), b, torch.zeros(2, 6, 7, 32), padding=1)[0], what="tma")


def test_after_a_step_the_conv_reads_the_refreshed_copy():
    w, b, opt = _optimized(16, 8, 3, torch.float16)
    x = torch.randn(2, 6, 6, 8).half()
    y0 = conv2d(x, w, b, padding=1)
    y0.float().square().sum().backward()
    before = packed(w, conv_weights.forward_packing(torch.float16)).clone()
    opt.step()
    after = packed(w, conv_weights.forward_packing(torch.float16))
    assert not torch.equal(before, after)  # the optimizer kernel rewrote the copy
    assert torch.equal(after, w.detach().permute(2, 3, 1, 0).half())
    assert torch.equal(packed(w, conv_weights.dgrad_packing(torch.float16)), w.detach().permute(2, 3, 0, 1).half())
    with torch.no_grad():
        y1 = conv2d(x, w, b, padding=1)
    assert not torch.equal(y0.detach(), y1)
    ref = _reference(x.float(), w.detach().half().float(), b, torch.zeros_like(y1).float(), padding=1)[0]
    assert_close(y1, ref, torch.float16, what="y after a step")


def test_load_state_dict_refreshes_the_copy():
    conv = torch.nn.Conv2d(8, 12, 3, padding=1)
    w, b = conv.weight, conv.bias
    request_packed(w, conv_weights.forward_packing(torch.float32))
    request_packed(w, conv_weights.dgrad_packing(torch.float32))
    opt = optim.SGD(conv.parameters(), lr=0.1)
    x = torch.randn(2, 5, 6, 8)
    y0 = conv2d(x, w, b, padding=1)
    new = {k: torch.randn_like(v) for k, v in conv.state_dict().items()}
    version = w._version
    conv.load_state_dict(new)
    assert w._version != version and w.data_ptr() == opt._flat[0].flat_param.data_ptr()
    y1 = conv2d(x, w, b, padding=1)  # reads the copy, refreshed because p._version moved
    assert torch.equal(packed(w, conv_weights.forward_packing(torch.float32)), new["weight"].permute(2, 3, 1, 0))
    assert not torch.equal(y0.detach(), y1.detach())
    assert_close(y1, _reference(x, new["weight"], new["bias"], torch.zeros_like(y1), padding=1)[0], what="y")


def test_without_an_optimizer_the_conv_packs_per_call(monkeypatch):
    """Inference, or no fused optimizer: the same layouts, packed per call."""
    repacks = _Repacks(monkeypatch)
    w = torch.randn(12, 3, 3, 3, requires_grad=True)
    x = torch.randn(2, 6, 5, 3)
    y = conv2d(x, w, padding=1)
    y.backward(torch.ones_like(y))
    assert repacks.calls == ["pack_weight_for_forward"]  # no dgrad: x needs no gradient
    assert_close(y, _reference(x, w.detach(), None, torch.zeros_like(y), padding=1)[0], what="y")


def test_a_second_backward_adds_to_the_slot():
    w, b, opt = _optimized(8, 4, 3, torch.float32)
    x = torch.randn(2, 5, 5, 4)
    opt.zero_grad()
    conv2d(x, w, b, padding=1).sum().backward()
    once = w.grad.clone()
    conv2d(x, w, b, padding=1).sum().backward()  # no zero_grad: added to the slot's gradient
    assert_close(w.grad, 2 * once, what="accumulated dw")
    assert w.grad.data_ptr() == opt._flat[0].flat_grad.data_ptr()


def test_the_network_asks_for_the_conv_copies_and_keeps_them_across_to():
    """TritonNetwork requests each conv's forward copy and, unless its input is the network's
    (the stem) or it is depthwise, the dgrad's; `.to()` that replaces parameters keeps them."""
    from pathlib import Path

    import engine
    from engine.ir.ops import Family
    from engine.runtime.fused import TritonNetwork

    spec = engine.load(Path(__file__).resolve().parents[2] / "examples" / "airbench94.cnn")
    net = TritonNetwork(spec, precision="bf16").to("meta")
    convs = [g for g in net.kernel_plan() if g.family is Family.CONV]
    assert convs
    for g in convs:
        node = net.graph.node(g.anchor)
        wanted = [conv_weights.forward_packing(torch.bfloat16)]
        if node.inputs[0] != 0:
            wanted.append(conv_weights.dgrad_packing(torch.bfloat16))
        assert net.layer(node).weight._fusenet_packings == wanted, node.name


@pytest.mark.parametrize("groups,cin,splits,tail", [(1, 3, 3, True), (1, 12, 2, False), (3, 12, 3, True),
                                                   (3, 12, 3, False), (8, 8, 2, True), (1, 10, 1, True)])
def test_wgrad_writes_pytorchs_layout_into_out_split_or_not(groups, cin, splits, tail, monkeypatch):
    """Split partials in PyTorch's layout summed into `out` (one split: the kernel writes `out`),
    dbias into `bias_out`; padded input channels (3 -> 4, 10 -> 12) write only the weight's rows.
    Split GEMM wgrads sum their partials in the kernel's tail (the last split of each tile) or, when a
    tile's partials pass WGRAD_TAIL_BYTES, in _sum_to_torch_kernel."""
    from engine.kernels.conv import conv2d_wgrad
    from engine.kernels.conv import wgrad as conv_wgrad

    monkeypatch.setattr(engine.device, "INTERPRETED", False)  # GPU tiles: pixels enough for the splits
    if not tail:
        monkeypatch.setattr(conv_wgrad, "WGRAD_TAIL_BYTES", 0)
    x, dy = torch.randn(2, 15, 14, cin), torch.randn(2, 8, 7, 24)
    w_shape = (24, cin // groups, 3, 3)
    flat = torch.full((24 * (cin // groups) * 9 + 24 + 5,), 7.0)  # a flat buffer with neighbours
    out, bias_out = flat[:24 * (cin // groups) * 9].view(w_shape), flat[-29:-5]
    with autotune.forced(Config(16, 32, 16), kernels=["conv2d_wgrad"]), recording() as specs:
        dw, db = conv2d_wgrad(x, dy, w_shape, stride=2, padding=1, dilation=1, groups=groups, need_bias=True,
                              splits=splits, out=out, bias_out=bias_out)
    assert dw.data_ptr() == out.data_ptr() and db.data_ptr() == bias_out.data_ptr()
    depthwise = groups == cin
    folds = {s.name for s in specs if s.name in ("_sum_partials_kernel", "_sum_to_torch_kernel")}
    # split: the dw partials are folded (depthwise: already in PyTorch's layout; GEMM: permuted
    # by the tail or the fold), and the bias partials; one split: the kernels wrote dw and dbias themselves
    assert folds == (set() if splits == 1 else {"_sum_partials_kernel"} if depthwise else
                     set() if tail else {"_sum_to_torch_kernel", "_sum_partials_kernel"}), folds
    if splits > 1 and not depthwise:
        assert {dict(s.constexprs)["TAIL"] for s in specs if s.name == "_conv_wgrad_kernel"} == {tail}
    assert torch.equal(flat[-5:], torch.full((5,), 7.0))  # nothing written past the slots
    _, _, rdw, rdb = _reference(x, torch.randn(w_shape), torch.zeros(24), dy, stride=2, padding=1, groups=groups)
    assert_close(dw, rdw, what="dw")
    assert_close(db, rdb, what="db")
