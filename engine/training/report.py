"""What a run leaves behind and what eval prints: metrics.csv, curves.png,
predictions.png, confusion matrices, per-class accuracy, pixel accuracy and mean IoU."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from engine.text import format_table

COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_miou", "seconds", "images_per_s"]


def write_metrics_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """`columns`: default COLUMNS (detection runs: engine.training.detection.run.COLUMNS)."""
    columns = list(columns or COLUMNS)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in columns})
    os.replace(tmp, path)


def read_metrics_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()} for r in csv.DictReader(f)]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: str | Path, rows: Sequence[dict], title: str = "", label_smoothing: float = 0.0) -> None:
    """Loss (log scale, where divergence shows) and accuracy per epoch, train and validation.

    The training loss is the one minimised, with the spec's label smoothing; the
    validation loss is plain cross-entropy. With smoothing the two differ by
    construction (the smoothed loss cannot reach 0), so the legend says so."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    plt = _plt()
    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    smoothing = f" (with label smoothing {label_smoothing:g})" if label_smoothing else ""
    a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train" + smoothing)
    a.plot(ep, [r["val_loss"] for r in rows], "o-", label="validation" + (" (no smoothing)" if smoothing else ""))
    losses = [v for r in rows for v in (r["train_loss"], r["val_loss"]) if isinstance(v, (int, float))]
    if losses and all(v > 0 and v == v and v != float("inf") for v in losses):
        a.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        a.yaxis.set_major_formatter(plain), a.yaxis.set_minor_formatter(plain)
        a.tick_params(axis="y", which="minor", labelsize=7)
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(fontsize=8), a.grid(alpha=0.3, which="both")
    b.plot(ep, [r["train_acc"] for r in rows], "o-", label="train")
    b.plot(ep, [r["val_acc"] for r in rows], "o-", label="validation")
    if any(r.get("val_miou") not in (None, "") for r in rows):
        b.plot(ep, [r.get("val_miou") for r in rows], "s--", label="validation mean IoU")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy"), b.legend(fontsize=8), b.grid(alpha=0.3)
    for axis in (a, b):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _show(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
    x = img.detach().float().cpu().clone()
    if mean:
        x = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    x = x.clamp(0, 1)
    return (x[0].numpy(), "gray") if x.shape[0] == 1 else (x[:3].permute(1, 2, 0).numpy(), None)


def pick_examples(pred: torch.Tensor, target: torch.Tensor, n: int = 36) -> torch.Tensor:
    """Indices of up to `n` validation images to show: the mistakes first (up to half of
    the grid, or all of it when there are no correct ones), then correct predictions.
    Label maps (segmentation) are ranked by pixel accuracy, worst first."""
    if pred.ndim == 1:
        wrong = (pred != target).nonzero().flatten()
        right = (pred == target).nonzero().flatten()
        k = min(len(wrong), max(n // 2, n - len(right)))
        return torch.cat([wrong[:k], right[:n - k]])
    acc = (pred == target).float().flatten(1).mean(1)
    return torch.argsort(acc)[:min(n, 8)]


def plot_predictions(path: str | Path, images: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                     classes: Sequence[str], mean: Sequence[float] = (), std: Sequence[float] = (),
                     max_images: int = 36) -> None:
    """A grid of validation images titled predicted/true; mistakes in red and framed.

    For segmentation (label maps) each row shows image, true map and predicted map.
    """
    plt = _plt()
    n = min(len(images), max_images if pred.ndim == 1 else 8)
    if pred.ndim == 1:
        # one image of all the tiles and one axes (36 axes take matplotlib seconds; this is redrawn every epoch)
        from matplotlib.patches import Rectangle

        cols = min(6, n)
        rows = (n + cols - 1) // cols
        tiles = [_show(images[i], mean, std) for i in range(n)]
        h, w = tiles[0][0].shape[:2]
        colour = tiles[0][1] is None
        gap_y, gap_x = max(2, h // 3), max(1, w // 8)  # room for each tile's title
        grid = np.ones((rows * (h + gap_y), cols * (w + gap_x)) + ((3,) if colour else ()), dtype=np.float32)
        fig, ax = plt.subplots(figsize=(1.6 * cols, 1.75 * rows + 0.4))
        name = lambda k: classes[k] if k < len(classes) else str(k)  # noqa: E731
        for i, (arr, _) in enumerate(tiles):
            r, c = divmod(i, cols)
            y0, x0 = r * (h + gap_y) + gap_y, c * (w + gap_x)
            grid[y0:y0 + h, x0:x0 + w] = arr
            p, t = int(pred[i]), int(target[i])
            ok = p == t
            ax.text(x0 + w / 2, y0 - 0.6, name(p) + ("" if ok else f" (true {name(t)})"), ha="center", va="bottom",
                    fontsize=8, color="black" if ok else "red")
            if not ok:
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), w, h, fill=False, edgecolor="red", linewidth=2))
        ax.imshow(grid, cmap=None if colour else "gray", vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
        wrong = int((pred[:n] != target[:n]).sum())
        ax.set_title(f"validation predictions: {wrong} mistake{'s' if wrong != 1 else ''} first (red, true label "
                     f"in brackets), then correct ones", fontsize=9)
    else:
        fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
        k = max(len(classes) - 1, 1)
        for i in range(n):
            arr, cmap = _show(images[i], mean, std)
            axes[i, 0].imshow(arr, cmap=cmap)
            axes[i, 1].imshow(target[i].cpu().numpy(), vmin=0, vmax=k, cmap="viridis")
            axes[i, 2].imshow(pred[i].cpu().numpy(), vmin=0, vmax=k, cmap="viridis")
            acc = (pred[i] == target[i]).float().mean().item()
            axes[i, 2].set_title(f"pixel acc {acc:.2f}", fontsize=8, color="black" if acc > 0.9 else "red")
            for a in axes[i]:
                a.axis("off")
        axes[0, 0].set_title("image", fontsize=8), axes[0, 1].set_title("true", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """[k, k] int64 counts; row = true class, column = predicted class."""
    idx = target.reshape(-1).long() * k + pred.reshape(-1).long()
    return torch.bincount(idx, minlength=k * k).reshape(k, k)


def summarise(conf: torch.Tensor) -> dict:
    """Accuracy, per-class accuracy (recall), and per-class IoU / mean IoU from a confusion matrix."""
    conf = conf.double()
    tp = conf.diag()
    total = conf.sum()
    support = conf.sum(1)
    predicted = conf.sum(0)
    per_class = torch.where(support > 0, tp / support.clamp_min(1), torch.full_like(tp, float("nan")))
    union = support + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    present = union > 0
    return {
        "accuracy": (tp.sum() / total).item() if total > 0 else float("nan"),
        "per_class_accuracy": per_class.tolist(),
        "iou": iou.tolist(),
        "mean_iou": iou[present].mean().item() if present.any() else float("nan"),
        "support": support.long().tolist(),
    }


def format_eval(result: dict, classes: Sequence[str], task: str = "classify") -> str:
    """Human-readable eval report: overall numbers, per-class table, confusion matrix."""
    conf = result["confusion"]
    s = summarise(conf)
    k = conf.shape[0]
    names = [classes[i] if i < len(classes) else str(i) for i in range(k)]
    lines = [f"images: {result['count']}   loss: {result['loss']:.4f}"]
    if task == "segment":
        lines.append(f"pixel accuracy: {s['accuracy'] * 100:.2f}%   mean IoU: {s['mean_iou'] * 100:.2f}%")
    else:
        lines.append(f"accuracy: {s['accuracy'] * 100:.2f}%")
    percent = lambda v: "-" if v != v else f"{v * 100:.1f}%"  # noqa: E731  (NaN: a class with no support)
    w = max(6, max(len(n) for n in names) + 1)
    segment = task == "segment"
    header = ("class", "support", "accuracy") + (("IoU",) if segment else ())
    rows = [(n, str(s["support"][i]), percent(s["per_class_accuracy"][i])) + ((percent(s["iou"][i]),) if segment else ())
            for i, n in enumerate(names)]
    lines += ["", format_table(header, rows, align="lr", gap=" ", rule=None, min_widths=(w, 8, 9, 7))]
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    cw = max(5, len(str(int(conf.max()))) + 1, max(len(n) for n in names) + 1)
    rows = [(n, *(str(int(v)) for v in conf[i])) for i, n in enumerate(names)]
    lines.append(format_table(("", *names), rows, align="lr", gap="", rule=None, min_widths=(w, *[cw] * k)))
    return "\n".join(lines)
