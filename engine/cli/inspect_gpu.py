"""`fusenet inspect FILE --target sm_90`: compile every kernel variant a network
needs for a GPU target, without a GPU, and report registers, spills, shared
memory and matrix instructions read off the SASS (engine.perf.aot).

Exit 1 when a variant does not compile for the target.
"""
from __future__ import annotations

from pathlib import Path

from engine.cli.common import input_path, positive_int
from engine.perf.aot_report import TARGETS as TARGET_ARCHS
from engine.precision import NAMES as PRECISIONS
from engine.precision import PERFORMANCE_DEFAULT

TARGETS = tuple(TARGET_ARCHS)  # ("sm_80", "sm_90")


def cmd_inspect(args) -> int:
    import engine
    from engine.perf.aot import compile_all, format_report, record_network
    from engine.perf.step import network_step

    import sys

    model = engine.compile(Path(input_path(args.file)), backend="triton", precision=args.precision)
    targets = TARGETS if args.target == "all" else (args.target,)
    if not args.eval and not any(p.requires_grad for p in model.parameters()):
        print(f"fusenet inspect: {model.name} has no parameters, so a training step would update nothing; "
              "inspecting its inference kernels (as --eval does)", file=sys.stderr)
        args.eval = True
    print(f"fusenet inspect: recording the kernels of one {'inference pass' if args.eval else 'training step'} "
          f"of {model.name} (batch {args.batch}, {model.precision}) ...", file=sys.stderr, flush=True)
    specs = record_network(network_step(model, args.batch, training=not args.eval))
    if not specs:
        print(f"{model.name}: no kernels to compile (the network launches none)")
        return 0
    print(f"fusenet inspect: compiling {len(specs)} kernel variants for {', '.join(targets)} with {args.jobs} "
          "worker(s); compiled variants are cached, so a second run is fast", file=sys.stderr, flush=True)
    reports = compile_all(specs, targets, jobs=args.jobs)
    print(f"{model.name}: {len(specs)} kernel variants ({'inference' if args.eval else 'training step'}, "
          f"batch {args.batch}, {model.precision}), compiled for {', '.join(targets)}")
    print(format_report(reports))
    return 1 if any(not r.ok for r in reports) else 0


def add_commands(sub) -> None:
    """Register inspect on an argparse subparsers object."""
    p = sub.add_parser("inspect", help="compile every kernel for a GPU target and report registers, spills, MMA use")
    p.add_argument("file", help="a network spec (.cnn); examples/NAME.cnn also finds the shipped examples")
    p.add_argument("--target", choices=TARGETS + ("all",), default="sm_90", help="GPU architecture (default sm_90)")
    p.add_argument("--batch", type=positive_int, default=64, help="batch size the kernels are specialised for")
    p.add_argument("--precision", choices=PRECISIONS, default=PERFORMANCE_DEFAULT,
                   help=f"the kernels' precision (default {PERFORMANCE_DEFAULT})")
    p.add_argument("--eval", action="store_true", help="inference kernels only (default: a whole training step)")
    p.add_argument("--jobs", type=positive_int, default=2, help="parallel compile workers (default 2)")
    p.set_defaults(func=cmd_inspect)
