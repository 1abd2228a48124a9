"""Fused multi-tensor optimizers (engine/kernels/optim.py) against torch.optim."""
import copy
import io

import pytest
import torch

from engine.kernels import launch as launch_mod
from engine.kernels import optim as fo
from helpers import DATA_MOVEMENT_OPS, OpRecorder, assert_close

SHAPES = [(7, 3), (10,), (1,), (3, 5, 2), (130,), (4, 1, 3, 3)]
NONE_IDX = 2  # this parameter has grad None for the first two steps (torch skips it)
FROZEN_IDX = 5  # this parameter never gets a grad

# Allocation, view and copy ops only; set_ comes from Triton's CPU interpreter (it
# aliases kernel arguments' storage), _record_function_* from torch.optim's profiler
# hook around step().
ALLOWED_ATEN = DATA_MOVEMENT_OPS | {"_record_function_enter_new", "_record_function_exit"}

CASES = [
    (fo.SGD, torch.optim.SGD, dict(lr=0.1)),
    (fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    (fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05)),
    (fo.Adam, torch.optim.Adam, dict(lr=0.01)),
    (fo.Adam, torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (fo.AdamW, torch.optim.AdamW, dict(lr=0.01)),
    (fo.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.3)),
]
IDS = [f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, _, kw in CASES]


def _make_pair(ours_cls, ref_cls, kw):
    init = [torch.randn(s) for s in SHAPES]
    ours = [t.clone().requires_grad_() for t in init]
    ref = [t.double().requires_grad_() for t in init]
    return ours, ref, ours_cls(ours, **kw), ref_cls(ref, **kw)


def _set_grads(ours, ref, step):
    for i, (p, q) in enumerate(zip(ours, ref)):
        if i == FROZEN_IDX or (i == NONE_IDX and step < 2):
            p.grad = q.grad = None
            continue
        g = torch.randn(p.shape)
        p.grad = g.clone()
        q.grad = g.double()


def _compare(ours, ref, what=""):
    for i, (p, q) in enumerate(zip(ours, ref)):
        assert_close(p, q, what=f"{what} param {i}")


@pytest.mark.parametrize("ours_cls,ref_cls,kw", CASES, ids=IDS)
def test_matches_torch_5_steps(ours_cls, ref_cls, kw):
    ours, ref, o, r = _make_pair(ours_cls, ref_cls, kw)
    frozen = ours[FROZEN_IDX].detach().clone()
    for step in range(5):
        _set_grads(ours, ref, step)
        o.step()
        r.step()
        _compare(ours, ref, f"step {step}")
    assert torch.equal(ours[FROZEN_IDX].detach(), frozen)  # no grad: no update, no weight decay
    assert ours[FROZEN_IDX] not in o.state or not o.state[ours[FROZEN_IDX]]
    for p, q in zip(ours, ref):  # state matches torch's, entry by entry
        for k, v in r.state[q].items():
            assert_close(o.state[p][k], v, what=f"state {k}")


@pytest.mark.parametrize("ours_cls,ref_cls,kw", [CASES[2], CASES[5], CASES[7]], ids=[IDS[2], IDS[5], IDS[7]])
def test_lr_changes_between_steps_without_recompiling(ours_cls, ref_cls, kw):
    ours, ref, o, r = _make_pair(ours_cls, ref_cls, kw)
    so = torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
    sr = torch.optim.lr_scheduler.StepLR(r, step_size=1, gamma=0.5)
    specs_seen = []
    for step, manual in enumerate([None, None, 0.3, None, 0.02]):
        if manual is not None:
            for g in o.param_groups + r.param_groups:
                g["lr"] = manual
        _set_grads(ours, ref, step)
        with launch_mod.recording() as specs:
            o.step()
        r.step()
        so.step()
        sr.step()
        specs_seen += [s for s in specs if s not in specs_seen]
        _compare(ours, ref, f"step {step}")
    # lr/bias corrections are runtime scalars: one specialization for uniform steps and
    # at most one more for the steps where a parameter lagged (per-segment table).
    assert len(specs_seen) <= 2
    for s in specs_seen:
        assert "lr" not in dict(s.constexprs) and "step_size" not in dict(s.constexprs)


