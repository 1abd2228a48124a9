"""A trained network on data, without training it: loss, accuracy and the
confusion matrix over a data set (`evaluate`, sharded across processes), and
logits for a batch of images (`predict`). Both run in eval mode and restore the
network's mode afterwards."""
from __future__ import annotations

import torch

from engine.training import report
from engine.training.data import Dataset, batches
from engine.training.distributed import Dist


@torch.no_grad()
def evaluate(model, ds: Dataset, lossf, batch: int = 1024, dist: Dist | None = None,
             num_classes: int | None = None, keep_predictions: bool = False) -> dict:
    """Loss, accuracy and the confusion matrix over `ds` (sharded across processes); with
    `keep_predictions` in a single process, also "pred": the predicted classes (what
    predictions.png shows, without a second pass over the data)."""
    dist = dist or Dist()
    was = model.training
    model.eval()
    k = num_classes or len(ds.classes)
    sums = torch.zeros(3, dtype=torch.float64)  # loss*n, correct, n
    conf = torch.zeros(k, k, dtype=torch.int64)
    kept = []
    part = ds if dist.world == 1 else ds.subset(torch.arange(dist.rank, len(ds), dist.world))
    for x, y in batches(part, batch):
        x, y = x.to(dist.device), y.to(dist.device)
        out = model(x)
        pred = out.argmax(1)
        n = y.numel()
        sums += torch.tensor([float(lossf(out, y)) * n, float((pred == y).sum()), float(n)], dtype=torch.float64)
        conf += report.confusion_matrix(pred.cpu(), y.cpu(), k)
        if keep_predictions:
            kept.append(pred.cpu())
    sums, conf = dist.all_sum(sums), dist.all_sum(conf)
    model.train(was)
    n = max(sums[2].item(), 1.0)
    res = {"loss": sums[0].item() / n, "acc": sums[1].item() / n, "confusion": conf, "count": len(ds)}
    if keep_predictions and dist.world == 1 and kept:
        res["pred"] = torch.cat(kept)
    if ds.task == "segment":
        res["miou"] = report.summarise(conf)["mean_iou"]
    return res


@torch.no_grad()
def predict(model, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Logits for a tensor of images, in eval mode."""
    was = model.training
    model.eval()
    outs = [model(x[i:i + batch]) for i in range(0, len(x), batch)]
    model.train(was)
    return torch.cat(outs)
