"""The training loop: one run from data and a compiled network to a run folder.

`run_training(model, cfg, out_dir, ...)` trains a compiled network (the
`engine.compile` API: `train_config`, `source_text`, `name`, `input_shape`,
`output_shape`, `tap_layers`, `forward(x, taps=())`) and writes the run folder:
model.safetensors (after every epoch, atomically), metrics.csv, curves.png and
predictions.png.

A run, step by step (each step is one function below):
1. `_check_request`   --resume and --init exclusive; the batch splits over the processes;
2. `_load_data`       the data, checked against the network, split train/validation;
3. `_prepare_weights` resumed from the checkpoint, or seeded init (and transfer); freezing;
4. `_build_machinery` optimizer, losses, data parallelism, mixed precision, schedule;
5. `_resume_progress` optimizer, schedule, history and random states from the checkpoint;
   then the training step (step.py: captured in a CUDA graph on CUDA unless
   `cuda_graphs=False`, the CLI's --no-cuda-graphs);
6. per epoch: `_train_epoch`, `_validate`, `check_finite` (guard.py: the NaN guard),
   `_record_epoch` (best epoch, early stop), `_log_epoch`, `_save_checkpoint`;
7. `_draw_curves` (also after an error) and `_draw_predictions`.
The pieces live beside this module: step.py, guard.py, schedule.py, init.py,
optimizer_and_loss.py, distributed.py, evaluate.py, checkpoint.py, report.py and data/.

No host sync per step: the step keeps the epoch's running loss and accuracy and
the NaN/inf flag on the device, and the loop reads them every
`step.GUARD_EVERY` (50) steps and at the end of the epoch. A diverged model (a
non-finite training loss, validation loss or weight) stops the run with a
FusenetTrainError naming where it happened, before anything is saved: the last
good checkpoint is never replaced.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engine import precision
from engine.errors import FusenetTrainError
from engine.training import checkpoint as ckpt
from engine.training import data as D
from engine.training import report
from engine.training.detection.run import BACKEND_LINES as DETECTION_BACKEND_LINES
from engine.training.detection.run import COLUMNS as DETECTION_COLUMNS
from engine.training.detection.run import DetectionTask
from engine.training.distributed import Dist
from engine.training.evaluate import evaluate, predict
from engine.training.guard import check_finite, read_guard
from engine.training.init import freeze, init_weights
from engine.training.optimizer_and_loss import build_optimizer, loss_fn
from engine.training.progress import progress_bar
from engine.training.schedule import LRSchedule
from engine.training.step import GUARD_EVERY, TrainStep

CHECKPOINT = "model.safetensors"
BACKEND_LINES = {
    "triton": "triton (fusenet's fused kernels, forward, backward, loss and optimizer)",
    "torch": "torch (plain PyTorch: torch.nn layers, F.cross_entropy, torch.optim)",
}


@dataclass
class TrainResult:
    out_dir: Path
    history: list[dict]
    stopped: str  # "completed" | "early_stop" | "already_complete"
    best_epoch: int = 0


@dataclass
class _Data:
    full: D.Dataset
    train: D.Dataset
    val: D.Dataset | None

    def meta(self, cfg) -> dict:
        """What a checkpoint records about the data (eval and predict apply the same normalisation)."""
        ds = self.full
        return {"name": ds.name, "classes": ds.classes, "mean": list(ds.mean), "std": list(ds.std),
                "pixel_scale": ds.pixel_scale, "pixel_range": list(ds.pixel_range),
                "task": ds.task, "split": cfg.split, "seed": cfg.seed}


@dataclass
class _Machinery:
    """What runs a step: the network (wrapped for data parallelism), optimizer, losses and schedule."""

    raw: torch.nn.Module  # the compiled network itself (what is checkpointed)
    net: torch.nn.Module  # raw, or its DistributedDataParallel wrapper
    trainable: list[torch.Tensor]
    frozen_buffers: dict[str, torch.Tensor]
    opt: torch.optim.Optimizer
    lossf: Callable
    eval_lossf: Callable  # without label smoothing, so validation losses compare across specs
    autocast: torch.dtype | None
    scaler: torch.amp.GradScaler
    sched: LRSchedule
    gen: torch.Generator  # data order and augmentation
    steps_per_epoch: int
    step: TrainStep | None = None  # made once the resumed progress is known
    task: DetectionTask | None = None  # loss centernet: the detection pieces (engine.training.detection.run)


@dataclass
class _Progress:
    """What resume restores and every epoch updates."""

    history: list[dict] = field(default_factory=list)
    best_val: float = math.inf
    bad_epochs: int = 0
    best_epoch: int = 0
    start: int = 1  # the first epoch this process trains


def run_training(model: torch.nn.Module, cfg, out_dir: str | Path, *, backend: str = "torch",
                 resume: bool = False, init: str | None = None, progress: bool | str = True,
                 log: Callable[[str], None] = print, dist: Dist | None = None,
                 callback: Callable[[int, dict], None] | None = None,
                 dataset: D.Dataset | None = None, cuda_graphs: bool = True) -> TrainResult:
    """Train `model` with TrainConfig `cfg`, writing the run folder `out_dir` (rank 0 only).

    `progress`: True or "bar" for a progress bar, "lines" for a plain line every
    PROGRESS_EVERY_S seconds (no terminal: CI, `| tee`, nohup), False for none.
    curves.png and predictions.png are redrawn after every epoch.
    `cuda_graphs`: capture the training step in a CUDA graph (CUDA, backend triton)."""
    dist = dist or Dist()
    out = Path(out_dir)
    say = log if dist.main else (lambda *_: None)
    name = getattr(model, "name", "network")
    _check_request(cfg, resume, init, dist)
    data = _load_data(model, cfg, dataset, name, say)
    say("backend: " + (DETECTION_BACKEND_LINES if cfg.detection is not None else BACKEND_LINES)[
        "triton" if backend == "triton" else "torch"])
    ck, frozen_buffers = _prepare_weights(model, cfg, out / CHECKPOINT if resume else None, init, name, say)
    m = _build_machinery(model, cfg, backend, dist, len(data.train), frozen_buffers, say)
    if m.task is not None:
        m.task.fit(data.full)
    state = _Progress()
    if ck is not None and not _resume_progress(ck, m, cfg, state, out, say):
        return TrainResult(out, state.history, "already_complete", state.best_epoch)
    m.step = _make_step(m, cfg, backend, dist, state, cuda_graphs, say)

    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    stopped, last_good = "completed", state.start - 1
    m.net.train()
    try:
        for epoch in range(state.start, cfg.epochs + 1):
            t0 = time.perf_counter()
            row = _train_epoch(m, cfg, data.train, dist, epoch, progress, out, last_good)
            if m.step.capture_error:  # once: the step fell back to eager execution
                say(f"CUDA graphs: the capture failed, the step runs eagerly ({m.step.capture_error})")
                m.step.capture_error = ""
            train_time = time.perf_counter() - t0
            val_pred = _validate(m, cfg, data.val, dist, row, _classes(model, cfg))
            check_finite(m.raw, cfg, row, epoch, out / CHECKPOINT, last_good)
            row.update(seconds=round(time.perf_counter() - t0, 3),
                       images_per_s=round(m.steps_per_epoch * cfg.batch / train_time, 1))
            early = _record_epoch(m, cfg, state, row)
            say(m.task.epoch_line(cfg, row)) if m.task is not None else _log_epoch(say, cfg, row, data.full.task)
            if dist.main:
                _save_checkpoint(out, model, m, name, epoch, state, early, data.meta(cfg))
                if m.task is not None:
                    m.task.draw(out, m.raw, data, dist, state.history, name, say, val_pred)
                else:
                    _draw_plots(out, m.raw, data, dist, state.history, name, cfg, say, val_pred)
            dist.barrier()
            last_good = epoch
            if callback is not None:
                callback(epoch, row)
            if early:
                say(f"early stop: validation loss has not improved for {cfg.early_stop} epochs "
                    f"(best {state.best_val:.4f} at epoch {state.best_epoch})")
                stopped = "early_stop"
                break
    finally:
        m.step.close()
        if dist.main and state.history and m.task is None:
            _draw_curves(out, state.history, name, say, cfg.label_smoothing)
    return TrainResult(out, state.history, stopped, state.best_epoch)


# ----------------------------------------------------------------------------- setting up


def _classes(model, cfg) -> int:
    """The network's class count: its outputs, or for `loss centernet` its heatmaps (outputs - 4)."""
    return int(model.output_shape[0]) - (4 if cfg.detection is not None else 0)


