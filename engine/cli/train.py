"""`fusenet train | eval | predict | extract`: the training tools' commands.

`add_commands(subparsers)` registers the four commands; each handler takes the
parsed arguments and returns an exit code. The errors they raise for the user
(engine.errors: FusenetTrainError and its DataError, CheckpointError; spec
errors) are reported by the one handler in engine/cli/main.py; Ctrl-C during
train says that the last checkpoint is kept.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from engine.cli.common import compile_spec, load_trained, positive_int
from engine.cli.interpreted import fast_interpreter
from engine.errors import FusenetTrainError
from engine.precision import NAMES as PRECISIONS

BACKENDS = ("triton", "torch")


def _learning_rate(text: str) -> float:
    """argparse type for --lr: a positive, finite number."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 0.1 or 3e-4, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number, got {text}")
    return value


def _config(model, args):
    cfg = model.train_config
    rep = {k: getattr(args, k) for k in ("epochs", "batch", "data", "precision") if getattr(args, k, None) is not None}
    cfg = dataclasses.replace(cfg, **rep)
    if getattr(args, "lr", None) is not None:
        cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=args.lr))
    for k in ("epochs", "batch"):
        if getattr(cfg, k) < 1:
            raise FusenetTrainError(f"--{k} must be at least 1")
    return cfg


