"""`fusenet inspect FILE --target sm_90`: compile every kernel variant a network
needs for a GPU target, without a GPU, and report registers, spills, shared
memory and matrix instructions read off the SASS (engine.perf.aot).

`--perf`: the static performance estimate of a training step instead
(engine.perf.gemm_perf, docs/PERF_MODEL.md): every GEMM variant's main loop in
the sm_90 SASS (instructions and matrix instructions per trip, issue/tensor
ratio, operand load kinds) and an estimated time at an H100's peaks, summed
over the step against the analytic floor. Its batch defaults to the spec's
training batch.

Exit 1 when a variant does not compile for the target.
"""
from __future__ import annotations

from pathlib import Path

from engine.cli.common import input_path
from engine.perf.aot_report import TARGETS as TARGET_ARCHS
from engine.precision import NAMES as PRECISIONS
from engine.precision import PERFORMANCE_DEFAULT

TARGETS = tuple(TARGET_ARCHS)  # ("sm_80", "sm_90")
DEFAULT_BATCH = 64  # without --perf


def cmd_inspect(args) -> int:
    import engine

    model = engine.compile(Path(input_path(args.file)), backend="triton", precision=args.precision)
    if args.perf:
        return _perf(model, args)
    from engine.perf.aot import compile_all, format_report, record_network
    from engine.perf.step import network_step

    batch = args.batch or DEFAULT_BATCH
    targets = TARGETS if args.target == "all" else (args.target,)
    specs = record_network(network_step(model, batch, training=not args.eval))
    reports = compile_all(specs, targets, jobs=args.jobs)
    print(f"{model.name}: {len(specs)} kernel variants ({'inference' if args.eval else 'training step'}, "
          f"batch {batch}, {model.precision}), compiled for {', '.join(targets)}")
    print(format_report(reports))
    return 1 if any(not r.ok for r in reports) else 0


def _perf(model, args) -> int:
    from engine.perf.gemm_perf import format_perf, step_perf

    if args.eval:
        from engine.errors import UsageError

        raise UsageError("--perf estimates a training step; drop --eval")
    perf = step_perf(model, args.batch or model.train_config.batch, jobs=args.jobs)
    print(format_perf(perf))
    for r in perf.failed:
        print(f"ERROR: {r.name} [{r.tag}] does not compile for {r.target}: {r.error.strip().splitlines()[-1][:300]}")
    return 1 if perf.failed else 0


def add_commands(sub) -> None:
    """Register inspect on an argparse subparsers object."""
    p = sub.add_parser("inspect", help="compile every kernel for a GPU target and report registers, spills, MMA use")
    p.add_argument("file")
    p.add_argument("--target", choices=TARGETS + ("all",), default="sm_90")
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch size the kernels are specialised for (default {DEFAULT_BATCH}; "
                        "with --perf the spec's training batch)")
    p.add_argument("--precision", choices=PRECISIONS, default=PERFORMANCE_DEFAULT)
    p.add_argument("--eval", action="store_true", help="inference kernels only (default: a whole training step)")
    p.add_argument("--perf", action="store_true",
                   help="static performance estimate of a training step: GEMM main loops from the sm_90 SASS, "
                        "estimated times at an H100's peaks, the step against the analytic floor")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile workers")
    p.set_defaults(func=cmd_inspect)
