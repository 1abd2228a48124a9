"""The `fusenet` command: one parser, one error handler, one exit status per outcome.

Each command module registers its commands with `add_commands(subparsers)`
(spec: check, fmt; inspect_gpu: inspect; bench; tune; train: train, eval,
predict, extract). `main` parses the arguments, runs the command's handler and
is the only place that turns an outcome into an exit status and a message:

    0    success
    1    the program was rejected: located errors, `file:line:col: error: ...`;
         or a user error at run time (bad data, flag value, checkpoint, input
         file): `fusenet COMMAND: error: ...`; or a check the command makes
         failed (`fmt --check`, a kernel that does not compile, a benchmark
         result that disagrees, `tune` without a GPU)
    2    a usage error: argparse's (unknown command or flag, missing argument)
         and malformed flag values (`fusenet COMMAND: error: ...`)
    3    an internal error, i.e. a fusenet bug: `fusenet COMMAND: internal
         error: ...` and a hint; the traceback only with FUSENET_DEBUG=1
    130  interrupted (Ctrl-C); `train` keeps its last checkpoint

Never a Python traceback otherwise. The command modules import torch, Triton and
the engine's kernels only inside their handlers, so building the parser is cheap.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

from engine.cli import bench, export, inspect_gpu, spec, train, tune
from engine.errors import FusenetError, FusenetUserError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
COMMAND_MODULES = (spec, inspect_gpu, bench, tune, train, export)  # in the order `fusenet --help` lists them

EPILOG = """\
exit status:
  0    success
  1    an invalid program (located errors), a user error at run time (data,
       flag value, checkpoint), or a failed check (fmt --check, a kernel that
       does not compile, a benchmark result that disagrees)
  2    a usage error (unknown command or flag, malformed flag value)
  3    an internal error: a fusenet bug (FUSENET_DEBUG=1 shows the traceback)
  130  interrupted (Ctrl-C)
"""


def version_text() -> str:
    """fusenet's version, and the versions of the Triton and torch it runs on (read without importing them)."""
    from importlib import metadata

    from engine.version import __version__

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"fusenet {__version__} (triton {installed('triton')}, torch {installed('torch')})"


class _VersionAction(argparse.Action):
    """--version, with the text computed only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusenet", description="CNN specs compiled to fused Triton kernels.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=_VersionAction, help="print fusenet's, Triton's and torch's versions")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return p


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command's handler; the one place errors become messages and exit statuses."""
    name = args.command
    try:
        return args.func(args) or EXIT_OK
    except FusenetError as e:
        print(e.format(), file=sys.stderr)
        return EXIT_ERROR
    except FusenetUserError as e:
        print(f"fusenet {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # the reader went away (`fusenet check ... | head`): what it read was all it wanted.
        # Point stdout at devnull so the flush at interpreter exit does not fail again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        note = getattr(args, "interrupted", None)
        print(f"\nfusenet {name}: interrupted" + (f"; {note}" if note else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - anything else is a fusenet bug: say so plainly
        if os.environ.get("FUSENET_DEBUG"):
            traceback.print_exc()
        print(f"fusenet {name}: internal error: {type(e).__name__}: {e}\n"
              "hint: this is a fusenet bug; rerun with FUSENET_DEBUG=1 for the traceback and report it",
              file=sys.stderr)
        return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    """`fusenet ARGS...`: the exit status (argparse's usage errors exit 2 by raising SystemExit)."""
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
