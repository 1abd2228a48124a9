"""The `fusenet` command: check, fmt, inspect, bench, tune, train, eval, predict, extract.

Exit status: 0 success, 1 an invalid program or failed run, 2 a usage error.
Errors are printed as located messages; never a Python traceback (set
FUSENET_DEBUG=1 to see one for an internal error).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dsl.errors import FusenetError
from engine.text import format_table


def _human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def summary_table(spec) -> str:
    """One row per layer: source line, layer, output shape, parameters, FLOPs."""
    rows = []
    g = spec.graph
    for node in g:
        shape = "x".join(map(str, node.shape)) if node.shape else "?"
        label = node.describe() if node.op != "input" else "input"
        if node.name:
            label = f"{label}  [{node.name}]"
        rows.append((str(node.pos.line), label, shape, f"{node.params:,}" if node.params else "-", _human(node.flops) if node.flops else "-"))
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

    spec = load(Path(args.file))
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

    text, name = read_source(Path(args.file))
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusenet", description="CNN specs compiled to fused Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("check", help="check a spec and print every layer's shape, parameters and FLOPs")
    c.add_argument("file")
    c.add_argument("--kernels", action="store_true", help="also list the fused kernels (forward and backward)")
    c.add_argument("--ir", action="store_true", help="print the IR after each pass")
    c.add_argument("--batch", type=int, default=None, help="batch size for --kernels byte estimates")
    c.add_argument("--eval", action="store_true", help="plan for inference (batch norm folded) rather than training")
    c.set_defaults(func=cmd_check)

    f = sub.add_parser("fmt", help="print a spec in canonical format")
    f.add_argument("file")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite the file in place")
    g.add_argument("--check", action="store_true", help="exit 1 if the file is not canonical")
    f.set_defaults(func=cmd_fmt)

    for module, attr in (("engine.cli.inspect_gpu", "add_commands"), ("engine.cli.bench", "add_commands"), ("engine.cli.tune", "add_commands"), ("engine.cli.train", "add_commands")):
        try:
            mod = __import__(module, fromlist=[attr])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        getattr(mod, attr)(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except FusenetError as e:
        print(e.format(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fusenet: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal error: say so plainly, no traceback
        if os.environ.get("FUSENET_DEBUG"):
            raise
        print(
            f"fusenet {args.command}: internal error: {type(e).__name__}: {e}\n"
            "hint: this is a fusenet bug; rerun with FUSENET_DEBUG=1 for the traceback and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
