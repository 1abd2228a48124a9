"""The training loop: optimizers, schedules, clipping, early stopping, the NaN guard,
data parallelism (torch.distributed), resume, transfer learning (init, freeze).

`run_training(model, cfg, out_dir, ...)` trains a compiled network (the
`engine.compile` API: `train_config`, `source_text`, `name`, `input_shape`,
`output_shape`, `tap_layers`, `forward(x, taps=())`) and writes the run folder:
model.safetensors (after every epoch, atomically), metrics.csv, curves.png and
predictions.png.
"""
from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from engine.training import checkpoint as ckpt
from engine.training import data as D
from engine.training import report
from engine import precision
from engine.errors import FusenetTrainError

CHECKPOINT = "model.safetensors"
OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}


# ----------------------------------------------------------------------------- optimizer, loss, schedule


def build_optimizer(params, ocfg, backend: str) -> tuple[torch.optim.Optimizer, str]:
    """The spec's optimizer: fused Triton (`engine.kernels.optim`) or torch.optim for backend torch."""
    cls_name = OPTIMIZERS.get(ocfg.name)
    if cls_name is None:
        raise FusenetTrainError(f"unknown optimizer '{ocfg.name}' (known: {', '.join(OPTIMIZERS)})")
    if backend == "torch":
        cls, impl = getattr(torch.optim, cls_name), "torch.optim"
    else:
        try:
            import engine.kernels.optim as fused
            cls = getattr(fused, cls_name)
        except (ImportError, AttributeError) as e:
            raise FusenetTrainError(
                f"backend triton needs the fused optimizer engine.kernels.optim.{cls_name}, which is not "
                f"available ({e}); use --backend torch to train with torch.optim") from None
        impl = "fused Triton, engine.kernels.optim"
    if ocfg.name == "sgd":
        opt = cls(params, lr=ocfg.lr, momentum=ocfg.momentum, nesterov=ocfg.nesterov, weight_decay=ocfg.weight_decay)
    else:
        opt = cls(params, lr=ocfg.lr, betas=(ocfg.beta1, ocfg.beta2), eps=ocfg.eps, weight_decay=ocfg.weight_decay)
    return opt, f"{cls_name} ({impl})"


