"""`fusenet inspect FILE --target sm_90`: compile every kernel variant a network
needs for a GPU target, without a GPU, and report registers, spills, shared
memory and matrix instructions read off the SASS."""
from __future__ import annotations

from pathlib import Path

import torch

TARGETS = ("sm_80", "sm_90")


def network_step(model, batch: int, training: bool):
    """A closure running one step of `model` (forward, and in training the loss,
    backward and optimizer step), for recording its kernel launches."""
    from engine.kernels.loss import cross_entropy
    from engine.kernels.optim import SGD

    def run():
        model.train(training)
        x = torch.zeros(batch, *model.input_shape)
        if not training:
            with torch.no_grad():
                model(x)
            return
        opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        out = model(x)
        if out.dim() == 4:  # segmentation: per-pixel logits, NHWC for the loss kernel
            logits = out.permute(0, 2, 3, 1).contiguous()
            target = torch.zeros(logits.shape[:3], dtype=torch.int64)
        else:
            logits, target = out, torch.zeros(out.shape[0], dtype=torch.int64)
        cross_entropy(logits, target, label_smoothing=0.1).backward()
        opt.step()

    return run


def cmd_inspect(args) -> int:
    import engine
    from engine.perf.aot import compile_all, format_report, record_network

    model = engine.compile(Path(args.file), backend="triton", precision=args.precision)
    targets = TARGETS if args.target == "all" else (args.target,)
    specs = record_network(network_step(model, args.batch, training=not args.eval))
    reports = compile_all(specs, targets, jobs=args.jobs)
    print(f"{model.name}: {len(specs)} kernel variants ({'inference' if args.eval else 'training step'}, "
          f"batch {args.batch}, {model.precision}), compiled for {', '.join(targets)}")
    print(format_report(reports))
    return 1 if any(not r.ok for r in reports) else 0


def add_commands(sub) -> None:
    p = sub.add_parser("inspect", help="compile every kernel for a GPU target and report registers, spills, MMA use")
    p.add_argument("file")
    p.add_argument("--target", choices=TARGETS + ("all",), default="sm_90")
    p.add_argument("--batch", type=int, default=64, help="batch size the kernels are specialised for")
    p.add_argument("--precision", choices=("fp32", "tf32", "fp16", "bf16"), default="bf16")
    p.add_argument("--eval", action="store_true", help="inference kernels only (default: a whole training step)")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile workers")
    p.set_defaults(func=cmd_inspect)