@pytest.mark.parametrize("ours_cls,ref_cls,kw", CASES, ids=IDS)
def test_one_launch_per_step_per_group(ours_cls, ref_cls, kw, monkeypatch):
    ours, ref, o, _ = _make_pair(ours_cls, ref_cls, kw)
    calls = []
    real = launch_mod.launch

    def counting(kernel, grid, *args, **meta):
        calls.append(kernel)
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(fo, "launch", counting)
    for step in range(3):
        _set_grads(ours, ref, step)
        o.step()
        assert len(calls) == step + 1


def test_param_groups_one_launch_each_and_flat_views():
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    b = [torch.randn(7, requires_grad=True)]
    values = [p.detach().clone() for p in a + b]
    o = fo.SGD([{"params": a}, {"params": b, "lr": 0.5}], lr=0.1, momentum=0.9)
    for p, v in zip(a + b, values):  # re-pointed into flat buffers, values preserved
        assert torch.equal(p.detach(), v)
    assert a[1].untyped_storage().data_ptr() == a[0].untyped_storage().data_ptr()
    for p in a + b:
        p.grad = torch.ones_like(p)
    calls = []
    real = fo.launch
    fo.launch = lambda *args, **kw: (calls.append(1), real(*args, **kw))[1]
    try:
        o.step()
    finally:
        fo.launch = real
    assert len(calls) == 2
    assert_close(a[0], values[0].double() - 0.1, what="group 0")
    assert_close(b[0], values[2].double() - 0.5, what="group 1")


def test_param_data_replaced_is_repacked():
    p = torch.randn(6, requires_grad=True)
    o = fo.SGD([p], lr=0.1)
    p.data = torch.full((6,), 2.0)  # e.g. someone re-assigned .data after building the optimizer
    p.grad = torch.ones(6)
    o.step()
    assert_close(p, torch.full((6,), 1.9, dtype=torch.float64))
    p.grad = torch.ones(6)
    o.step()
    assert_close(p, torch.full((6,), 1.8, dtype=torch.float64))


@pytest.mark.parametrize("ours_cls,ref_cls,kw", [CASES[1], CASES[5], CASES[7]], ids=[IDS[1], IDS[5], IDS[7]])
def test_state_dict_round_trip(ours_cls, ref_cls, kw):
    ours, ref, o, r = _make_pair(ours_cls, ref_cls, kw)
    for step in range(3):
        _set_grads(ours, ref, step)
        o.step()
        r.step()
    buf = io.BytesIO()
    torch.save(o.state_dict(), buf)
    saved_params = [p.detach().clone() for p in ours]

    # 1) a fresh fused optimizer loads our checkpoint and continues exactly like torch
    ours2 = [t.clone().requires_grad_() for t in saved_params]
    o2 = ours_cls(ours2, **kw)
    buf.seek(0)
    o2.load_state_dict(torch.load(buf))
    # 2) torch.optim loads our checkpoint too (torch-compatible state)
    ref2 = [t.double().requires_grad_() for t in saved_params]
    r2 = ref_cls(ref2, **kw)
    buf.seek(0)
    sd = torch.load(buf)
    r2.load_state_dict(sd)
    # 3) and we load torch's
    ours3 = [t.clone().requires_grad_() for t in saved_params]
    o3 = ours_cls(ours3, **kw)
    o3.load_state_dict(copy.deepcopy(r.state_dict()))

    for step in range(3, 5):
        _set_grads(ours, ref, step)
        for group in (ours2, ref2, ours3):
            for p, q in zip(group, ours):
                p.grad = None if q.grad is None else q.grad.clone().to(p.dtype)
        for opt in (o, r, o2, r2, o3):
            opt.step()
    _compare(ours2, ref, "reloaded ours")
    _compare(ref2, ref, "torch loading ours")
    _compare(ours3, ref, "ours loading torch")
    for p, p2 in zip(ours, ours2):
        assert torch.equal(p.detach(), p2.detach())
    # loaded state lives in the flat buffers (views), not in the loaded tensors
    flat = o2._flat[0]
    for p in ours2:
        for k, v in o2.state[p].items():
            if k != "step":
                assert v.untyped_storage().data_ptr() == flat.bufs[k].untyped_storage().data_ptr(), k