def loss_fn(backend: str, label_smoothing: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Mean softmax cross-entropy of logits [N,K] or [N,K,H,W] (NCHW) against labels [N] or [N,H,W]."""
    ls = float(label_smoothing)
    if backend == "torch":
        return lambda out, y: F.cross_entropy(out.float(), y, label_smoothing=ls)
    try:
        from engine.kernels.loss import cross_entropy
    except ImportError as e:
        raise FusenetTrainError(
            f"backend triton needs the fused loss engine.kernels.loss.cross_entropy, which is not available "
            f"({e}); use --backend torch") from None
    if ls:
        try:
            ok = "label_smoothing" in inspect.signature(cross_entropy).parameters
        except (TypeError, ValueError):
            ok = True
        if not ok:
            raise FusenetTrainError("the fused Triton cross-entropy does not take label_smoothing; "
                                    "remove it from the spec or use --backend torch")
    kw = {"label_smoothing": ls} if ls else {}

    def fused_loss(out, y):
        if out.ndim == 4:  # the kernel takes NHWC logits for segmentation
            out = out.permute(0, 2, 3, 1).contiguous()
        return cross_entropy(out, y, **kw)

    return fused_loss


class LRSchedule:
    """Learning rate per step: constant | step | cosine | plateau, with linear warmup.

    Warmup ramps linearly over `warmup` epochs, per step. `step` multiplies by gamma
    every step_size epochs (as torch's StepLR). `cosine` anneals per step from the
    end of warmup to the last step down to min_lr (as CosineAnnealingLR).
    `plateau` follows ReduceLROnPlateau (mode min, relative threshold 1e-4).
    """

    def __init__(self, cfg, base_lr: float, epochs: int, steps_per_epoch: int):
        if cfg.name not in ("constant", "step", "cosine", "plateau"):
            raise FusenetTrainError(f"unknown schedule '{cfg.name}' (known: constant, step, cosine, plateau)")
        self.cfg, self.base, self.epochs, self.spe = cfg, float(base_lr), int(epochs), max(1, int(steps_per_epoch))
        self.plateau_lr = self.base
        self.best = math.inf
        self.bad = 0

    def lr(self, epoch: int, step: int) -> float:
        """`epoch` counts from 0, `step` within the epoch from 0."""
        c = self.cfg
        g = epoch * self.spe + step
        warm = c.warmup * self.spe
        factor = (g + 1) / warm if g < warm else 1.0
        if c.name == "constant":
            lr = self.base
        elif c.name == "step":
            lr = self.base * c.gamma ** (epoch // c.step_size)
        elif c.name == "cosine":
            total = max(1, self.epochs * self.spe - warm)
            t = min(max(g - warm, 0), total)
            lr = c.min_lr + (self.base - c.min_lr) * (1 + math.cos(math.pi * t / total)) / 2
        else:
            lr = self.plateau_lr
        return lr * factor

    def end_epoch(self, metric: float) -> None:
        if self.cfg.name != "plateau" or metric != metric:
            return
        if metric < self.best * (1 - 1e-4) if self.best > 0 else metric < self.best:
            self.best, self.bad = metric, 0
        else:
            self.bad += 1
        if self.bad > self.cfg.patience:
            new = max(self.plateau_lr * self.cfg.factor, self.cfg.min_lr)
            if self.plateau_lr - new > 1e-8:
                self.plateau_lr = new
            self.bad = 0

    def state_dict(self) -> dict:
        return {"plateau_lr": self.plateau_lr, "best": self.best if self.best < math.inf else None, "bad": self.bad}

    def load_state_dict(self, s: dict) -> None:
        self.plateau_lr = float(s.get("plateau_lr", self.base))
        self.best = math.inf if s.get("best") is None else float(s["best"])
        self.bad = int(s.get("bad", 0))


# ----------------------------------------------------------------------------- init and freeze

RELU_FAMILY = ("relu", "leaky_relu", "gelu", "silu")  # ops that get Kaiming initialisation


def init_weights(model: torch.nn.Module, seed: int) -> str:
    """Seeded initialisation: Kaiming (fan_in, ReLU gain) for ReLU-family networks,
    PyTorch's default rule otherwise; BN weight 1, bias 0. Returns a description."""
    torch.manual_seed(seed)
    relu = any(node.op in RELU_FAMILY for node in model.graph)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            prefix, _, kind = name.rpartition(".")
            w = params.get(f"{prefix}.weight")
            if w is not None and w.dim() in (2, 4):  # conv / linear
                fan_in = w[0].numel()
                if kind == "weight":
                    if relu:
                        torch.nn.init.kaiming_normal_(p, mode="fan_in", nonlinearity="relu")
                    else:
                        torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                elif kind == "bias":
                    if relu:
                        p.zero_()
                    else:
                        b = 1 / math.sqrt(fan_in) if fan_in else 0
                        p.uniform_(-b, b)
            elif w is not None and w.dim() == 1:  # batch norm
                p.fill_(1.0 if kind == "weight" else 0.0)
    return "Kaiming normal (ReLU family)" if relu else "PyTorch default (no ReLU-family activation)"


def _matches(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def freeze(model: torch.nn.Module, names) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Stop training the layers of the named taps: their parameters get no gradient and
    their buffers (BN statistics) are restored after every step. Returns (params, buffer snapshot)."""
    if not names:
        return [], {}
    taps = getattr(model, "tap_layers", {}) or {}
    unknown = [n for n in names if n not in taps]
    if unknown:
        raise FusenetTrainError(
            f"freeze: no tap named {', '.join(unknown)} in network '{getattr(model, 'name', '?')}' "
            f"(named taps: {', '.join(taps) or 'none; bind one with  name = layer ...'})")
    prefixes = [p for n in names for p in taps[n]]
    frozen = []
    for k, p in model.named_parameters():
        if _matches(k, prefixes):
            p.requires_grad_(False)
            frozen.append(k)
    snap = {k: b.detach().clone() for k, b in model.named_buffers() if _matches(k, prefixes)}
    return frozen, snap


def _restore_buffers(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    if snap:
        bufs = dict(model.named_buffers())
        with torch.no_grad():
            for k, v in snap.items():
                bufs[k].copy_(v)


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu() if t.device.type != "cpu" else t

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def setup_distributed() -> Dist:
    """Join the process group that torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*):
    NCCL on GPUs, gloo on CPU. A single process when WORLD_SIZE is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return Dist(device=torch.device("cuda") if cuda else torch.device("cpu"))
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local, torch.device(f"cuda:{local}") if cuda else torch.device("cpu"))


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, ds: D.Dataset, lossf, batch: int = 1024, dist: Dist | None = None,
             num_classes: int | None = None) -> dict:
    """Loss, accuracy and the confusion matrix over `ds` (sharded across processes)."""
    dist = dist or Dist()
    was = model.training
    model.eval()
    k = num_classes or len(ds.classes)
    sums = torch.zeros(3, dtype=torch.float64)  # loss*n, correct, n
    conf = torch.zeros(k, k, dtype=torch.int64)
    part = ds if dist.world == 1 else ds.subset(torch.arange(dist.rank, len(ds), dist.world))
    for x, y in D.batches(part, batch):
        x, y = x.to(dist.device), y.to(dist.device)
        out = model(x)
        pred = out.argmax(1)
        n = y.numel()
        sums += torch.tensor([float(lossf(out, y)) * n, float((pred == y).sum()), float(n)], dtype=torch.float64)
        conf += report.confusion_matrix(pred.cpu(), y.cpu(), k)
    sums, conf = dist.all_sum(sums), dist.all_sum(conf)
    model.train(was)
    n = max(sums[2].item(), 1.0)
    res = {"loss": sums[0].item() / n, "acc": sums[1].item() / n, "confusion": conf, "count": len(ds)}
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


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    out_dir: Path
    history: list[dict]
    stopped: str  # "completed" | "early_stop" | "already_complete"
    best_epoch: int = 0


