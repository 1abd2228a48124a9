"""engine/kernels/centernet.py against the PyTorch reference (engine/training/detection/loss.py):
the loss terms and d total / d logits on awkward shapes (odd output sizes, one class and seven,
batch 1 and 3, no objects, many, objects sharing a centre), fp32 and fp16, the step clock, and
the decode peak test."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from engine.kernels import centernet as K
from engine.kernels.clock import StepClock
from engine.training.detection.decode import decode
from engine.training.detection.loss import centernet_loss_reference, heat_peaks_reference
from helpers import OpRecorder, assert_close


@dataclass(frozen=True)
class Targets:
    heatmap: torch.Tensor
    index: torch.Tensor
    size: torch.Tensor
    offset: torch.Tensor
    mask: torch.Tensor


def _dev() -> torch.device:
    """Where the test's tensors go: the default device (CUDA when the kernel tests run on a GPU)."""
    return torch.empty(0).device


def make_targets(B: int, H: int, W: int, C: int, K_max: int, n_objects, seed: int = 0, share: bool = False):
    """Random targets: Gaussian-ish heat with exactly 1.0 at each centre; `share`: objects 0 and 1 of
    each image (and their class) share a centre cell. Drawn on the CPU, then moved to _dev()."""
    g = torch.Generator().manual_seed(seed)
    cpu = dict(device="cpu")
    heat = torch.rand(B, H, W, C, generator=g, **cpu) * 0.9
    heat[torch.rand(B, H, W, C, generator=g, **cpu) < 0.5] = 0.0
    index = torch.zeros(B, K_max, dtype=torch.int32, **cpu)
    size = torch.zeros(B, K_max, 2, **cpu)
    offset = torch.zeros(B, K_max, 2, **cpu)
    mask = torch.zeros(B, K_max, **cpu)
    for b in range(B):
        n = n_objects[b] if isinstance(n_objects, (list, tuple)) else n_objects
        for k in range(n):
            cell = int(torch.randint(0, H * W, (1,), generator=g, **cpu))
            if share and k == 1:
                cell = int(index[b, 0])
            cls = int(torch.randint(0, C, (1,), generator=g, **cpu))
            heat[b, cell // W, cell % W, cls] = 1.0
            index[b, k] = cell
            size[b, k] = torch.rand(2, generator=g, **cpu) * 8 + 0.5
            offset[b, k] = torch.rand(2, generator=g, **cpu)
            mask[b, k] = 1.0
    return Targets(*(t.to(_dev()) for t in (heat, index, size, offset, mask)))


def _logits(B, H, W, C, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, H, W, C + 4, generator=g, device="cpu") * 2.0
    z[..., C:] = torch.rand(B, H, W, 4, generator=g, device="cpu") * 6  # regression channels near their targets
    return z.to(_dev(), dtype)


def _check(B, H, W, C, K_max, n, dtype=torch.float32, share=False, weights=(0.1, 1.0), ab=(2.0, 4.0)):
    t = make_targets(B, H, W, C, K_max, n, share=share)
    z = _logits(B, H, W, C, dtype)
    kw = dict(size_weight=weights[0], offset_weight=weights[1], alpha=ab[0], beta=ab[1])
    terms, grad = K.centernet_forward(z, t.heatmap, t.index, t.size, t.offset, t.mask, **kw)
    zr = z.double().requires_grad_(True)
    ref = centernet_loss_reference(zr, t, nhwc=True, **kw)
    ref[3].backward()
    tol = torch.float32 if dtype == torch.float32 else dtype
    for i, name in enumerate(("focal", "size", "offset", "total")):
        assert_close(terms[i], ref[i], tol, name, scale=float(ref[3].detach().abs()) or 1.0)
    assert grad.dtype == dtype and grad.shape == z.shape
    assert_close(grad, zr.grad, tol, "d total / d logits")
    return terms, ref


@pytest.mark.parametrize("B,H,W,C,K_max,n", [
    (1, 7, 9, 1, 4, 3),  # odd output, one class
    (3, 5, 11, 7, 8, [0, 8, 3]),  # seven classes, an image with no objects, a full one
    (2, 16, 16, 3, 64, 40),  # many objects
])
def test_loss_terms_and_gradient_match_the_reference(B, H, W, C, K_max, n):
    _check(B, H, W, C, K_max, n)


def test_no_objects_at_all_normalises_by_one():
    terms, ref = _check(2, 5, 5, 2, 4, 0)
    assert float(terms[1]) == 0.0 and float(terms[2]) == 0.0 and float(terms[0]) > 0


def test_objects_sharing_a_centre_each_add_their_term():
    _check(2, 6, 5, 3, 6, 4, share=True)


def test_weights_and_focal_exponents_are_parameters():
    _check(2, 5, 7, 2, 4, 3, weights=(0.5, 2.0), ab=(1.5, 0.0))


def test_fp16_logits():
    _check(3, 7, 5, 7, 8, [2, 0, 5], dtype=torch.float16)


def test_several_programs_and_the_finishing_kernel(monkeypatch):
    """GPU tiles (many programs, partials, the finish kernel) compute the same terms."""
    from engine import device

    monkeypatch.setattr(device, "INTERPRETED", False)
    monkeypatch.setattr(K, "ONE_PROGRAM_ELEMENTS", 0)
    from engine.kernels.launch import launch_log

    with launch_log() as log:
        _check(3, 9, 13, 5, 20, [20, 1, 7])
    assert log == ["_centernet_fwd_kernel", "_centernet_finish_kernel"]


def test_the_loss_is_bit_identical_run_to_run_and_one_launch():
    from engine.kernels.launch import launch_log

    t = make_targets(3, 9, 7, 3, 10, 6)
    z = _logits(3, 9, 7, 3, torch.float32)
    with launch_log() as log:
        a = K.centernet_forward(z, t.heatmap, t.index, t.size, t.offset, t.mask)
    b = K.centernet_forward(z, t.heatmap, t.index, t.size, t.offset, t.mask)
    assert log == ["_centernet_fwd_kernel"]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_clock_gets_the_sums_the_guard_and_the_step():
    t = make_targets(2, 5, 5, 2, 4, 2)
    z = _logits(2, 5, 5, 2, torch.float32)
    clock = StepClock(_dev())
    terms, _ = K.centernet_step(z, t, clock=clock)
    terms2, _ = K.centernet_step(z, t, clock=clock)
    st = clock.read()
    assert clock.step() == 2 and st["count"] == 4 and not st["bad"]
    assert st["loss_sum"] == pytest.approx(4 * float(terms[3]), rel=1e-6)
    assert st["terms"] == pytest.approx([4 * float(v) for v in terms[:3]], rel=1e-6)
    z[0, 0, 0, 0] = float("nan")
    K.centernet_step(z, t, clock=clock)
    st = clock.read()
    assert st["bad"] and st["bad_step"] == 3


def test_autograd_path_scales_by_the_incoming_gradient_without_torch_arithmetic():
    t = make_targets(2, 5, 7, 3, 4, 3)
    z = _logits(2, 5, 7, 3, torch.float32).requires_grad_(True)
    terms = K.centernet_loss(z, t)
    with OpRecorder() as rec:
        terms.backward(torch.tensor([0.0, 0.0, 0.0, 3.0]))
    zr = z.detach().double().requires_grad_(True)
    (3.0 * centernet_loss_reference(zr, t, nhwc=True)[3]).backward()
    assert_close(z.grad, zr.grad, torch.float32, "3 x d total")
    assert not {"mul", "mul_", "add", "sum"} & rec.ops


def test_shape_errors_are_clear():
    t = make_targets(1, 4, 4, 2, 3, 1)
    with pytest.raises(ValueError, match="classes\\+4"):
        K.centernet_forward(torch.zeros(1, 4, 4, 4), t.heatmap, t.index, t.size, t.offset, t.mask)
    with pytest.raises(ValueError, match="heatmap"):
        K.centernet_forward(torch.zeros(1, 4, 4, 7), t.heatmap, t.index, t.size, t.offset, t.mask)


@pytest.mark.parametrize("B,H,W,C", [(1, 7, 9, 1), (3, 8, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_peaks_match_the_max_pool_reference(B, H, W, C, dtype):
    z = _logits(B, H, W, C, dtype, seed=3)
    ours = K.heat_peaks(z)
    ref = heat_peaks_reference(z.float(), nhwc=True)
    assert torch.equal(ours > 0, ref > 0)
    assert_close(ours, ref, torch.float32, "peak scores")


def test_a_plateau_keeps_every_cell_of_equal_heat():
    z = torch.full((1, 4, 4, 5), -3.0)
    z[0, 1:3, 1:3, 0] = 2.0  # a 2x2 plateau: all four are maxima of their neighbourhoods
    ours = K.heat_peaks(z)
    assert int((ours[..., 0] > 0.5).sum()) == 4
    assert torch.equal(ours > 0, heat_peaks_reference(z, nhwc=True) > 0)


def test_decode_boxes_on_both_backends():
    B, C, H, W, stride = 2, 3, 6, 7, 4
    out = torch.full((B, C + 4, H, W), -6.0)
    out[0, 1, 2, 3] = 3.0  # image 0: class 1 at cell (x=3, y=2)
    out[0, C:, 2, 3] = torch.tensor([2.0, 4.0, 0.5, 0.25])  # w, h, ox, oy
    out[1, 2, 5, 6] = 1.0  # image 1: class 2 at the corner
    out[1, C:, 5, 6] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    for backend in ("torch", "triton"):
        dets = decode(out, stride, k=5, backend=backend, threshold=0.1)
        assert [d.shape for d in dets] == [(1, 6), (1, 6)]
        x, y = 3.5, 2.25
        want0 = torch.tensor([(x - 1) * 4, (y - 2) * 4, (x + 1) * 4, (y + 2) * 4, torch.sigmoid(torch.tensor(3.0)), 1])
        assert_close(dets[0][0], want0, torch.float32, backend)
        assert_close(dets[1][0], torch.tensor([22.0, 18.0, 26.0, 22.0, float(torch.sigmoid(torch.tensor(1.0))), 2]),
                     torch.float32, backend)


def test_decode_triton_matches_torch_on_random_outputs():
    out = _logits(3, 9, 11, 7, torch.float32, seed=5).permute(0, 3, 1, 2).contiguous()
    a = decode(out, 4, k=50, backend="torch")
    b = decode(out, 4, k=50, backend="triton")
    for da, db in zip(a, b):
        assert da.shape == db.shape and da.shape[0] == 50
        assert_close(db, da, torch.float32, "detections")