def _writable_folder(out: Path) -> None:
    """Refuse an --out that is a file, or lies under one, or cannot be created, before any work."""
    if out.exists() and not out.is_dir():
        raise FusenetTrainError(f"--out '{out}' is a file; give a folder for the run (it is created if missing)")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise FusenetTrainError(f"--out '{out}' cannot be created: '{probe}' is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FusenetTrainError(f"--out '{out}' cannot be created or written: no write permission in '{probe}'")


def _run_dir(args, name: str, resume: bool) -> Path:
    from engine.training.loop import CHECKPOINT

    if args.out:
        out = Path(args.out)
        _writable_folder(out)
        if not resume and (out / CHECKPOINT).exists():
            raise FusenetTrainError(
                f"{out} already holds a checkpoint; continue it with --resume, or pick another --out")
        return out
    base = Path("runs") / name
    candidates = [base] + [Path(f"{base}-{i}") for i in range(2, 1000)]
    if resume:
        existing = [p for p in candidates if (p / CHECKPOINT).exists()]
        if not existing:
            raise FusenetTrainError(f"nothing to resume: no checkpoint under {base}; name the run with --out")
        return existing[-1]
    out = next(p for p in candidates if not (p / CHECKPOINT).exists())
    _writable_folder(out)
    return out


@fast_interpreter
def cmd_train(args) -> int:
    from engine.training.distributed import setup_distributed
    from engine.training.loop import run_training

    dist = setup_distributed()
    try:
        model = compile_spec(args.file, args.backend, args.precision)
        cfg = _config(model, args)
        out = _run_dir(args, model.name, args.resume)
        if dist.main:
            from engine.training.checkpoint import remove_stale_temporaries

            for path in remove_stale_temporaries(out):
                print(f"removed {path}, left by an interrupted save", file=sys.stderr)
        if dist.world > 1:  # every process must agree on the folder
            import torch.distributed as tdist

            box = [str(out)]
            tdist.broadcast_object_list(box, src=0)
            out = Path(box[0])
        progress = False if args.no_progress else ("bar" if sys.stderr.isatty() else "lines")
        res = run_training(model, cfg, out, backend=args.backend, resume=args.resume, init=args.init,
                           progress=progress, dist=dist, cuda_graphs=not args.no_cuda_graphs)
        if dist.main:
            names = [n for n in ("model.safetensors", "metrics.csv", "curves.png", "predictions.png")
                     if (res.out_dir / n).exists()]
            print(f"outputs in {res.out_dir}/: {', '.join(names)}")
        return 0
    finally:
        if dist.world > 1:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


def _eval_data(model, ck, args):
    from engine.training import data as D

    meta = ck.meta.get("data", {})
    cfg = model.train_config
    name = args.data or cfg.data
    classes = int(model.output_shape[0]) - (4 if cfg.detection is not None else 0)  # centernet: heatmaps
    ds = D.load_dataset(name, input_shape=model.input_shape, num_classes=classes, seed=meta.get("seed", cfg.seed))
    ds = D.renormalise(ds, meta.get("mean", ()), meta.get("std", ()))
    if meta.get("classes") and len(meta["classes"]) == len(ds.classes):
        ds = dataclasses.replace(ds, classes=list(meta["classes"]))
    D.check_compatible(ds, model.input_shape, model.output_shape, model.name)
    return ds


def _load(args):
    return load_trained(args.file, args.checkpoint, args.backend)


@fast_interpreter
def cmd_eval(args) -> int:
    from engine.training import data as D
    from engine.training import report
    from engine.training.detection.run import DetectionTask
    from engine.training.detection.run import format_eval as format_detection_eval
    from engine.training.evaluate import evaluate
    from engine.training.optimizer_and_loss import loss_fn

    model, ck = _load(args)
    ds = _eval_data(model, ck, args)
    meta = ck.meta.get("data", {})
    what = f"all of {ds.name}"
    if not args.data and not args.all:
        split = float(meta.get("split", model.train_config.split))
        if split > 0:
            _, ds = D.split(ds, split, int(meta.get("seed", model.train_config.seed)))
            what = f"the validation split of {ds.name} ({split:g}, seed {meta.get('seed', model.train_config.seed)})"
    task = DetectionTask.of(model, model.train_config, args.backend)
    if task is not None:  # loss centernet: loss terms, mAP, AP per class
        task.fit(ds)
        res = task.evaluate(model, ds, batch=args.batch)
        print(f"{model.name}, checkpoint {args.checkpoint} (epoch {ck.epoch}), on {what}")
        print(format_detection_eval(res, ds.classes))
        return 0
    k = int(model.output_shape[0])
    res = evaluate(model, ds, loss_fn(args.backend), batch=args.batch, num_classes=k)
    print(f"{model.name}, checkpoint {args.checkpoint} (epoch {ck.epoch}), on {what}")
    print(report.format_eval(res, ds.classes, ds.task))
    return 0


@fast_interpreter
def cmd_predict(args) -> int:
    import torch

    from engine.errors import DataError
    from engine.training import data as D
    from engine.training.evaluate import predict

    model, ck = _load(args)
    if len(model.input_shape) != 3:
        raise FusenetTrainError(f"network '{model.name}' takes a vector of {model.input_shape[0]} features, not "
                                "images; predict reads image files (evaluate an .npz of vectors with `fusenet eval --data`)")
    meta = ck.meta.get("data", {})
    classes = meta.get("classes") or [str(i) for i in range(int(model.output_shape[0]))]
    scaling = D.InputScaling.from_meta(meta)
    for warning in scaling.warnings():
        print(f"fusenet predict: warning: {warning}", file=sys.stderr)
    images, paths, failed = [], [], 0
    for path in args.images:
        try:
            img, notes = D.read_image(path, model.input_shape)
        except DataError as e:
            print(f"{path}: error: {e}", file=sys.stderr)
            failed += 1
            continue
        for note in notes:
            print(f"fusenet predict: warning: {path}: {note}", file=sys.stderr)
        images.append(img)
        paths.append(path)
    if images and model.train_config.detection is not None:
        _print_boxes(model, scaling.apply(torch.stack(images)), paths, classes, args, meta)
    elif images:
        x = scaling.apply(torch.stack(images))
        prob = torch.softmax(predict(model, x, batch=args.batch).float(), dim=1)
        name = lambda i: classes[i] if i < len(classes) else str(i)  # noqa: E731
        for path, p in zip(paths, prob):
            if p.ndim == 1:
                top = torch.topk(p, min(args.top, p.numel()))
                print(f"{path}: " + ", ".join(f"{name(int(i))} {v * 100:.1f}%" for v, i in zip(top.values, top.indices)))
            else:  # segmentation: share of pixels per predicted class
                share = torch.bincount(p.argmax(0).flatten(), minlength=p.shape[0]).float() / p[0].numel()
                print(f"{path}: pixels " + ", ".join(f"{name(i)} {v * 100:.1f}%" for i, v in enumerate(share.tolist())))
    if failed:
        raise DataError(f"{failed} of {len(args.images)} image(s) could not be read (see above)")
    return 0


def _print_boxes(model, x, paths, classes, args, meta) -> None:
    """predict for a `loss centernet` network: each image's boxes (class, score, x1 y1 x2 y2 in
    network-input pixels) scoring at least --threshold; --annotate DIR: the images with their boxes."""
    from engine.ir.detection import detection_head
    from engine.training.detection.decode import decode
    from engine.training.evaluate import predict

    head = detection_head(model.input_shape, model.output_shape)
    classes = classes[:head.classes] if len(classes) >= head.classes else [str(i) for i in range(head.classes)]
    dets = decode(predict(model, x, batch=args.batch), head.stride, backend=args.backend, threshold=args.threshold)
    h, w = model.input_shape[1:]
    where = "peaks: fusenet's kernel; top-k and boxes: PyTorch" if args.backend == "triton" else "PyTorch"
    print(f"boxes in network-input pixels ({w}x{h}), score >= {args.threshold:g} (decoding: {where})")
    for path, d in zip(paths, dets):
        print(f"{path}: {len(d)} box{'es' if len(d) != 1 else ''}")
        for x1, y1, x2, y2, score, k in d.tolist():
            print(f"  {classes[int(k)]:<12} {score:.3f}  {x1:7.1f} {y1:7.1f} {x2:7.1f} {y2:7.1f}")
    if args.annotate:
        from engine.training.detection.draw import draw_detections

        folder = Path(args.annotate)
        folder.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(paths):
            target = folder / f"{Path(path).stem}.png"
            draw_detections(x[i:i + 1], [dets[i]], None, classes, target, mean=meta.get("mean", ()),
                            std=meta.get("std", ()), min_score=args.threshold, title=Path(path).name)
            print(f"wrote {target}")


def _features_path(out: str | None, default: str) -> Path:
    """Where extract writes: --out as given (.npz added, as numpy would), a folder's default name, or the default."""
    if not out:
        return Path(default)
    path = Path(out)
    if path.is_dir() or out.endswith(os.sep):
        return path / default
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


@fast_interpreter
def cmd_extract(args) -> int:
    import numpy as np
    import torch

    model, ck = _load(args)
    taps = getattr(model, "tap_layers", {}) or {}
    if args.tap not in taps:
        raise FusenetTrainError(
            f"no tap named '{args.tap}' in network '{model.name}' (named taps: {', '.join(taps) or 'none'})")
    out = _features_path(args.out, f"{model.name}_{args.tap}_features.npz")
    _writable_folder(out.parent)
    ds = _eval_data(model, ck, args)
    feats = []
    with torch.no_grad():
        for i in range(0, len(ds), args.batch):
            _, t = model(ds.x[i:i + args.batch], taps=(args.tap,))
            feats.append(t[args.tap].float().cpu())
    f = torch.cat(feats).numpy()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, features=f, labels=ds.y.numpy(), tap=np.array(args.tap), classes=np.array(ds.classes))
    except OSError as e:
        raise FusenetTrainError(f"cannot write '{out}': {e.strerror or e}") from None
    print(f"wrote {out}: features {list(f.shape)} of tap '{args.tap}' for {len(ds)} images of {ds.name}")
    return 0


