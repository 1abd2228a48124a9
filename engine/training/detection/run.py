"""The training loop's detection pieces (`loss centernet`), so engine.training.loop stays one loop.

`DetectionTask.of(model, cfg)` holds what a detection run needs besides the
classification machinery: the head (class count, stride, output size, from the
network's shapes), the loss weights and the object slots per image. It makes
the batches (engine.training.data.detection: augmented boxes, CenterNet targets),
evaluates a data set (loss terms on the run's backend, decoded boxes, COCO mAP),
and writes the epoch's numbers: metrics.csv columns, the progress and epoch
lines, curves.png (total loss and each term, train and validation; mAP) and
predictions.png (engine.training.detection.draw).

On the triton backend the validation loss is fusenet's CenterNet kernel and the
peaks are its decode kernel; top-k, box assembly and mAP run on PyTorch/NumPy
on both backends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from engine.ir.detection import DetectionHead, detection_head
from engine.training.detection.decode import decode
from engine.training.detection.loss import centernet_loss_reference

MAX_OBJECTS = 128  # object slots per image at most (objects past them are dropped with a warning)
TOP_K = 100  # detections per image (COCO's maxDets)
HEAT_PRIOR = 0.1  # the initial heat the heatmap bias gives (CenterNet: bias -2.19)
TERMS = ("focal", "size", "offset")
COLUMNS = ["epoch", "lr", "train_loss", "train_focal", "train_size", "train_offset", "val_loss", "val_focal",
           "val_size", "val_offset", "val_map50", "val_map", "seconds", "images_per_s"]

BACKEND_LINES = {
    "triton": "triton (fusenet's fused kernels: forward, backward, the CenterNet loss, optimizer and the decode "
              "peaks; top-k, box assembly and mAP run on PyTorch/NumPy)",
    "torch": "torch (plain PyTorch: torch.nn layers, the CenterNet reference loss, torch.optim; decoding and mAP "
             "on PyTorch/NumPy)",
}


def _weights(det) -> dict:
    return dict(size_weight=det.size_weight, offset_weight=det.offset_weight, alpha=det.alpha, beta=det.beta)


@dataclass
class DetectionTask:
    head: DetectionHead
    det: object  # dsl.train_config.DetectionConfig
    backend: str
    max_objects: int = 16

    @classmethod
    def of(cls, model, cfg, backend: str) -> "DetectionTask | None":
        """The task of a `loss centernet` spec, else None."""
        if getattr(cfg, "detection", None) is None:
            return None
        return cls(detection_head(model.input_shape, model.output_shape), cfg.detection, backend)

    @property
    def classes(self) -> int:
        return self.head.classes

    @staticmethod
    def init_head(model) -> str:
        """CenterNet's heatmap prior: the last layer's bias of every class channel set to
        -log((1 - PRIOR) / PRIOR) (-2.19: an initial heat of 0.1 everywhere, so the focal loss
        starts small instead of at sigmoid(0) = 0.5 on every background cell). Returns a note
        ("" when the last layer has no bias to set)."""
        last = model.graph.output
        params = dict(model.named_parameters())
        bias = params.get(f"{last.name}.bias") if last.name else None
        if bias is None or bias.dim() != 1:
            return ""
        classes = int(last.shape[0]) - 4
        value = -math.log((1.0 - HEAT_PRIOR) / HEAT_PRIOR)
        with torch.no_grad():
            bias[:classes] = value
        return f"heatmap bias of {last.name} set to {value:.2f} (CenterNet's prior)"

    def fit(self, ds) -> None:
        """Object slots per image: the most boxes any image of the set holds (at least 1, at most
        MAX_OBJECTS), a fixed shape for every step of the run."""
        most = max((len(b) for b in ds.boxes or []), default=0)
        self.max_objects = max(1, min(MAX_OBJECTS, most))

    def batches(self, ds, batch: int, **kw):
        """(x, DetectionBatch) batches of a detection set (engine.training.data.detection)."""
        from engine.training.data.detection import detection_batches

        return detection_batches(ds, batch, out_hw=self.head.out_hw, stride=self.head.stride,
                                 max_objects=self.max_objects, classes=self.classes, **kw)

    def loss_terms(self, out: torch.Tensor, targets) -> torch.Tensor:
        """fp32 [4] focal, size, offset, total of NCHW output `out` (the backend's loss)."""
        if self.backend == "triton":
            from engine.kernels.centernet import centernet_loss

            return centernet_loss(out.permute(0, 2, 3, 1).contiguous(), targets, **_weights(self.det))
        return centernet_loss_reference(out, targets, **_weights(self.det))

    @torch.no_grad()
    def evaluate(self, model, ds, batch: int = 256, dist=None, keep: bool = False) -> dict:
        """Loss terms (per image), mAP@0.5, mAP@[.5:.95] and AP per class over `ds` (this process's
        shard under torchrun: mAP is then this shard's). `keep`: also "dets", every image's detections."""
        from engine.training.detection.metrics import detection_map

        dev = dist.device if dist is not None else next(model.parameters()).device
        part = ds
        if dist is not None and dist.world > 1:
            part = ds.subset(torch.arange(dist.rank, len(ds), dist.world))
        was = model.training
        model.eval()
        sums = torch.zeros(5, dtype=torch.float64)  # total, focal, size, offset (x images), images
        dets, gts = [], []
        for x, yb in self.batches(part, batch):
            out = model(x.to(dev))
            t = yb.targets
            t = type(t)(**{k: getattr(t, k).to(dev) for k in ("heatmap", "index", "size", "offset", "mask")})
            terms = self.loss_terms(out, t).double().cpu()
            n = x.shape[0]
            sums += torch.cat([terms[3:4], terms[:3], torch.ones(1, dtype=torch.float64)]) * n
            dets += decode(out, self.head.stride, k=TOP_K, backend=self.backend)
            gts += list(yb.boxes)
        model.train(was)
        if dist is not None and dist.world > 1:
            sums = dist.all_sum(sums)
        n = max(sums[4].item(), 1.0)
        res = {"loss": sums[0].item() / n, "count": len(ds)}
        res.update({name: sums[1 + i].item() / n for i, name in enumerate(TERMS)})
        res.update(detection_map(dets, gts, self.classes))
        if keep:
            res["dets"], res["gts"] = dets, gts
        return res

    # -- the epoch's numbers -------------------------------------------------------------
    @staticmethod
    def train_terms(st: dict) -> dict:
        """train_focal, train_size, train_offset from the clock's sums (engine.kernels.clock)."""
        n = max(st["count"], 1.0)
        return {f"train_{name}": st["terms"][i] / n for i, name in enumerate(TERMS)}

    @staticmethod
    def validation_row(v: dict) -> dict:
        row = {"val_loss": v["loss"], "val_map50": v["map50"], "val_map": v["map"]}
        row.update({f"val_{name}": v[name] for name in TERMS})
        return row

    @staticmethod
    def no_validation_row(row: dict) -> dict:
        out = {"val_loss": row["train_loss"], "val_map50": "", "val_map": ""}
        out.update({f"val_{name}": row[f"train_{name}"] for name in TERMS})
        return out

    @staticmethod
    def epoch_line(cfg, row: dict) -> str:
        terms = " ".join(f"{name} {row[f'train_{name}']:.3f}" for name in TERMS)
        val = f"  val loss {row['val_loss']:.4f}"
        if row.get("val_map50") not in ("", None):
            val += f" mAP@0.5 {row['val_map50'] * 100:.1f}% mAP@[.5:.95] {row['val_map'] * 100:.1f}%"
        return (f"epoch {row['epoch']}/{cfg.epochs}  train loss {row['train_loss']:.4f} ({terms}){val}"
                f"  lr {row['lr']:.3g}  {row['images_per_s']:.0f} img/s  {row['seconds']:.1f}s")

    def draw(self, out: Path, raw, data, dist, history: list[dict], name: str, say, dets=None) -> None:
        """curves.png and predictions.png (validation images with predicted and true boxes)."""
        try:
            plot_curves(out / "curves.png", history, title=name)
        except Exception as e:  # noqa: BLE001 - a plotting failure must not hide the real outcome
            say(f"warning: could not draw curves.png ({e})")
        if data.val is None:
            return
        try:
            from engine.training.detection.draw import draw_detections

            val = data.val
            pick = list(range(min(16, len(val))))
            if dets is None:
                dets = self.evaluate(raw, val.subset(torch.tensor(pick)), dist=dist, keep=True)["dets"]
            ds = data.full
            draw_detections(val.x[pick], dets[:len(pick)], [val.boxes[i] for i in pick], ds.classes,
                            out / "predictions.png", mean=ds.mean, std=ds.std)
        except Exception as e:  # noqa: BLE001 - as above
            say(f"warning: could not draw predictions.png ({e})")


def plot_curves(path, rows: Sequence[dict], title: str = "") -> None:
    """Loss per epoch (total and each term, train solid, validation dashed) and validation mAP."""
    from engine.training.report import _plt

    plt = _plt()
    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    num = lambda v: v if isinstance(v, (int, float)) and math.isfinite(v) else float("nan")  # noqa: E731
    for key, colour in (("loss", "C0"), ("focal", "C1"), ("size", "C2"), ("offset", "C3")):
        label = "total" if key == "loss" else key
        a.plot(ep, [num(r.get(f"train_{key}")) for r in rows], "o-", color=colour, label=f"train {label}")
        a.plot(ep, [num(r.get(f"val_{key}")) for r in rows], "s--", color=colour, label=f"validation {label}")
    a.set_yscale("log")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(fontsize=7), a.grid(alpha=0.3, which="both")
    b.plot(ep, [num(r.get("val_map50")) for r in rows], "o-", label="mAP@0.5")
    b.plot(ep, [num(r.get("val_map")) for r in rows], "s-", label="mAP@[.5:.95]")
    b.set_ylim(0, 1)
    b.set_xlabel("epoch"), b.set_ylabel("validation mAP"), b.legend(fontsize=8), b.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def format_eval(res: dict, classes: Sequence[str]) -> str:
    """What `fusenet eval` prints for a detection network: loss terms, mAP, AP per class."""
    from engine.text import format_table

    lines = [f"images: {res['count']}",
             f"loss: {res['loss']:.4f} (focal {res['focal']:.4f}, size {res['size']:.4f}, offset {res['offset']:.4f})",
             f"mAP@0.5:      {res['map50'] * 100:.1f}%",
             f"mAP@[.5:.95]: {res['map'] * 100:.1f}%", ""]
    rows = []
    for i, (a50, a) in enumerate(zip(res["ap50_per_class"], res["ap_per_class"])):
        name = classes[i] if i < len(classes) else str(i)
        fmt = lambda v: "-" if v is None or v != v or v < 0 else f"{v * 100:.1f}%"  # noqa: E731
        rows.append((name, fmt(a50), fmt(a)))
    lines.append(format_table(("class", "AP@0.5", "AP@[.5:.95]"), rows, align="lrr"))
    return "\n".join(lines)