@pytest.mark.parametrize("ours_cls,ref_cls,kw", [CASES[2], CASES[5]], ids=[IDS[2], IDS[5]])
def test_step_does_no_arithmetic_aten_ops(ours_cls, ref_cls, kw):
    ours, ref, o, _ = _make_pair(ours_cls, ref_cls, kw)
    for step in range(3):
        _set_grads(ours, ref, step)
        with OpRecorder() as rec:
            o.step()
        assert rec.ops <= ALLOWED_ATEN, f"compute aten ops used: {sorted(rec.ops - ALLOWED_ATEN)}"


def test_rejects_non_fp32_params():
    with pytest.raises(ValueError):
        fo.Adam([torch.randn(3, dtype=torch.float16, requires_grad=True)])
    with pytest.raises(ValueError):
        fo.SGD([torch.randn(3, requires_grad=True)], lr=0.1, nesterov=True)


# ----------------------------------------------------------------------------- gradients read in place


def test_gradients_are_read_where_autograd_left_them_no_gather_copies():
    ours, ref, o, r = _make_pair(fo.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9))
    for step in range(3):
        _set_grads(ours, ref, step)
        o.step()
        r.step()
    _compare(ours, ref)
    # nothing was copied into the flat gradient buffer: the kernel read every gradient in place
    assert not o._flat[0].flat_grad.any()


def test_a_gradient_in_another_layout_is_copied_into_its_slot():
    p = torch.randn(4, 6, requires_grad=True)
    q = p.detach().double().clone().requires_grad_()
    o, r = fo.SGD([p], lr=0.1, momentum=0.9), torch.optim.SGD([q], lr=0.1, momentum=0.9)
    for step in range(2):
        p.grad = torch.randn(6, 4).t()  # not contiguous
        q.grad = p.grad.double()
        o.step()
        r.step()
    assert_close(p, q)
    assert torch.equal(o._flat[0].flat_grad.view(4, 6), p.grad)


# ----------------------------------------------------------------------------- device mode (the training step)


@pytest.mark.parametrize("ours_cls,ref_cls,kw", [CASES[2], CASES[5], CASES[7]], ids=[IDS[2], IDS[5], IDS[7]])
def test_device_schedule_tracks_torch_with_a_changing_learning_rate(ours_cls, ref_cls, kw):
    """attach_clock: the rate comes from a device table by the clock's step and Adam's t from
    the clock; every launch has the same host arguments (what a captured graph replays)."""
    from engine.kernels.clock import STEP, StepClock
    from engine.kernels.launch import observing

    ours, ref, o, r = _make_pair(ours_cls, ref_cls, kw)
    lrs = [0.05, 0.02, 0.04, 0.01, 0.03]
    clock = StepClock(ours[0].device, step=0)
    o.attach_clock(clock.counters, torch.tensor(lrs, dtype=torch.float32), 0)
    args = []
    for step in range(5):
        _set_grads(ours, ref, step)
        clock.counters[STEP] += 1  # what the training step's loss kernel does before the update
        for g in r.param_groups:
            g["lr"] = lrs[step]
        with observing(lambda kernel, a: args.append(tuple(v for v in a if not isinstance(v, torch.Tensor)))):
            o.step()
        o.note_step()
        r.step()
        _compare(ours, ref, f"step {step}")
    assert len(set(args[3:])) == 1, "a launch argument changed between steady-state steps"
    if ours_cls is not fo.SGD:  # the host's step counts (the state dict's `step`) follow
        sd = o.state_dict()["state"]
        assert [float(sd[i]["step"]) for i in sorted(sd)] == [float(r.state[q]["step"]) for q in ref if q in r.state]


# ----------------------------------------------------------------------------- packed copies


PACKINGS = [((1, 0), torch.bfloat16), ((2, 3, 1, 0), torch.bfloat16), ((2, 3, 0, 1), torch.float16)]