def _nan_message(loss, epoch, step, gstep, lr, cfg, out: Path, last_epoch: int) -> str:
    kept = (f"the last good checkpoint (epoch {last_epoch}) is kept at {out / CHECKPOINT}"
            if last_epoch > 0 else "no checkpoint was written (the first epoch did not finish)")
    causes = [f"a learning rate too high for this network (lr is {lr:.3g} at this step)"]
    if not cfg.clip_grad:
        causes.append("exploding gradients (add  clip_grad 1.0  to the train section)")
    if cfg.precision == "fp16":
        causes.append("fp16 overflow (try  precision bf16  or fp32)")
    causes.append("NaN or Inf values in the input data")
    return (f"loss became {loss} at epoch {epoch}, step {step} (global step {gstep}); training stopped. "
            f"Likely causes: {'; '.join(causes)}. {kept[0].upper() + kept[1:]}.")


def run_training(model: torch.nn.Module, cfg, out_dir: str | Path, *, backend: str = "torch",
                 resume: bool = False, init: str | None = None, progress: bool = True,
                 log: Callable[[str], None] = print, dist: Dist | None = None,
                 callback: Callable[[int, dict], None] | None = None,
                 dataset: D.Dataset | None = None) -> TrainResult:
    """Train `model` with TrainConfig `cfg`, writing the run folder `out_dir` (rank 0 only)."""
    dist = dist or Dist()
    out = Path(out_dir)
    say = log if dist.main else (lambda *_: None)
    if resume and init:
        raise FusenetTrainError("--resume and --init cannot be combined: resume continues a run, init starts one")
    if cfg.batch % dist.world:
        raise FusenetTrainError(f"batch {cfg.batch} does not split evenly over {dist.world} processes")
    name = getattr(model, "name", "network")

    # data, checked against the network before anything else happens
    ds = dataset or D.load_dataset(cfg.data, input_shape=model.input_shape,
                                   num_classes=int(model.output_shape[0]), seed=cfg.seed)
    D.check_compatible(ds, model.input_shape, model.output_shape, name)
    train_ds, val_ds = D.split(ds, cfg.split, cfg.seed) if cfg.split > 0 else (ds, None)
    if len(train_ds) < cfg.batch:
        raise FusenetTrainError(f"batch {cfg.batch} is larger than the {len(train_ds)} training images")
    say(f"data: {ds.describe()}; {len(train_ds)} train / {len(val_ds) if val_ds else 0} validation")
    k = int(model.output_shape[0])

    # model state: fresh (seeded init, optional transfer) or resumed
    raw = model
    say("backend: " + (
        "triton (fusenet's fused kernels, forward, backward, loss and optimizer)"
        if backend == "triton" else "torch (plain PyTorch: torch.nn layers, F.cross_entropy, torch.optim)"))
    ck = None
    if resume:
        ck = ckpt.load_checkpoint(out / CHECKPOINT)
        ckpt.load_into_model(ck, raw, name)
        if ck.meta.get("spec") and ck.meta["spec"] != getattr(model, "source_text", ck.meta["spec"]):
            say("note: the spec text differs from the checkpoint's; the network matches, so training continues")
    else:
        say(f"init: {init_weights(raw, cfg.seed)}, seed {cfg.seed}")
        if init:
            src = ckpt.load_checkpoint(init)
            loaded, skipped = ckpt.init_from(src, raw)
            say(f"init from {init}: loaded {len(loaded)} tensors ({', '.join(loaded) or 'none'})")
            if skipped:
                say(f"  not loaded (name or shape differs): {', '.join(skipped)}")
    frozen, frozen_bufs = freeze(raw, cfg.freeze)
    if frozen:
        say(f"frozen ({', '.join(cfg.freeze)}): {', '.join(frozen)}")
    raw.to(dist.device)
    trainable = [p for p in raw.parameters() if p.requires_grad]
    if not trainable:
        raise FusenetTrainError("every layer is frozen: nothing to train")
    opt, impl = build_optimizer(trainable, cfg.optimizer, backend)
    say(f"optimizer: {impl}")
    lossf, eval_lossf = loss_fn(backend, cfg.label_smoothing), loss_fn(backend, 0.0)

    net = raw
    if dist.world > 1:
        if cfg.sync_bn:
            if backend != "torch" or dist.device.type != "cuda":
                raise FusenetTrainError("sync_bn needs backend torch on GPUs (NCCL); statistics stay per process otherwise")
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
        say(f"data parallel: {dist.world} processes, {cfg.batch // dist.world} images each per step")

    autocast = precision.autocast_dtype(cfg.precision) if backend == "torch" else None
    if precision.uses_tf32(cfg.precision) and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    scaler = torch.amp.GradScaler(enabled=autocast is torch.float16 and dist.device.type == "cuda")

    spe = len(train_ds) // cfg.batch
    sched = LRSchedule(cfg.schedule, cfg.optimizer.lr, cfg.epochs, spe)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    best_val, bad_epochs, best_epoch, start = math.inf, 0, 0, 1
    data_meta = {"name": ds.name, "classes": ds.classes, "mean": list(ds.mean), "std": list(ds.std),
                 "task": ds.task, "split": cfg.split, "seed": cfg.seed}
    if ck is not None:
        ckpt.load_into_optimizer(ck, opt)
        ts = ck.meta.get("train_state", {})
        sched.load_state_dict(ts.get("schedule", {}))
        history = list(ts.get("history", []))
        best_val = math.inf if ts.get("best_val") is None else float(ts["best_val"])
        bad_epochs, best_epoch = int(ts.get("bad_epochs", 0)), int(ts.get("best_epoch", 0))
        start = ck.epoch + 1
        if "torch" in ck.rng:
            torch.set_rng_state(ck.rng["torch"])
        if "data" in ck.rng:
            gen.set_state(ck.rng["data"])
        if "cuda" in ck.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(ck.rng["cuda"])
        if ts.get("stopped") == "early_stop" or start > cfg.epochs:
            say(f"nothing to resume: the run in {out} already finished at epoch {ck.epoch}")
            return TrainResult(out, history, "already_complete", best_epoch)
        say(f"resuming from {out / CHECKPOINT} at epoch {start}")

    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    stopped, last_good = "completed", start - 1
    net.train()
    try:
        for epoch in range(start, cfg.epochs + 1):
            t0 = time.perf_counter()
            order = D.epoch_order(len(train_ds), gen)
            bar = None
            if progress and dist.main:
                from tqdm import tqdm

                bar = tqdm(total=spe, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True)
            sums = torch.zeros(3, dtype=torch.float64)
            lr = sched.lr(epoch - 1, 0)
            for step, (x, y) in enumerate(D.batches(train_ds, cfg.batch, order=order, drop_last=True,
                                                    augment_cfg=cfg.augment, gen=gen, rank=dist.rank,
                                                    world=dist.world)):
                lr = sched.lr(epoch - 1, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
                with torch.autocast(dist.device.type, dtype=autocast, enabled=autocast is not None):
                    outp = net(x)
                    loss = lossf(outp, y)
                seen = loss.detach().float().reshape(1).clone()
                if dist.world > 1:
                    seen = dist.all_sum(seen) / dist.world
                if not torch.isfinite(seen).all():
                    gstep = (epoch - 1) * spe + step + 1
                    raise FusenetTrainError(_nan_message(seen.item(), epoch, step + 1, gstep, lr, cfg, out, last_good))
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad)
                scaler.step(opt)
                scaler.update()
                _restore_buffers(raw, frozen_bufs)
                n = y.numel()
                correct = float((outp.detach().argmax(1) == y).sum())
                local = loss.detach().float().item() if dist.world > 1 else seen.item()
                sums += torch.tensor([local * n, correct, n], dtype=torch.float64)
                if bar is not None:
                    el = time.perf_counter() - t0
                    bar.update(1)
                    bar.set_postfix(loss=f"{seen.item():.4f}", acc=f"{correct / n:.3f}",
                                    img_s=f"{(step + 1) * cfg.batch / max(el, 1e-9):.0f}")
            if bar is not None:
                bar.close()
            sums = dist.all_sum(sums)
            train_time = time.perf_counter() - t0
            row = {"epoch": epoch, "lr": lr, "train_loss": sums[0].item() / sums[2].item(),
                   "train_acc": sums[1].item() / sums[2].item()}
            if val_ds is not None:
                v = evaluate(net, val_ds, eval_lossf, batch=max(1024, cfg.batch), dist=dist, num_classes=k)
                row.update(val_loss=v["loss"], val_acc=v["acc"], val_miou=v.get("miou", ""))
            else:
                row.update(val_loss=row["train_loss"], val_acc=float("nan"), val_miou="")
            row.update(seconds=round(time.perf_counter() - t0, 3), images_per_s=round(spe * cfg.batch / train_time, 1))
            history.append(row)
            sched.end_epoch(row["val_loss"])
            if row["val_loss"] < best_val:
                best_val, bad_epochs, best_epoch = row["val_loss"], 0, epoch
            else:
                bad_epochs += 1
            early = bool(cfg.early_stop) and bad_epochs >= cfg.early_stop
            miou = f" mIoU {row['val_miou'] * 100:.1f}%" if row.get("val_miou") not in ("", None) else ""
            acc_name = "pixel acc" if ds.task == "segment" else "acc"
            say(f"epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f} {acc_name} {row['train_acc'] * 100:.1f}%"
                f"  val loss {row['val_loss']:.4f} {acc_name} {row['val_acc'] * 100:.1f}%{miou}"
                f"  lr {lr:.3g}  {row['images_per_s']:.0f} img/s  {row['seconds']:.1f}s")
            if dist.main:
                rng = {"torch": torch.get_rng_state(), "data": gen.get_state()}
                if torch.cuda.is_available():
                    rng["cuda"] = torch.cuda.get_rng_state()
                state = {"history": history, "schedule": sched.state_dict(), "best_val": best_val,
                         "bad_epochs": bad_epochs, "best_epoch": best_epoch,
                         "stopped": "early_stop" if early else ""}
                ckpt.save_checkpoint(out / CHECKPOINT, raw, network=name, spec=getattr(model, "source_text", ""),
                                     epoch=epoch, optimizer=opt, rng=rng, train_state=state, data=data_meta)
                report.write_metrics_csv(out / "metrics.csv", history)
            dist.barrier()
            last_good = epoch
            if callback is not None:
                callback(epoch, row)
            if early:
                say(f"early stop: validation loss has not improved for {cfg.early_stop} epochs "
                    f"(best {best_val:.4f} at epoch {best_epoch})")
                stopped = "early_stop"
                break
    finally:
        if dist.main and history:
            try:
                report.plot_curves(out / "curves.png", history, title=name)
            except Exception as e:  # noqa: BLE001 - a plotting failure must not hide the real outcome
                say(f"warning: could not draw curves.png ({e})")
    if dist.main and val_ds is not None:
        sample = val_ds.subset(torch.arange(min(36, len(val_ds))))
        pred = predict(raw, sample.x.to(dist.device)).argmax(1).cpu()
        report.plot_predictions(out / "predictions.png", sample.x, pred, sample.y, ds.classes, ds.mean, ds.std)
    return TrainResult(out, history, stopped, best_epoch)
