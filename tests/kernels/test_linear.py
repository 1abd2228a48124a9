"""Fused linear layer (engine/kernels/linear.py) against torch, fp64 reference."""
import pytest
import torch
import torch.nn.functional as F

from engine import device
from engine.kernels import reduction
from engine.kernels import launch as launch_mod
from engine.kernels.launch import recording
from engine.kernels.linear import linear, linear_forward, linear_wgrad, weight_packing
from helpers import DATA_MOVEMENT_OPS, OpRecorder, assert_close, check_against_torch, torch_act

SLOPE = 0.01  # leaky_relu's: the kernels' default

# Allocation, view and copy ops only. Besides the brief's list: empty_like/new_empty
# (allocation) and set_ (Triton's CPU interpreter aliases kernel arguments' storage).
ALLOWED_ATEN = DATA_MOVEMENT_OPS


def _inputs(n, f, o, dtype=torch.float32, bias=True):
    x = torch.randn(n, f).to(dtype).requires_grad_()
    # 16-bit runs use weights representable in that dtype, so the kernel's cast of the
    # fp32 weight tile to the compute dtype is exact and the fp64 reference is the same
    # function (the interpreter's fp32->bf16 cast truncates instead of rounding).
    w = (torch.randn(o, f) / f**0.5).to(dtype).float().requires_grad_()
    b = torch.randn(o).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize("n,f,o", [(1, 7, 10), (5, 70, 3), (300, 256, 10), (300, 7, 3)])
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_linear_fp32(n, f, o, act):
    x, w, b = _inputs(n, f, o)
    check_against_torch(lambda x, w, b: linear(x, w, b, act=act), lambda x, w, b: torch_act(F.linear(x, w, b), act, SLOPE), [x, w, b])


@pytest.mark.parametrize("act", ["leaky_relu", "sigmoid", "tanh", "silu"])
def test_linear_other_acts(act):
    x, w, b = _inputs(37, 70, 10)
    check_against_torch(
        lambda x, w, b: linear(x, w, b, act=act, slope=0.01), lambda x, w, b: torch_act(F.linear(x, w, b), act, SLOPE), [x, w, b]
    )


def test_linear_leaky_slope():
    x, w, b = _inputs(20, 9, 6)
    check_against_torch(
        lambda x, w, b: linear(x, w, b, act="leaky_relu", slope=0.2),
        lambda x, w, b: F.leaky_relu(F.linear(x, w, b), 0.2),
        [x, w, b],
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,f,o,act", [(5, 70, 3, "gelu"), (300, 256, 10, "relu"), (1, 7, 10, "none")])
def test_linear_half(dtype, n, f, o, act):
    x, w, b = _inputs(n, f, o, dtype)
    out, _ = check_against_torch(
        lambda x, w, b: linear(x, w, b, act=act), lambda x, w, b: torch_act(F.linear(x, w, b), act, SLOPE), [x, w, b]
    )
    assert out.dtype == dtype


def test_linear_no_bias_and_frozen_input():
    x, w, _ = _inputs(33, 70, 10)
    x.requires_grad_(False)
    check_against_torch(lambda x, w: linear(x, w, act="relu"), lambda x, w: F.relu(F.linear(x, w)), [x, w])


def test_linear_bias_grad_only():
    x, w, b = _inputs(17, 5, 3)
    x.requires_grad_(False)
    w.requires_grad_(False)
    check_against_torch(lambda x, w, b: linear(x, w, b), F.linear, [x, w, b])


def test_linear_save_pre_and_non_contiguous_x():
    xt = torch.randn(70, 5)  # x = xt.T is a non-contiguous [5, 70] view
    w = torch.randn(3, 70)
    b = torch.randn(3)
    y, z = linear_forward(xt.t(), w, b, act="tanh", save_pre=True)
    ref_z = xt.t().double() @ w.double().t() + b.double()
    assert_close(z, ref_z, what="z")
    assert_close(y, torch.tanh(ref_z), what="y")


def test_linear_split_k_wgrad_deterministic():
    # N = 1100 > the interpreter's K block (512): wgrad runs 3 splits, the last of which to finish sums them
    # (one launch)
    x, w, b = _inputs(1100, 7, 3)
    check_against_torch(lambda x, w, b: linear(x, w, b, act="relu"), lambda x, w, b: F.relu(F.linear(x, w, b)), [x, w, b])
    dy = torch.randn(1100, 3)
    with launch_mod.launch_log() as log:
        dw1, db1 = linear_wgrad(dy, x.detach(), has_bias=True)
    assert log == ["_linear_wgrad_kernel"]
    dw2, db2 = linear_wgrad(dy, x.detach(), has_bias=True)
    assert torch.equal(dw1, dw2) and torch.equal(db1, db2)
    assert_close(dw1, dy.double().t() @ x.detach().double(), what="dw")
    assert_close(db1, dy.double().sum(0), what="db")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_gpu_tiles(monkeypatch, dtype):
    # The GPU tile choice (64..128 tiles, BLOCK_K 32/64, split-K over many splits), run interpreted.
    monkeypatch.setattr(device, "INTERPRETED", False)
    x, w, b = _inputs(300, 70, 10, dtype)
    with launch_mod.recording() as specs:
        check_against_torch(
            lambda x, w, b: linear(x, w, b, act="silu"), lambda x, w, b: F.silu(F.linear(x, w, b)), [x, w, b]
        )
    names = {s.name for s in specs}
    assert {"_linear_fwd_kernel", "_linear_dgrad_kernel", "_linear_wgrad_kernel"} == names
    assert dict(next(s for s in specs if s.name == "_linear_wgrad_kernel").constexprs)["TAIL"]
    for s in specs:
        c = dict(s.constexprs)
        if "BLOCK_K" in c:
            assert min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) >= 16


