"""The folded wgrad (engine.kernels.conv.wgrad_folded): a conv with few stored input channels and
no padding has every (tap, channel) in one tile's rows and several image slabs on the wgmma's
diagonal. Checked against PyTorch (fp64) on awkward sizes, interpreted, with GPU tiles where the
path needs them (several trips, splits and the last split's sum; a forced config applies under the
interpreter, whose bf16 dots need UPCAST, so bf16 keeps engine.device.INTERPRETED)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import engine.device
from engine.kernels import autotune
from engine.kernels.conv import conv2d_wgrad
from engine.kernels.conv.wgrad_folded import fold_config, folded_tiles
from engine.kernels.launch import recording
from engine.kernels.layout import pad_channels
from engine.kernels.tune_config import Config


def _ref(x, dy, w_shape, stride, dilation):
    """(dw, db) of F.conv2d in fp64 from NHWC x [N, H, W, Cin] and dy."""
    xd = x.permute(0, 3, 1, 2).double()
    wd = torch.zeros(w_shape, dtype=torch.float64, requires_grad=True)
    F.conv2d(xd, wd, stride=stride, dilation=dilation).backward(dy.permute(0, 3, 1, 2).double())
    return wd.grad, dy.double().sum((0, 1, 2))


def _run(x, dy, w_shape, cin, stride=1, dilation=1, **kw):
    """conv2d_wgrad on x padded to its 16-byte channels (as the network stores a stem's input);
    returns (dw, db, the folded kernel's constexprs)."""
    xp = pad_channels(x, -(-cin * x.element_size() // 16) * 16 // x.element_size())
    with recording() as specs:
        dw, db = conv2d_wgrad(xp, dy, w_shape, stride=stride, padding=0, dilation=dilation, groups=1,
                              need_bias=True, channels=cin, **kw)
    (k,) = [dict(s.constexprs) for s in specs if s.name == "_conv_wgrad_folded_kernel"]
    return dw, db, k


def test_the_stem_of_airbench94_is_folded_by_the_untuned_heuristic(monkeypatch):
    # 3 channels stored as 8 (bf16), 2x2, 24 outputs: 32 rows (tap, channel) and two image slabs
    assert fold_config(8, 24, 2, 2, (0, 0), 1, True) == (32, 2, 32)
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    assert folded_tiles(1024, 31, 31, 2, 64, 2) == Config(64, 64, 256, num_warps=4, num_stages=3)
    # shorter boxes while there are too few for a split of 8 boxes per SM; 64x128 stages of 128 pixels
    assert folded_tiles(64, 32, 32, 4, 64, 2) == Config(64, 64, 64, num_warps=4, num_stages=4)
    assert folded_tiles(1024, 31, 31, 2, 128, 2) == Config(64, 128, 128, num_warps=4, num_stages=3)
    # not folded: padding, groups, a fused activation's dz, 64 channels, too many taps' rows
    assert fold_config(8, 24, 2, 2, (1, 1), 1, True) is None
    assert fold_config(8, 24, 2, 2, (0, 0), 2, True) is None
    assert fold_config(8, 24, 2, 2, (0, 0), 1, False) is None
    assert fold_config(8, 20, 2, 2, (0, 0), 1, True, aligned=False) is None  # 40-byte dy rows
    assert fold_config(4, 24, 2, 2, (0, 0), 1, True, elem_bytes=4) is None  # fp32: conv2d_wgrad's kernel
    assert fold_config(64, 24, 1, 1, (0, 0), 1, True) is None
    assert fold_config(8, 24, 3, 3, (0, 0), 1, True) is None
    assert fold_config(8, 129, 1, 1, (0, 0), 1, True) is None  # 256 columns a slab
    # slabs as the 128 columns allow: 8 channels of one tap are 16 rows, 4 slabs of 32 columns,
    # 2 (of 32 rows, half padding) of 64, one of 128
    assert fold_config(8, 24, 1, 1, (0, 0), 1, True) == (16, 4, 32)
    assert fold_config(8, 64, 1, 1, (0, 0), 1, True) == (32, 2, 64)
    assert fold_config(8, 100, 2, 2, (0, 0), 1, True) == (64, 1, 128)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,hw,k,cout,stride,dilation", [
    (5, (9, 10), (2, 2), 24, 1, 1),  # an odd batch: the last slab pair holds one image
    (3, (7, 12), (1, 3), 40, 1, 1),  # 1x3 taps of 8 channels: 24 of 32 rows real; 64-wide slabs
    (4, (11, 9), (2, 2), 16, 2, 1),  # stride 2
    (2, (9, 9), (2, 3), 8, 1, 2),  # dilation 2, 8 outputs in 16 columns
    (6, (5, 6), (1, 1), 16, 1, 1),  # 1x1: 8 channels, four slabs of 16 rows
    (3, (6, 5), (1, 2), 72, 1, 1),  # 128 columns: one slab of 64 rows, 16 real
    (2, (5, 7), (1, 1), 40, 1, 1),  # 64 columns: two slabs of 32 rows, 8 real
])
def test_folded_wgrad_matches_pytorch_on_gpu_tiles(dtype, n, hw, k, cout, stride, dilation):
    x = torch.randn(n, *hw, 3).to(dtype)
    ho = (hw[0] - dilation * (k[0] - 1) - 1) // stride + 1
    wo = (hw[1] - dilation * (k[1] - 1) - 1) // stride + 1
    dy = torch.randn(n, ho, wo, cout).to(dtype)
    w_shape = (cout, 3, *k)
    # boxes of 16 pixels a slab: several boxes a row block, rows and images not filling them
    with autotune.forced(Config(64, 64, 16, split=3), kernels=["conv2d_wgrad_folded"]):
        dw, db, kc = _run(x, dy, w_shape, 3, stride, dilation)
    ref_dw, ref_db = _ref(x.float(), dy.float(), w_shape, stride, dilation)
    assert_close(dw, ref_dw, tol=dtype, what="dw")
    assert_close(db, ref_db, tol=dtype, what="db")
    assert kc["TAIL"] and kc["BLOCK_M"] == 64


@pytest.mark.parametrize("shape,block_p,splits,full", [
    ((7, 10, 8), 256, 1, (True, True, False)),  # 2 whole images a slab: the last box 3 of 4 real
    ((8, 10, 8), 64, 2, (True, False, True)),  # 8 rows x 8 columns: stepped down the image
    ((8, 5, 21), 16, None, (False, False, True)),  # 16 of a row's 20 pixels: stepped along it, then down
])
def test_folded_wgrad_boxes_and_splits(shape, block_p, splits, full, monkeypatch):
    # a 2x2 conv of 3 channels (stored as 8 fp16: two slabs): the masks a box's position cannot fail are dropped
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    n, h, w = shape
    x, dy = torch.randn(n, h, w, 3).half(), torch.randn(n, h - 1, w - 1, 24).half()
    w_shape = (24, 3, 2, 2)
    out, bias_out = torch.full((24 * 3 * 4,), float("nan")), torch.full((24,), float("nan"))
    with autotune.forced(Config(64, 64, block_p, split=splits), kernels=["conv2d_wgrad_folded"]):
        dw, db, k = _run(x, dy, w_shape, 3, out=out, bias_out=bias_out)
    assert (k["FULL_W"], k["FULL_H"], k["EVEN_B"]) == full
    assert k["TAIL"] == (splits != 1)
    assert dw.data_ptr() == out.data_ptr() and db.data_ptr() == bias_out.data_ptr()
    ref_dw, ref_db = _ref(x, dy, w_shape, 1, 1)
    assert_close(dw, ref_dw, tol=torch.float16, what="dw")
    assert_close(db, ref_db, tol=torch.float16, what="db")


def test_folded_wgrad_is_deterministic_and_the_interpreter_default_runs():
    x, dy = torch.randn(3, 10, 11, 3).half(), torch.randn(3, 9, 10, 24).half()
    a = _run(x, dy, (24, 3, 2, 2), 3)
    b = _run(x, dy, (24, 3, 2, 2), 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert_close(a[0], _ref(x, dy, (24, 3, 2, 2), 1, 1)[0], tol=torch.float16, what="dw")
