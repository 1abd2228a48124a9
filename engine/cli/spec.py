"""`fusenet check` and `fusenet fmt`: the commands about a spec's text and shape.

`check` prints one row per layer (source line, layer, output shape, parameters,
FLOPs), and with --kernels the fused kernel plan, with --ir the graph after each
pass. `fmt` prints (--write: rewrites, --check: tests) the canonical format.
Both are what editors and pre-commit hooks run, so they load only the language
and the IR: no torch, no Triton, no kernels.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from engine.cli.common import input_path
from engine.text import format_table


def _human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def summary_table(spec) -> str:
    """One row per layer: source line, layer, output shape, parameters, FLOPs; then the totals."""
    rows = []
    g = spec.graph
    for node in g:
        shape = "x".join(map(str, node.shape)) if node.shape else "?"
        label = node.describe() if node.op != "input" else "input"
        if node.name:
            label = f"{label}  [{node.name}]"
        rows.append((str(node.pos.line), label, shape, f"{node.params:,}" if node.params else "-",
                     _human(node.flops) if node.flops else "-"))
    total_p = sum(n.params for n in g)
    total_f = sum(n.flops for n in g)
    out = format_table(("line", "layer", "output", "params", "FLOPs"), rows, align="lllr").splitlines()
    out.append("-" * len(out[0]))
    out.append(
        f"network {g.name}: {len(g.nodes) - 1} layers, {total_p:,} parameters, "
        f"{_human(total_f)} FLOPs per sample (forward)"
    )
    return "\n".join(out)


def cmd_check(args) -> int:
    from engine.ir.frontend import load

    spec = load(Path(input_path(args.file)))
    print(summary_table(spec))
    if args.kernels:
        from engine.perf.analytic import kernel_report

        print()
        print(kernel_report(spec, batch=args.batch, training=not args.eval))
    if args.ir:
        from engine.passes.pipeline import format_trace, trace_pipeline

        print()
        print(format_trace(trace_pipeline(spec.graph, training=not args.eval)))
    return 0


def cmd_fmt(args) -> int:
    from dsl.formatter import format_program
    from dsl.parser import parse
    from engine.ir.frontend import read_source

    # --write rewrites the file named, never a shipped example found in its stead
    path = args.file if args.write else input_path(args.file)
    text, name = read_source(Path(path))
    formatted = format_program(parse(text, name))
    if args.write:
        tmp = Path(args.file).with_suffix(".fmt.tmp")
        tmp.write_text(formatted)
        os.replace(tmp, args.file)
    elif args.check:
        if formatted != text:
            print(f"{name}: not in canonical format (run `fusenet fmt --write {name}`)", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(formatted)
    return 0


FILE_HELP = "a network spec (.cnn); examples/NAME.cnn also finds the examples shipped with fusenet"


def add_commands(sub) -> None:
    """Register check and fmt on an argparse subparsers object."""
    c = sub.add_parser("check", help="check a spec and print every layer's shape, parameters and FLOPs")
    c.add_argument("file", help=FILE_HELP)
    c.add_argument("--kernels", action="store_true", help="also list the fused kernels (forward and backward)")
    c.add_argument("--ir", action="store_true", help="print the IR after each pass")
    c.add_argument("--batch", type=int, default=None, help="batch size for --kernels byte estimates")
    c.add_argument("--eval", action="store_true", help="plan for inference (batch norm folded) rather than training")
    c.set_defaults(func=cmd_check)

    f = sub.add_parser("fmt", help="print a spec in canonical format")
    f.add_argument("file", help=FILE_HELP)
    g = f.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite the file in place")
    g.add_argument("--check", action="store_true", help="exit 1 if the file is not canonical")
    f.set_defaults(func=cmd_fmt)
