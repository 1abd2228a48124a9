"""Channel concatenation: strided row copies into channel slices (copy_rows,
copy_into) and concat_channels, forward and backward."""
from __future__ import annotations

import pytest
import torch
from helpers import check_against_torch

from engine.kernels import common
from engine.kernels import concat as cc


@pytest.fixture
def small_blocks(monkeypatch):
    """Force several row and channel blocks on small tensors."""
    monkeypatch.setattr(common, "INTERP_TILE", 256)


    a = torch.randn(2, 7, 9, 3).requires_grad_()
    b = torch.randn(2, 7, 9, 17).requires_grad_()

    def ours(u, v):
        buf = torch.empty(2, 7, 9, 20)
        cc.copy_into(buf[..., 0:3], u)
        cc.copy_into(buf[..., 3:20], v)
        return buf

    out, _ = check_against_torch(ours, lambda u, v: torch.cat([u, v], dim=-1), [a, b])
    assert out.is_contiguous()


def test_copy_into_grad_is_contiguous_slice():
    a = torch.randn(1, 3, 5, 10, requires_grad=True)
    buf = torch.empty(1, 3, 5, 17)
    cc.copy_into(buf[..., 4:14], a)
    g = torch.randn(1, 3, 5, 17)
    (ga,) = torch.autograd.grad(buf[..., 4:14], a, g[..., 4:14])
    assert ga.is_contiguous()
    assert torch.equal(ga, g[..., 4:14])


def test_copy_into_rejects_uncollapsible_view():
    buf = torch.empty(4, 6, 5)
    with pytest.raises(ValueError, match="collapse"):
        cc.copy_into(buf[:, :3, :], torch.randn(4, 3, 5))  # rows 0-2 of each of 4 groups


def test_copy_into_strided_rows():
    buf = torch.zeros(4, 6, 5)
    src = torch.randn(4, 3, 5)
    cc.copy_into(buf[:, ::2, :], src)  # rows of stride 10 collapse to one stride
    assert torch.equal(buf[:, ::2, :], src)
    assert torch.equal(buf[:, 1::2, :], torch.zeros(4, 3, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_concat_channels(dtype):
    xs = [torch.randn(2, 7, 9, c).to(dtype).requires_grad_() for c in (3, 10, 17)]
    check_against_torch(lambda *v: cc.concat_channels(v), lambda *v: torch.cat(v, dim=-1), xs)