@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_wgrad_tail_many_tiles_and_splits(monkeypatch, has_bias):
    # GPU tiles, forced: O=150 x F=70 is 3 x 2 tiles (64 x 64), N=700 is 22 splits of 32 rows racing for
    # each tile's ticket; the last adds them in split order (TAIL_M rows at a time) into `out`. Twice:
    # the counters are back at 0 after each launch, and the sums are bit-identical.
    monkeypatch.setattr(device, "INTERPRETED", False)
    x, dy = torch.randn(700, 70), torch.randn(700, 150)
    L = 150 * 70 + (150 if has_bias else 0)
    outs = []
    for _ in range(2):
        out = torch.full((L,), float("nan"))
        with launch_mod.recording() as specs:
            dw, db = linear_wgrad(dy, x, has_bias=has_bias, out=out, act="none")
        (spec,) = specs
        c = dict(spec.constexprs)
        assert c["TAIL"] and c["TAIL_M"] < c["BLOCK_M"] and dw.data_ptr() == out.data_ptr()
        outs.append(out)
        assert not torch.isnan(out).any()
    assert torch.equal(outs[0], outs[1])
    assert_close(dw, dy.double().t() @ x.double(), what="dw")
    if has_bias:
        assert_close(db, dy.double().sum(0), what="db")
    assert not reduction.ticket_counters(x.device, 16).any()


def test_linear_tf32_flag_recorded():
    x, w, b = _inputs(8, 16, 16)
    with launch_mod.recording() as specs:
        y = linear(x.detach(), w.detach(), b.detach(), allow_tf32=True)
    assert dict(specs[0].constexprs)["PRECISION"] == "tf32"
    assert_close(y, F.linear(x.double(), w.double(), b.double()), tol="tf32")


def test_linear_only_allocation_view_copy_aten_ops():
    x, w, b = _inputs(37, 20, 10)
    dy = torch.randn(37, 10)
    with OpRecorder() as rec:
        y = linear(x, w, b, act="gelu")
        y.backward(dy)
    assert x.grad is not None and w.grad is not None and b.grad is not None
    assert rec.ops <= ALLOWED_ATEN, f"compute aten ops used: {sorted(rec.ops - ALLOWED_ATEN)}"


def test_linear_shape_errors():
    with pytest.raises(ValueError):
        linear_forward(torch.randn(4, 5), torch.randn(3, 6))
    with pytest.raises(ValueError):
        linear_forward(torch.randn(4, 5), torch.randn(3, 5).double())
    with pytest.raises(ValueError):
        linear_forward(torch.randn(4, 5), torch.randn(3, 5), torch.randn(4))
    with pytest.raises(ValueError):
        linear_forward(torch.randn(4, 5), torch.randn(3, 5), act="swish")


