"""`fusenet bench FILE`: performance against the PyTorch baselines.

Timings need a CUDA GPU. Without one (or for now, with one: device timing is
not built yet), it says so plainly and prints the analytic model of
engine.bench instead, plus optionally the static sm_90 report of
`fusenet inspect`. Interpreter timings would be meaningless, so none are taken.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _batches(text: str) -> list[int] | None:
    """64,256,1024 -> [64, 256, 1024]; None if malformed."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        return None
    return values if values and min(values) >= 1 else None


def cmd_bench(args) -> int:
    import engine
    from engine.bench import analytic_report, format_analytic
    from engine.device import HAS_CUDA

    spec = engine.load(Path(args.file))
    precision = args.precision or spec.train.precision
    batches = _batches(args.batch) if args.batch else [spec.train.batch]
    if batches is None:  # a usage error: exit status 2, like argparse's
        print(f"fusenet bench: error: --batch takes positive integers like 64,256,1024, got {args.batch!r}",
              file=sys.stderr)
        return 2
    if HAS_CUDA:
        print("fusenet bench: timing on the GPU is not built yet; the analytic model follows.", file=sys.stderr)
    else:
        print("fusenet bench: timings need a CUDA GPU and this machine has none (interpreted kernels would time\n"
              "the interpreter, not the kernels). The analytic model follows: FLOPs and minimum HBM bytes per\n"
              "kernel and per training step, fused against unfused, with roofline floors on an H100.",
              file=sys.stderr)
    reports = []
    for batch in batches:
        report = analytic_report(spec, batch, precision)
        reports.append(report)
        print(format_analytic(report))
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2))
        print(f"analytic model written to {args.json}")
    if args.inspect:
        from engine.inspect import compile_all, format_report, record_network
        from engine.inspect_cli import network_step

        model = engine.compile(Path(args.file), precision=precision)
        reports = compile_all(record_network(network_step(model, batches[0], True)), ("sm_90",))
        print(f"static sm_90 report (training step, batch {batches[0]}, {precision}):")
        print(format_report(reports))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="performance: analytic model without a GPU (timings need one)")
    p.add_argument("file")
    p.add_argument("--batch", help="batch sizes, e.g. 64,256,1024 (default: the spec's)")
    p.add_argument("--precision", choices=("fp32", "tf32", "fp16", "bf16"), help="default: the spec's")
    p.add_argument("--json", help="also write the analytic model as JSON to this path")
    p.add_argument("--inspect", action="store_true", help="append the static sm_90 report (compiles every kernel)")
    p.set_defaults(func=cmd_bench)
