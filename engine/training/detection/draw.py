"""Pictures of detections: what `predictions.png` and `fusenet predict` show.

One axes for the whole montage (like report.plot_predictions: one axes per image
costs matplotlib seconds, and this is redrawn every epoch). Predicted boxes are
solid with their class and score; true boxes are dashed, so a hit reads as a solid
box over a dashed one and a miss as a lone dashed box. One colour per class.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

MIN_SCORE = 0.3  # detections below this are not drawn (a CenterNet head scores every peak)
MAX_BOXES = 20  # per image, best scores first: more is clutter, not information


def _tile(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """One image [C,H,W] as an [H,W,3] array in [0,1], normalisation undone."""
    x = img.detach().float().cpu()
    if mean:
        x = x * torch.tensor(std, dtype=x.dtype)[:, None, None] + torch.tensor(mean, dtype=x.dtype)[:, None, None]
    x = x.clamp(0, 1)
    x = x[:1].expand(3, -1, -1) if x.shape[0] < 3 else x[:3]
    return x.permute(1, 2, 0).numpy()


def draw_detections(images: torch.Tensor, dets: Sequence[torch.Tensor], gts: Sequence[torch.Tensor] | None,
                    classes: Sequence[str] | int, path: str | Path, *, mean: Sequence[float] = (),
                    std: Sequence[float] = (), min_score: float = MIN_SCORE, max_images: int = 16,
                    title: str | None = None) -> Path:
    """Write a montage PNG of `images` with their predicted and true boxes; returns the path.

    images [B,C,H,W] float: in 0..1, or normalised with `mean`/`std` (per channel) to undo;
    dets: per image [n, 6] (x1, y1, x2, y2, score, class) in input pixels; those scoring under
          `min_score` are left out, and at most MAX_BOXES per image are drawn;
    gts:  per image [m, 5] (class, x1, y1, x2, y2), or None (predict has no truth);
    classes: the class names (or their count).
    The file is written atomically (a temporary file, then os.replace): a reader never sees half a PNG.
    """
    from engine.training.report import _plt
    from matplotlib.patches import Rectangle

    plt = _plt()
    path = Path(path)
    names = [str(k) for k in range(classes)] if isinstance(classes, int) else list(classes)
    name = lambda k: names[k] if 0 <= k < len(names) else str(k)  # noqa: E731
    palette = plt.get_cmap("tab10")
    colour = lambda k: palette(k % 10)  # noqa: E731
    n = min(len(images), max_images)
    cols = min(4, max(n, 1))
    rows = max(1, (n + cols - 1) // cols)
    h, w = int(images.shape[-2]), int(images.shape[-1])
    gap = max(2, w // 16)
    grid = np.ones((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), dtype=np.float32)
    fig, ax = plt.subplots(figsize=(2.6 * cols, 2.6 * rows * h / w + 0.5))
    font = 6 if w <= 96 else 7
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = gap + r * (h + gap), gap + c * (w + gap)
        grid[y0:y0 + h, x0:x0 + w] = _tile(images[i], mean, std)
        # box edges are pixel edges (pixel j spans [j, j+1)); imshow centres pixel j at j, hence -0.5
        ox, oy = x0 - 0.5, y0 - 0.5
        if gts is not None:
            for cls, x1, y1, x2, y2 in torch.as_tensor(gts[i]).reshape(-1, 5).tolist():
                ax.add_patch(Rectangle((ox + x1, oy + y1), x2 - x1, y2 - y1, fill=False, linestyle=(0, (2, 2)),
                                       linewidth=1.2, edgecolor=colour(int(cls))))
        d = torch.as_tensor(dets[i]).detach().float().cpu().reshape(-1, 6)
        d = d[d[:, 4] >= min_score]
        d = d[torch.argsort(d[:, 4], descending=True)][:MAX_BOXES]
        for x1, y1, x2, y2, score, cls in d.tolist():
            x1, x2 = max(0.0, min(x1, x2)), min(float(w), max(x1, x2))
            y1, y2 = max(0.0, min(y1, y2)), min(float(h), max(y1, y2))
            ax.add_patch(Rectangle((ox + x1, oy + y1), x2 - x1, y2 - y1, fill=False, linewidth=1.5,
                                   edgecolor=colour(int(cls))))
            ax.text(ox + x1, oy + y1, f"{name(int(cls))} {score:.2f}", fontsize=font, color="white", va="bottom",
                    ha="left", clip_on=True,
                    bbox=dict(facecolor=colour(int(cls)), edgecolor="none", pad=0.5, alpha=0.85))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xlim(-0.5, grid.shape[1] - 0.5), ax.set_ylim(grid.shape[0] - 0.5, -0.5)
    ax.axis("off")
    legend = "solid: predicted (class, score)" + ("; dashed: true boxes" if gts is not None else "")
    ax.set_title((title + "\n" if title else "") + legend, fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=90)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path