@pytest.mark.parametrize("act", ["none", "relu"])
def test_dropout_epilogue_matches_torch_with_the_same_mask(act):
    from engine.kernels.dropout import dropout_forward
    from engine.kernels.linear import linear

    p, seed = 0.4, 99
    x = torch.randn(37, 70, requires_grad=True)
    w = (torch.randn(10, 70) / 70**0.5).requires_grad_()
    b = torch.randn(10, requires_grad=True)
    keep = dropout_forward(torch.ones(37, 10), p, seed).double()  # mask / (1 - p)

    def ours(x, w, b):
        return linear(x, w, b, act=act, dropout_p=p, dropout_seed=seed)

    def ref(x, w, b):
        y = torch.nn.functional.linear(x, w, b)
        return (torch.relu(y) if act == "relu" else y) * keep

    check_against_torch(ours, ref, [x, w, b])
    assert 0.25 < float((keep == 0).double().mean()) < 0.55


# ----------------------------------------------------------------------------- under the fused optimizer


def _optimized(o: int, f: int, dtype):
    from engine.kernels import optim
    from engine.kernels.params import request_packed

    w = torch.nn.Parameter(torch.randn(o, f) / f ** 0.5)
    b = torch.nn.Parameter(torch.randn(o))
    packing = weight_packing(dtype)
    if packing is not None:
        request_packed(w, packing)
    return w, b, optim.SGD([w, b], lr=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_land_in_the_flat_slots_and_16_bit_gemms_read_the_packed_copy(dtype):
    from engine.kernels.params import packed

    w, b, opt = _optimized(10, 33, dtype)
    x = torch.randn(70, 33).to(dtype)
    flat = opt._flat[0].flat_grad
    for _ in range(2):
        opt.zero_grad()
        with recording() as specs:
            y = linear(x, w, b, act="relu")
        y.float().sum().backward()
        assert w.grad.data_ptr() == flat.data_ptr() and b.grad.data_ptr() == flat.data_ptr() + 4 * 330
        wk = packed(w, weight_packing(dtype)) if dtype != torch.float32 else w  # what the GEMMs read
        ref_w, ref_b = wk.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        torch.relu(x.double() @ ref_w.t() + ref_b).sum().backward()
        assert_close(w.grad, ref_w.grad, dtype, what="dw")
        assert_close(b.grad, ref_b.grad, dtype, what="db")
        opt.step()
    if dtype != torch.float32:
        lp = packed(w, weight_packing(dtype))
        assert lp is not None and lp.dtype == dtype
        wtypes = {dict(s.signature).get("w_ptr") for s in specs if s.name == "_linear_fwd_kernel"}
        assert wtypes == {"*bf16"}, wtypes  # the GEMM read the 16-bit copy, not the fp32 master


def test_a_weight_used_twice_in_one_step_gets_the_sum_of_both_gradients():
    w, b, opt = _optimized(6, 9, torch.float32)
    x1, x2 = torch.randn(5, 9), torch.randn(7, 9)
    opt.zero_grad()
    (linear(x1, w, b).sum() + 2 * linear(x2, w, b).sum()).backward()
    rw = w.detach().double().requires_grad_()
    ((x1.double() @ rw.t()).sum() + 2 * (x2.double() @ rw.t()).sum()).backward()
    assert_close(w.grad, rw.grad, what="dw of a shared weight")
    # without zero_grad the next gradient is added to the one in the slot, not written over it
    linear(x1, w, b).sum().backward()
    (x1.double() @ rw.t()).sum().backward()
    assert_close(w.grad, rw.grad, what="accumulated dw")


def test_a_linear_without_bias_writes_only_its_own_slot():
    from engine.kernels import optim

    w = torch.nn.Parameter(torch.randn(4, 6))
    after = torch.nn.Parameter(torch.randn(5))  # the next slot in the flat buffer
    opt = optim.SGD([w, after], lr=0.1)
    after.grad = None
    linear(torch.randn(3, 6), w).sum().backward()
    assert w.grad.data_ptr() == opt._flat[0].flat_grad.data_ptr()
    assert after.grad is None and not opt._flat[0].flat_grad[24:].any()