def _check_request(cfg, resume: bool, init: str | None, dist: Dist) -> None:
    if resume and init:
        raise FusenetTrainError("--resume and --init cannot be combined: resume continues a run, init starts one")
    if cfg.batch % dist.world:
        raise FusenetTrainError(f"batch {cfg.batch} does not split evenly over {dist.world} processes")


def _load_data(model, cfg, dataset: D.Dataset | None, name: str, say) -> _Data:
    """The data, checked against the network before anything else happens, and its split."""
    ds = dataset or D.load_dataset(cfg.data, input_shape=model.input_shape,
                                   num_classes=_classes(model, cfg), seed=cfg.seed)
    D.check_compatible(ds, model.input_shape, model.output_shape, name)
    D.check_trainable(ds)
    train_ds, val_ds = D.split(ds, cfg.split, cfg.seed) if cfg.split > 0 else (ds, None)
    if len(train_ds) < cfg.batch:
        raise FusenetTrainError(f"batch {cfg.batch} is larger than the {len(train_ds)} training images")
    say(f"data: {ds.describe()}; {len(train_ds)} train / {len(val_ds) if val_ds else 0} validation")
    return _Data(ds, train_ds, val_ds)


def _prepare_weights(model, cfg, resume_from: Path | None, init: str | None, name: str, say):
    """Weights resumed from `resume_from`, or a seeded init (and a transfer from `init`); then
    the frozen layers. Returns (the resumed checkpoint or None, the frozen layers' buffers)."""
    ck = None
    if resume_from is not None:
        ck = ckpt.load_checkpoint(resume_from)
        ckpt.load_into_model(ck, model, name)
        if ck.meta.get("spec") and ck.meta["spec"] != getattr(model, "source_text", ck.meta["spec"]):
            say("note: the spec text differs from the checkpoint's; the network matches, so training continues")
    else:
        say(f"init: {init_weights(model, cfg.seed)}, seed {cfg.seed}")
        if cfg.detection is not None and (note := DetectionTask.init_head(model)):
            say(f"init: {note}")
        if init:
            src = ckpt.load_checkpoint(init)
            loaded, skipped = ckpt.init_from(src, model)
            say(f"init from {init}: loaded {len(loaded)} tensors ({', '.join(loaded) or 'none'})")
            if skipped:
                say(f"  not loaded (name or shape differs): {', '.join(skipped)}")
    frozen, frozen_buffers = freeze(model, cfg.freeze)
    if frozen:
        say(f"frozen ({', '.join(cfg.freeze)}): {', '.join(frozen)}")
    return ck, frozen_buffers


