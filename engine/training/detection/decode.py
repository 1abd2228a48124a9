"""Detections from a CenterNet head's output.

`decode(out, stride, k=100, backend=...)`: peaks (sigmoid heat, kept where it
is the max of its 3x3 neighbourhood: engine.kernels.centernet.heat_peaks on the
Triton backend, a PyTorch reference on torch), then the k best peaks per image
(torch.topk: top-k runs on PyTorch on both backends), then boxes from the
regression channels at each peak, in input pixels:

    x1 = (cx + offset_x - width / 2) * stride,  y1 = (cy + offset_y - height / 2) * stride, ...

(box assembly: PyTorch gathers and arithmetic on both backends). Returns, per
image, fp32 `[n, 6]` = (x1, y1, x2, y2, score, class) on the CPU, best first,
with n <= k peaks whose score exceeds `threshold`.
"""
from __future__ import annotations

import torch

from engine.training.detection.loss import heat_peaks_reference


def peaks(out: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """fp32 [B, Ho, Wo, C] peak scores of NCHW output `[B, C+4, Ho, Wo]`."""
    if backend == "triton":
        from engine.kernels.centernet import heat_peaks

        return heat_peaks(out.permute(0, 2, 3, 1).contiguous())
    return heat_peaks_reference(out)


@torch.no_grad()
def decode(out: torch.Tensor, stride: int, k: int = 100, backend: str = "torch",
           threshold: float = 0.0) -> list[torch.Tensor]:
    """Detections per image (see the module docstring) of NCHW output `[B, C+4, Ho, Wo]`."""
    if out.dim() != 4 or out.shape[1] < 5:
        raise ValueError(f"decode: output must be [B, classes+4, Ho, Wo], got {tuple(out.shape)}")
    B, CT, H, W = out.shape
    C = CT - 4
    score_map = peaks(out, backend).reshape(B, H * W * C)  # [B, P*C], NHWC order
    kk = min(int(k), H * W * C)
    scores, flat = torch.topk(score_map, kk, dim=1)  # [B, kk] each
    cell, cls = flat // C, flat % C
    cy, cx = (cell // W).float(), (cell % W).float()
    reg = out[:, C:].float().reshape(B, 4, H * W)  # [B, 4, P]
    r = torch.gather(reg, 2, cell[:, None, :].expand(-1, 4, -1))  # [B, 4, kk]
    w, h, ox, oy = r[:, 0], r[:, 1], r[:, 2], r[:, 3]
    x, y = cx + ox, cy + oy
    boxes = torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], dim=2) * float(stride)  # [B, kk, 4]
    dets = torch.cat([boxes, scores[..., None], cls[..., None].float()], dim=2).cpu()  # [B, kk, 6]
    keep = (scores > threshold).cpu()
    return [dets[i][keep[i]] for i in range(B)]