@pytest.mark.parametrize("perm,dtype", PACKINGS)
def test_the_kernel_writes_packed_copies_next_to_the_master(perm, dtype):
    from engine.kernels.params import Packing, packed, request_packed

    shapes = [(5,), (7, 3) if len(perm) == 2 else (6, 3, 3, 2), (4,)]
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    k = Packing(perm, dtype)
    request_packed(ps[1], k)
    o = fo.Adam(ps, lr=0.01)
    assert packed(ps[0], k) is None  # nobody asked for this one
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        o.step()
        got = packed(ps[1], k)
        want = ps[1].detach().permute(perm)
        assert got.dtype == dtype and got.is_contiguous() and got.shape == want.shape
        assert torch.equal(got, want.to(dtype))  # rounded to nearest even, as torch casts


def test_packed_copy_refreshes_after_an_in_place_change_and_a_re_pointed_parameter():
    from engine.kernels.params import Packing, packed, request_packed

    p = torch.randn(6, 5, requires_grad=True)
    k = Packing((1, 0), torch.bfloat16)
    request_packed(p, k)
    o = fo.SGD([p], lr=0.1)
    with torch.no_grad():
        p.copy_(torch.full((6, 5), 3.0))  # e.g. load_state_dict after the optimizer was built
    assert torch.equal(packed(p, k), torch.full((5, 6), 3.0, dtype=torch.bfloat16))
    p.data = torch.full((6, 5), 2.0)  # not a view of the flat buffer any more: no copy to hand out
    assert packed(p, k) is None
    p.grad = torch.ones(6, 5)
    o.step()  # re-points it and refreshes
    assert torch.equal(packed(p, k), torch.full((5, 6), 1.9, dtype=torch.float32).bfloat16())


def test_packing_validation():
    from engine.kernels.params import Packing, request_packed

    with pytest.raises(ValueError, match="permutation"):
        request_packed(torch.randn(3, 4), Packing((0, 0), torch.bfloat16))
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    request_packed(a, Packing((0,), torch.bfloat16))
    request_packed(b, Packing((1, 0), torch.float16))
    with pytest.raises(ValueError, match="share a dtype"):
        fo.SGD([a, b], lr=0.1)


# ----------------------------------------------------------------------------- flat gradient slots


def test_gradient_slots_once_per_step_and_never_clobbering_an_accumulated_gradient():
    from engine.kernels.params import claim_grad_slot, slot_view

    p = torch.randn(3, 4, requires_grad=True)
    o = fo.SGD([p], lr=0.1)
    flat = o._flat[0].flat_grad
    claim = claim_grad_slot(p)
    assert claim is not None and claim_grad_slot(p) is None  # a second use in the same step gets none
    view = slot_view(claim)
    assert view.data_ptr() == flat.data_ptr() and view.shape == (3, 4)
    p.grad = torch.ones(3, 4)
    assert slot_view(claim) is None  # a gradient is already there: the new one must be added, not written over
    o.step()
    assert claim_grad_slot(p) is not None  # the step frees the slot for the next forward
    with torch.no_grad():
        assert claim_grad_slot(p) is None  # no gradient wanted, no claim


def test_each_captured_step_gets_its_own_tables(monkeypatch):
    """Inside a CUDA-graph capture the optimizer gives the graph its own address and segment
    tables, so a later eager step or another graph (the bench captures one per input slot)
    cannot change what it reads at replay."""
    from engine.kernels.launch import observing

    p = torch.randn(5, requires_grad=True)
    o = fo.SGD([p], lr=0.1)
    seen = []
    monkeypatch.setattr(fo, "capturing", lambda: True)
    grads = [torch.ones(5), torch.full((5,), 2.0)]
    for g in grads:  # two "captures" with gradients at different addresses
        p.grad = g
        with observing(lambda kernel, args: seen.append(args[1])):  # the grad address table
            o.step()
    assert seen[0] is not seen[1]
    assert seen[0].tolist() == [grads[0].data_ptr()] and seen[1].tolist() == [grads[1].data_ptr()]
