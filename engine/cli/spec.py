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
    if spec.train.loss == "centernet":
        from engine.ir.detection import detection_head

        head = detection_head(g.input_shape, g.output.shape)
        out[-1] += (f"; detection head (loss centernet): {head.classes} classes, output stride {head.stride}, "
                    f"{head.out_hw[0]}x{head.out_hw[1]} cells")
    return "\n".join(out)


def spec_files(paths: list[str], what: str) -> list[str]:
    """The spec files named: files as given (shipped examples found too), folders searched for *.cnn."""
    from engine.errors import InputFileError

    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(str(f) for f in Path(p).rglob("*.cnn") if not any(
                part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise InputFileError(f"{what}: folder '{p}' holds no .cnn files")
            files += found
        else:
            files.append(p)
    return files


def _each(files: list[str], run) -> int:
    """Run `run(file)` on every file, reporting each failure and going on; 1 if any failed."""
    from engine.errors import FusenetError, FusenetUserError

    status = 0
    for f in files:
        try:
            status = max(status, run(f))
        except FusenetError as e:
            if len(files) == 1:
                raise
            print(e.format(), file=sys.stderr)
            status = 1
        except FusenetUserError as e:
            if len(files) == 1:
                raise
            print(f"{f}: error: {e}", file=sys.stderr)
            status = 1
    return status


def cmd_check(args) -> int:
    files = spec_files(args.files, "check")

    def check_one(file: str) -> int:
        from engine.ir.frontend import load

        spec = load(Path(input_path(file)))
        if len(files) > 1:
            print(f"== {file}")
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

    return _each(files, check_one)


def _write_formatted(path: str, text: str) -> None:
    """Rewrite `path`; through a symbolic link, its target is rewritten and the link kept."""
    target = Path(os.path.realpath(path))
    tmp = target.with_name(f".{target.name}.fmt-{os.getpid()}")
    try:
        tmp.write_text(text)
        try:
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        except OSError:
            pass
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def cmd_fmt(args) -> int:
    from engine.errors import UsageError

    files = spec_files(args.files, "fmt")
    if len(files) > 1 and not (args.write or args.check):
        raise UsageError("several files: say --check (exit 1 if any is not canonical) or --write (rewrite them)")

    def fmt_one(file: str) -> int:
        from dsl.formatter import format_program
        from dsl.parser import parse
        from engine.ir.frontend import read_source

        # --write rewrites the file named, never a shipped example found in its stead
        path = file if args.write else input_path(file)
        text, name = read_source(Path(path))
        formatted = format_program(parse(text, name))
        if args.write:
            if formatted != text:
                _write_formatted(path, formatted)
                if len(files) > 1:
                    print(f"formatted {name}", file=sys.stderr)
        elif args.check:
            if formatted != text:
                print(f"{name}: not in canonical format (run `fusenet fmt --write {name}`)", file=sys.stderr)
                return 1
        else:
            sys.stdout.write(formatted)
        return 0

    return _each(files, fmt_one)


FILE_HELP = ("network specs (.cnn), or folders searched for them; examples/NAME.cnn also finds the examples "
             "shipped with fusenet")


def add_commands(sub) -> None:
    """Register check and fmt on an argparse subparsers object."""
    from engine.cli.common import positive_int

    c = sub.add_parser("check", help="check specs and print every layer's shape, parameters and FLOPs")
    c.add_argument("files", nargs="+", metavar="FILE", help=FILE_HELP)
    c.add_argument("--kernels", action="store_true", help="also list the fused kernels (forward and backward)")
    c.add_argument("--ir", action="store_true", help="print the IR after each pass")
    c.add_argument("--batch", type=positive_int, default=None,
                   help="batch size for --kernels byte estimates (default: the spec's)")
    c.add_argument("--eval", action="store_true", help="plan for inference (batch norm folded) rather than training")
    c.set_defaults(func=cmd_check)

    f = sub.add_parser("fmt", help="print a spec in canonical format; --check or --write many (pre-commit)")
    f.add_argument("files", nargs="+", metavar="FILE", help=FILE_HELP)
    g = f.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite the files in place (through symbolic links)")
    g.add_argument("--check", action="store_true", help="exit 1 if any file is not canonical (pre-commit, CI)")
    f.set_defaults(func=cmd_fmt)
