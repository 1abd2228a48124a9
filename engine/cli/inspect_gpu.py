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

import sys
from pathlib import Path

from engine.cli.common import input_path, positive_int
from engine.errors import UsageError
from engine.perf.aot_report import TARGETS as TARGET_ARCHS
from engine.precision import NAMES as PRECISIONS
from engine.precision import PERFORMANCE_DEFAULT

TARGETS = tuple(TARGET_ARCHS)  # ("sm_80", "sm_90")
DEFAULT_BATCH = 64  # without --perf


def cmd_inspect(args) -> int:
    import engine

    model = engine.compile(Path(input_path(args.file)), backend="triton", precision=args.precision)
    if not args.eval and not any(p.requires_grad for p in model.parameters()):
        if args.perf:
            raise UsageError(f"{model.name} has no parameters: --perf estimates a training step, which updates nothing")
        print(f"fusenet inspect: {model.name} has no parameters, so a training step would update nothing; "
              "inspecting its inference kernels (as --eval does)", file=sys.stderr)
        args.eval = True
    if args.perf:
        return _perf(model, args)
    from engine.perf.aot import compile_all, format_report, record_network
    from engine.perf.step import network_step

    batch = args.batch or DEFAULT_BATCH
    targets = TARGETS if args.target == "all" else (args.target,)
    print(f"fusenet inspect: recording the kernels of one {'inference pass' if args.eval else 'training step'} "
          f"of {model.name} (batch {batch}, {model.precision}) ...", file=sys.stderr, flush=True)
    specs = record_network(network_step(model, batch, training=not args.eval))
    if not specs:
        print(f"{model.name}: no kernels to compile (the network launches none)")
        return 0
    print(f"fusenet inspect: compiling {len(specs)} kernel variants for {', '.join(targets)} with {args.jobs} "
          "worker(s); compiled variants are cached, so a second run is fast", file=sys.stderr, flush=True)
    reports = compile_all(specs, targets, jobs=args.jobs)
    print(f"{model.name}: {len(specs)} kernel variants ({'inference' if args.eval else 'training step'}, "
          f"batch {batch}, {model.precision}), compiled for {', '.join(targets)}")
    print(format_report(reports))
    return 1 if any(not r.ok for r in reports) else 0


def _perf(model, args) -> int:
    from engine.perf.gemm_perf import format_perf, step_perf

    if args.eval:
        raise UsageError("--perf estimates a training step; drop --eval")
    batch = args.batch or model.train_config.batch
    print(f"fusenet inspect: estimating one training step of {model.name} (batch {batch}, {model.precision}) "
          "from the sm_90 SASS ...", file=sys.stderr, flush=True)
    perf = step_perf(model, batch, jobs=args.jobs)
    print(format_perf(perf))
    for r in perf.failed:
        print(f"ERROR: {r.name} [{r.tag}] does not compile for {r.target}: {r.error.strip().splitlines()[-1][:300]}")
    return 1 if perf.failed else 0


def add_commands(sub) -> None:
    """Register inspect on an argparse subparsers object."""
    p = sub.add_parser("inspect", help="compile every kernel for a GPU target and report registers, spills, MMA use")
    p.add_argument("file", help="a network spec (.cnn); examples/NAME.cnn also finds the shipped examples")
    p.add_argument("--target", choices=TARGETS + ("all",), default="sm_90", help="GPU architecture (default sm_90)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help=f"batch size the kernels are specialised for (default {DEFAULT_BATCH}; "
                        "with --perf the spec's training batch)")
    p.add_argument("--precision", choices=PRECISIONS, default=PERFORMANCE_DEFAULT,
                   help=f"the kernels' precision (default {PERFORMANCE_DEFAULT})")
    p.add_argument("--eval", action="store_true", help="inference kernels only (default: a whole training step)")
    p.add_argument("--perf", action="store_true",
                   help="static performance estimate of a training step: GEMM main loops from the sm_90 SASS, "
                        "estimated times at an H100's peaks, the step against the analytic floor")
    p.add_argument("--jobs", type=positive_int, default=2, help="parallel compile workers (default 2)")
    p.set_defaults(func=cmd_inspect)
