"""The CenterNet loss in plain PyTorch: what `--backend torch` trains with and the oracle the
fused kernels (engine.kernels.centernet) are tested against.

Output layout and targets: engine.kernels.centernet's docstring (NHWC there; this module
takes the network's NCHW output `[B, C+4, Ho, Wo]`, as a torch module returns it, or NHWC
with `nhwc=True`). Terms: focal (penalty-reduced, alpha 2, beta 4, -log p computed as
softplus(-x)), size and offset (L1 at the object centres, both coordinates summed), each
divided by max(1, objects in the batch); total = focal + size_weight*size + offset_weight*offset.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def centernet_loss_reference(out: torch.Tensor, targets, *, size_weight: float = 0.1, offset_weight: float = 1.0,
                             alpha: float = 2.0, beta: float = 4.0, nhwc: bool = False) -> torch.Tensor:
    """fp32 [4]: focal, size, offset, total (differentiable; computed in fp32, or in the
    input's dtype when it is fp64)."""
    z = out if nhwc else out.permute(0, 2, 3, 1)  # [B, Ho, Wo, C+4]
    dt = torch.float64 if z.dtype == torch.float64 else torch.float32
    z = z.to(dt)
    B, Ho, Wo, CT = z.shape
    C = CT - 4
    heat = targets.heatmap.to(z.device, dt)  # [B, Ho, Wo, C]
    mask = targets.mask.to(z.device, dt)  # [B, K]
    n = mask.sum().clamp(min=1.0)
    x = z[..., :C]
    nlp, nlq = F.softplus(-x), F.softplus(x)  # -log p, -log(1 - p)
    p, q = torch.sigmoid(x), torch.sigmoid(-x)
    pos = heat == 1.0
    neg_w = torch.where(pos, torch.zeros_like(heat), (1.0 - heat).clamp(min=0.0) ** beta)
    focal = torch.where(pos, q ** alpha * nlp, neg_w * p ** alpha * nlq).sum() / n
    reg = z[..., C:].reshape(B, Ho * Wo, 4)  # [B, P, 4]
    idx = targets.index.to(z.device).long()  # [B, K]
    pred = torch.gather(reg, 1, idx[..., None].expand(-1, -1, 4))  # [B, K, 4]
    m = mask[..., None]
    size = ((pred[..., :2] - targets.size.to(z.device, dt)).abs() * m).sum() / n
    offset = ((pred[..., 2:] - targets.offset.to(z.device, dt)).abs() * m).sum() / n
    total = focal + size_weight * size + offset_weight * offset
    return torch.stack([focal, size, offset, total])


def heat_peaks_reference(out: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
    """fp32 [B, Ho, Wo, C]: the sigmoid heat where a cell is the max of its 3x3 neighbourhood, else 0."""
    z = out.permute(0, 3, 1, 2) if nhwc else out  # [B, C+4, Ho, Wo]
    C = z.shape[1] - 4
    heat = torch.sigmoid(z[:, :C].float())
    hmax = F.max_pool2d(heat, 3, stride=1, padding=1)
    return torch.where(hmax == heat, heat, torch.zeros_like(heat)).permute(0, 2, 3, 1).contiguous()