def add_commands(subparsers) -> None:
    """Register train, eval, predict and extract on an argparse subparsers object."""
    def common(p, checkpoint: bool):
        p.add_argument("file", help="network spec (.cnn); examples/NAME.cnn also finds the shipped examples")
        p.add_argument("--backend", choices=BACKENDS, default="triton", help="fused Triton kernels or the PyTorch reference")
        if checkpoint:
            p.add_argument("--checkpoint", required=True, help="a model.safetensors written by fusenet train")
            p.add_argument("--batch", type=positive_int, default=512, help="images per forward pass (default 512)")

    p = subparsers.add_parser("train", help="train a network on the data its train section names")
    common(p, False)
    p.add_argument("--epochs", type=positive_int, help="number of epochs (default: the spec's)")
    p.add_argument("--batch", type=positive_int, help="global batch (split over processes under torchrun)")
    p.add_argument("--lr", type=_learning_rate, help="peak learning rate (default: the spec's optimizer lr)")
    p.add_argument("--data", help="digits | mnist5k | shapes | shapes_boxes | a path (image folder, .npz, IDX, "
                                  "CIFAR-10 batches, a YOLO folder)")
    p.add_argument("--precision", choices=PRECISIONS, help="default: the spec's")
    p.add_argument("--out", help="run folder (default runs/<network>, then runs/<network>-2, ...)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--init", metavar="CHECKPOINT", help="start from another checkpoint's matching layers")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (without a terminal, a progress line every 10 s instead)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run each training step eagerly (default on CUDA: capture the step once in a CUDA graph)")
    p.set_defaults(func=cmd_train, interrupted="the last checkpoint is kept (continue with --resume)")

    p = subparsers.add_parser("eval", help="accuracy, per-class accuracy and confusion matrix of a checkpoint")
    common(p, True)
    p.add_argument("--data", help="evaluate on all of this data set instead of the validation split")
    p.add_argument("--all", action="store_true", help="evaluate on the whole data set, not the validation split")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("predict", help="top-k classes (or boxes, for a detection network) for image files")
    common(p, True)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...), scaled as in training")
    p.add_argument("--top", type=positive_int, default=3, help="how many classes to print per image (default 3)")
    p.add_argument("--threshold", type=float, default=0.3,
                   help="detection networks: the lowest score of a box printed (default 0.3)")
    p.add_argument("--annotate", metavar="DIR", help="detection networks: write each image with its boxes to DIR")
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser("extract", help="write a named tap's features for a data set to .npz")
    common(p, True)
    p.add_argument("--tap", required=True, help="a named tap of the network (`name = ...` in the spec)")
    p.add_argument("--data", help="data set (default: the spec's)")
    p.add_argument("--out", help="output .npz, or a folder (default <network>_<tap>_features.npz)")
    p.set_defaults(func=cmd_extract)
