"""`fusenet inspect FILE --target sm_90`: compile every kernel variant a network
needs for a GPU target, without a GPU, and report registers, spills, shared
memory and matrix instructions read off the SASS (engine.perf.aot).

Exit 1 when a variant does not compile for the target.
"""
from __future__ import annotations

from pathlib import Path

from engine.cli.common import input_path
from engine.perf.aot_report import TARGETS as TARGET_ARCHS
from engine.precision import NAMES as PRECISIONS
from engine.precision import PERFORMANCE_DEFAULT

TARGETS = tuple(TARGET_ARCHS)  # ("sm_80", "sm_90")


def cmd_inspect(args) -> int:
    import engine
    from engine.perf.aot import compile_all, format_report, record_network
    from engine.perf.step import network_step

    model = engine.compile(Path(input_path(args.file)), backend="triton", precision=args.precision)
    targets = TARGETS if args.target == "all" else (args.target,)
    specs = record_network(network_step(model, args.batch, training=not args.eval))
    reports = compile_all(specs, targets, jobs=args.jobs)
    print(f"{model.name}: {len(specs)} kernel variants ({'inference' if args.eval else 'training step'}, "
          f"batch {args.batch}, {model.precision}), compiled for {', '.join(targets)}")
    print(format_report(reports))
    return 1 if any(not r.ok for r in reports) else 0


def add_commands(sub) -> None:
    """Register inspect on an argparse subparsers object."""
    p = sub.add_parser("inspect", help="compile every kernel for a GPU target and report registers, spills, MMA use")
    p.add_argument("file")
    p.add_argument("--target", choices=TARGETS + ("all",), default="sm_90")
    p.add_argument("--batch", type=int, default=64, help="batch size the kernels are specialised for")
    p.add_argument("--precision", choices=PRECISIONS, default=PERFORMANCE_DEFAULT)
    p.add_argument("--eval", action="store_true", help="inference kernels only (default: a whole training step)")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile workers")
    p.set_defaults(func=cmd_inspect)