def _data_parallel(raw: torch.nn.Module, cfg, backend: str, dist: Dist, say) -> torch.nn.Module:
    """`raw` wrapped in DistributedDataParallel (and SyncBatchNorm if asked) under torchrun."""
    if dist.world == 1:
        return raw
    net = raw
    if cfg.sync_bn:
        if backend != "torch" or dist.device.type != "cuda":
            raise FusenetTrainError("sync_bn needs backend torch on GPUs (NCCL); statistics stay per process otherwise")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = DDP(net, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    say(f"data parallel: {dist.world} processes, {cfg.batch // dist.world} images each per step")
    return net


def _build_machinery(raw, cfg, backend: str, dist: Dist, n_train: int, frozen_buffers, say) -> _Machinery:
    raw.to(dist.device)
    trainable = [p for p in raw.parameters() if p.requires_grad]
    if not trainable:
        raise FusenetTrainError("every layer is frozen: nothing to train")
    opt, impl = build_optimizer(trainable, cfg.optimizer, backend)
    say(f"optimizer: {impl}")
    lossf, eval_lossf = loss_fn(backend, cfg.label_smoothing), loss_fn(backend, 0.0)
    net = _data_parallel(raw, cfg, backend, dist, say)
    # mixed precision: the torch backend autocasts to fp16/bf16; the Triton backend's kernels
    # already compute in the network's precision
    autocast = precision.autocast_dtype(cfg.precision) if backend == "torch" else None
    if precision.uses_tf32(cfg.precision) and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    scaler = torch.amp.GradScaler(enabled=autocast is torch.float16 and dist.device.type == "cuda")
    spe = n_train // cfg.batch
    return _Machinery(raw, net, trainable, frozen_buffers, opt, lossf, eval_lossf, autocast, scaler,
                      LRSchedule(cfg.schedule, cfg.optimizer.lr, cfg.epochs, spe),
                      torch.Generator().manual_seed(cfg.seed), spe, task=DetectionTask.of(raw, cfg, backend))


def _make_step(m: _Machinery, cfg, backend: str, dist: Dist, state: "_Progress", cuda_graphs: bool,
               say) -> TrainStep:
    """The run's training step; captured in a CUDA graph where it can be."""
    spe = m.steps_per_epoch
    capture = cuda_graphs and dist.device.type == "cuda" and backend == "triton" and dist.world == 1
    blockers = m.raw.capture_blockers() if capture else []
    if blockers:
        say(f"CUDA graphs: off ({'; '.join(blockers)})")
    elif capture:
        say("CUDA graphs: the training step is captured once and replayed (--no-cuda-graphs to run it eagerly)")
    return TrainStep(m.raw, m.opt, backend=backend, device=dist.device, net=m.net,
                     lr_of=lambda k: m.sched.lr(k // spe, k % spe), total_steps=cfg.epochs * spe,
                     start_step=(state.start - 1) * spe, seed=cfg.seed, label_smoothing=cfg.label_smoothing,
                     clip_grad=cfg.clip_grad, autocast=m.autocast, scaler=m.scaler if m.scaler.is_enabled() else None,
                     frozen_buffers=m.frozen_buffers, capture=capture and not blockers, detection=cfg.detection)


def _resume_progress(ck, m: _Machinery, cfg, state: _Progress, out: Path, say) -> bool:
    """Restore the optimizer, schedule, history and random states of a checkpointed run into
    `m` and `state`; False if that run has nothing left to do."""
    ckpt.load_into_optimizer(ck, m.opt)
    ts = ck.meta.get("train_state", {})
    m.sched.load_state_dict(ts.get("schedule", {}))
    state.history = list(ts.get("history", []))
    state.best_val = math.inf if ts.get("best_val") is None else float(ts["best_val"])
    state.bad_epochs, state.best_epoch = int(ts.get("bad_epochs", 0)), int(ts.get("best_epoch", 0))
    state.start = ck.epoch + 1
    if "torch" in ck.rng:
        torch.set_rng_state(ck.rng["torch"])
    if "data" in ck.rng:
        m.gen.set_state(ck.rng["data"])
    if "cuda" in ck.rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(ck.rng["cuda"])
    if ts.get("stopped") == "early_stop" or state.start > cfg.epochs:
        say(f"nothing to resume: the run in {out} already finished at epoch {ck.epoch}")
        return False
    say(f"resuming from {out / CHECKPOINT} at epoch {state.start}")
    return True


# ----------------------------------------------------------------------------- one epoch


def _train_epoch(m: _Machinery, cfg, train_ds: D.Dataset, dist: Dist, epoch: int, progress: bool, out: Path,
                 last_good: int) -> dict:
    """One pass over the training data; the epoch's row: epoch, lr, train loss and accuracy.
    Reads the device's stats (a host sync) every GUARD_EVERY steps, at the end, and, with a
    progress bar, when the bar is due for new numbers (at most once per its refresh interval,
    1 s for tqdm, PROGRESS_EVERY_S for plain lines): a FusenetTrainError if a loss was not finite."""
    t0 = time.perf_counter()
    order = D.epoch_order(len(train_ds), m.gen)
    bar = progress_bar(progress if dist.main else False, m.steps_per_epoch, epoch, cfg.epochs)
    refresh_s = getattr(bar, "every_s", 1.0)  # how often the bar's numbers are read (a host sync)
    last_read = time.perf_counter()
    m.step.clock.reset_sums()
    first = m.step.host_step
    batches = m.task.batches if m.task is not None else D.batches
    for step, (x, y) in enumerate(batches(train_ds, cfg.batch, order=order, drop_last=True, augment_cfg=cfg.augment,
                                          gen=m.gen, rank=dist.rank, world=dist.world)):
        m.step(x, y)
        if bar is not None:
            bar.update(1)
        due = bar is not None and time.perf_counter() - last_read >= refresh_s
        if (step + 1) % GUARD_EVERY == 0 or due:
            st = read_guard(m.step, m.steps_per_epoch, cfg, dist, out / CHECKPOINT, last_good)
            last_read = time.perf_counter()
            if bar is not None:
                n = max(st["count"], 1.0)
                acc = {} if m.task is not None else {"acc": f"{st['correct'] / n:.3f}"}
                bar.set_postfix(loss=f"{st['loss_sum'] / n:.4f}", **acc,
                                img_s=f"{(step + 1) * cfg.batch / max(time.perf_counter() - t0, 1e-9):.0f}")
    if bar is not None:
        bar.close()
    st = read_guard(m.step, m.steps_per_epoch, cfg, dist, out / CHECKPOINT, last_good)
    sums = dist.all_sum(torch.tensor([st["loss_sum"], st["correct"], st["count"]], dtype=torch.float64))
    row = {"epoch": epoch, "lr": m.step.lr_at(max(m.step.host_step - 1, first)),
           "train_loss": sums[0].item() / sums[2].item(), "train_acc": sums[1].item() / sums[2].item()}
    if m.task is not None:
        terms = dist.all_sum(torch.tensor(st["terms"] + [st["count"]], dtype=torch.float64)).tolist()
        row.update(m.task.train_terms({"terms": terms[:3], "count": terms[3]}), train_acc="")
    return row


def _validate(m: _Machinery, cfg, val_ds: D.Dataset | None, dist: Dist, row: dict, num_classes: int):
    """Add the validation loss, accuracy (and mean IoU) to the epoch's row; without a
    validation split the training loss stands in. Returns the validation predictions
    (None under torchrun or without a split), which predictions.png shows."""
    if m.task is not None:
        v = None if val_ds is None else m.task.evaluate(m.net, val_ds, batch=max(256, cfg.batch), dist=dist,
                                                        keep=dist.world == 1)
        row.update(m.task.validation_row(v) if v else m.task.no_validation_row(row))
        return v.get("dets") if v else None
    if val_ds is not None:
        v = evaluate(m.net, val_ds, m.eval_lossf, batch=max(1024, cfg.batch), dist=dist, num_classes=num_classes,
                     keep_predictions=True)
        row.update(val_loss=v["loss"], val_acc=v["acc"], val_miou=v.get("miou", ""))
        return v.get("pred")
    row.update(val_loss=row["train_loss"], val_acc=float("nan"), val_miou="")
    return None


def _record_epoch(m: _Machinery, cfg, state: _Progress, row: dict) -> bool:
    """Add the row to the history, step the plateau schedule, track the best epoch; True to stop early."""
    state.history.append(row)
    m.sched.end_epoch(row["val_loss"])
    if cfg.schedule.name == "plateau":
        m.step.update_lrs()
    if row["val_loss"] < state.best_val:
        state.best_val, state.bad_epochs, state.best_epoch = row["val_loss"], 0, row["epoch"]
    else:
        state.bad_epochs += 1
    return bool(cfg.early_stop) and state.bad_epochs >= cfg.early_stop


def _log_epoch(say, cfg, row: dict, task: str) -> None:
    miou = f" mIoU {row['val_miou'] * 100:.1f}%" if row.get("val_miou") not in ("", None) else ""
    acc_name = "pixel acc" if task == "segment" else "acc"
    say(f"epoch {row['epoch']}/{cfg.epochs}  train loss {row['train_loss']:.4f} {acc_name} {row['train_acc'] * 100:.1f}%"
        f"  val loss {row['val_loss']:.4f} {acc_name} {row['val_acc'] * 100:.1f}%{miou}"
        f"  lr {row['lr']:.3g}  {row['images_per_s']:.0f} img/s  {row['seconds']:.1f}s")


def _save_checkpoint(out: Path, model, m: _Machinery, name: str, epoch: int, state: _Progress, early: bool,
                     data_meta: dict) -> None:
    """The checkpoint (weights, optimizer, random states, progress) and metrics.csv after an epoch."""
    rng = {"torch": torch.get_rng_state(), "data": m.gen.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    train_state = {"history": state.history, "schedule": m.sched.state_dict(), "best_val": state.best_val,
                   "bad_epochs": state.bad_epochs, "best_epoch": state.best_epoch,
                   "stopped": "early_stop" if early else ""}
    ckpt.save_checkpoint(out / CHECKPOINT, m.raw, network=name, spec=getattr(model, "source_text", ""),
                         epoch=epoch, optimizer=m.opt, rng=rng, train_state=train_state, data=data_meta)
    report.write_metrics_csv(out / "metrics.csv", state.history, columns=m.task and DETECTION_COLUMNS)


# ----------------------------------------------------------------------------- at the end


def _draw_plots(out: Path, raw, data: _Data, dist: Dist, history: list[dict], name: str, cfg, say,
                val_pred: torch.Tensor | None) -> None:
    """curves.png and predictions.png after every epoch: an interrupted run shows where it got to."""
    _draw_curves(out, history, name, say, cfg.label_smoothing)
    if data.val is not None and data.val.x.ndim == 4:  # images (vectors have nothing to show)
        _draw_predictions(out, raw, data, dist, say, val_pred)


def _draw_curves(out: Path, history: list[dict], name: str, say, label_smoothing: float = 0.0) -> None:
    try:
        report.plot_curves(out / "curves.png", history, title=name, label_smoothing=label_smoothing)
    except Exception as e:  # noqa: BLE001 - a plotting failure must not hide the real outcome
        say(f"warning: could not draw curves.png ({e})")


def _draw_predictions(out: Path, raw, data: _Data, dist: Dist, say, pred: torch.Tensor | None = None) -> None:
    """A grid of validation images: the mistakes first, then correct ones (report.pick_examples)."""
    try:
        val = data.val
        if pred is None:
            pred = predict(raw, val.x.to(dist.device)).argmax(1).cpu()
        pick = report.pick_examples(pred, val.y)
        ds = data.full
        report.plot_predictions(out / "predictions.png", val.x[pick], pred[pick], val.y[pick], ds.classes,
                                ds.mean, ds.std)
    except Exception as e:  # noqa: BLE001 - as above
        say(f"warning: could not draw predictions.png ({e})")
