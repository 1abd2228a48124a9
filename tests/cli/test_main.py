"""The `fusenet` command line: output and exit status.

Exit status: 0 success; 1 an invalid program, and also a file that cannot be
read (no such file, a directory): that is reported like any other rejected
input, as `path: error: ...` on stderr; 1 a user error at run time; 2 a usage
error caught by argparse (no such subcommand, missing file argument, unknown
flag); 3 an internal error; 130 Ctrl-C. Never a Python traceback (unless
FUSENET_DEBUG=1 asks for the traceback of an internal error).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main
from helpers import heavy_imports

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.cnn"))
BAD = "network n {\n    input 3x8x8\n    cnov 16 kernel=3\n}\n"


@pytest.fixture
def bad_file(tmp_path):
    p = tmp_path / "bad.cnn"
    p.write_text(BAD)
    return p


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_check_valid_example(path, capsys):
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    header, rule = out.splitlines()[:2]
    assert header.split() == ["line", "layer", "output", "params", "FLOPs"]
    assert set(rule) == {"-"}
    assert out.splitlines()[-1].startswith(f"network {path.stem}: ")
    assert "parameters" in out and "FLOPs per sample" in out


def test_check_invalid_program(bad_file, capsys):
    assert main(["check", str(bad_file)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{bad_file}:3:5: error: unknown layer 'cnov'",
        "        cnov 16 kernel=3",
        "        ^~~~",
        "hint: did you mean 'conv'?",
    ]
    assert "Traceback" not in err


def test_check_reports_every_error(tmp_path, capsys):
    p = tmp_path / "three.cnn"
    p.write_text("network n {\n    input 3x8x8\n    cnov 4\n    e1 = relu\n    add e9\n    dropout true\n}\n")
    assert main(["check", str(p)]) == 1
    err = capsys.readouterr().err
    assert [line.split(": error:")[0] for line in err.splitlines() if ": error:" in line] == [f"{p}:3:5", f"{p}:5:9", f"{p}:6:13"]


def test_check_syntax_error(tmp_path, capsys):
    p = tmp_path / "syn.cnn"
    p.write_text("network n {\n    input 3x8x8\n    relu\n")
    assert main(["check", str(p)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{p}:3:9: error: unexpected end of file")
    assert "Traceback" not in err


@pytest.mark.parametrize("cmd", ["check", "fmt"])
def test_missing_file_is_status_1(cmd, tmp_path, capsys):
    missing = tmp_path / "nope.cnn"
    assert main([cmd, str(missing)]) == 1
    out, err = capsys.readouterr()
    assert err.strip() == f"{missing}: error: no such file: {missing}"
    assert out == ""


def test_directory_is_status_1(tmp_path, capsys):
    # a folder is searched for .cnn files (tests/cli/test_files.py); one without any is an error
    assert main(["check", str(tmp_path)]) == 1
    assert "holds no .cnn files" in capsys.readouterr().err


def test_binary_file_is_status_1(tmp_path, capsys):
    p = tmp_path / "bin.cnn"
    p.write_bytes(b"\xff\xfe\x00network")
    assert main(["check", str(p)]) == 1
    assert "not a text file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate", "x.cnn"], ["check"], ["fmt"], ["check", "a.cnn", "--no-such-flag"], ["fmt", "--write", "--check", "a.cnn"]],
    ids=["no-command", "unknown-command", "check-no-file", "fmt-no-file", "unknown-flag", "exclusive-flags"],
)
def test_usage_errors_are_status_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: fusenet" in err and "Traceback" not in err


def test_fmt_prints_canonical(capsys):
    path = ROOT / "examples" / "digits.cnn"
    assert main(["fmt", str(path)]) == 0
    assert capsys.readouterr().out == path.read_text()


def test_fmt_check_and_write(tmp_path, capsys):
    p = tmp_path / "messy.cnn"
    p.write_text("network n{ input 3x8x8\n  relu # keep me\n}")
    assert main(["fmt", "--check", str(p)]) == 1
    assert "not in canonical format" in capsys.readouterr().err
    assert main(["fmt", "--write", str(p)]) == 0
    assert p.read_text() == "network n {\n    input 3x8x8\n    relu  # keep me\n}\n"
    assert main(["fmt", "--check", str(p)]) == 0
    assert not list(tmp_path.glob("*.tmp"))


def test_fmt_invalid_syntax_is_status_1(bad_file, capsys):
    bad_file.write_text("network n {\n    input 3x8x8\n    relu )\n}\n")
    assert main(["fmt", str(bad_file)]) == 1
    assert capsys.readouterr().err.startswith(f"{bad_file}:3:10: error: unexpected ')'")


def test_fmt_does_not_need_a_valid_network(bad_file, capsys):
    # fmt is about layout: an unknown layer is not its business
    assert main(["fmt", str(bad_file)]) == 0
    assert capsys.readouterr().out == BAD


def test_subprocess_exit_status_and_no_traceback(bad_file):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("FUSENET_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", "check", str(bad_file)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.startswith(f"{bad_file}:3:5: error: unknown layer 'cnov'")
    assert "Traceback" not in r.stderr



def test_a_bad_kernel_switch_in_the_environment_is_a_usage_error():
    # FUSENET_POOL_GRAD (engine.kernels.conv.function) is read when the kernels are imported
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "FUSENET_POOL_GRAD": "bogus"}
    env.pop("FUSENET_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", "train", str(ROOT / "examples" / "digits.cnn"), "--epochs", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert "FUSENET_POOL_GRAD='bogus' is not a choice" in r.stderr
    assert "hint: set it to 'kernel'" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- one handler, one exit status each


@pytest.fixture
def failing_check(monkeypatch):
    """`fusenet check` whose handler raises what the test gives it."""
    from engine.cli import spec

    def use(exc):
        def handler(args):
            raise exc

        monkeypatch.setattr(spec, "cmd_check", handler)

    return use


def test_internal_error_is_status_3_without_traceback(failing_check, capsys, monkeypatch, bad_file):
    monkeypatch.delenv("FUSENET_DEBUG", raising=False)
    failing_check(ZeroDivisionError("boom"))
    assert main(["check", str(bad_file)]) == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "fusenet check: internal error: ZeroDivisionError: boom",
        "hint: this is a fusenet bug; rerun with FUSENET_DEBUG=1 for the traceback and report it",
    ]


def test_internal_error_traceback_with_fusenet_debug(failing_check, capsys, monkeypatch, bad_file):
    monkeypatch.setenv("FUSENET_DEBUG", "1")
    failing_check(ZeroDivisionError("boom"))
    assert main(["check", str(bad_file)]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "internal error: ZeroDivisionError: boom" in err


@pytest.mark.parametrize("exc_name, status", [("FusenetTrainError", 1), ("DataError", 1), ("CheckpointError", 1),
                                              ("InputFileError", 1), ("UsageError", 2)])
def test_user_errors_are_one_line(failing_check, capsys, bad_file, exc_name, status):
    import engine.errors

    failing_check(getattr(engine.errors, exc_name)("no good"))
    assert main(["check", str(bad_file)]) == status
    assert capsys.readouterr().err == "fusenet check: error: no good\n"


def test_interrupt_is_status_130(failing_check, capsys, bad_file):
    failing_check(KeyboardInterrupt())
    assert main(["check", str(bad_file)]) == 130
    assert capsys.readouterr().err == "\nfusenet check: interrupted\n"


def test_interrupted_training_keeps_its_checkpoint(monkeypatch, capsys, tmp_path):
    from engine.cli import train

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "cmd_train", interrupted)
    assert main(["train", str(tmp_path / "any.cnn")]) == 130
    assert capsys.readouterr().err == (
        "\nfusenet train: interrupted; the last checkpoint is kept (continue with --resume)\n")


def test_help_lists_the_exit_statuses(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for line in ("exit status:", "  2    a usage error", "  3    an internal error", "  130  interrupted"):
        assert line in out


def test_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    from engine.version import __version__

    assert capsys.readouterr().out == (
        f"fusenet {__version__} (triton {metadata.version('triton')}, torch {metadata.version('torch')})\n")


def test_shipped_examples_are_found_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no examples/ here
    assert main(["check", "examples/digits.cnn"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("network digits: ")
    assert main(["check", "examples/no_such_example.cnn"]) == 1
    assert "no such file: examples/no_such_example.cnn" in capsys.readouterr().err
    # fmt --write never rewrites a shipped file in place of the one named
    assert main(["fmt", "--write", "examples/digits.cnn"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_a_file_here_comes_before_a_shipped_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "digits.cnn").write_text(BAD)
    assert main(["check", "examples/digits.cnn"]) == 1
    assert "unknown layer 'cnov'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- cheap to start

CLI_DIR = ROOT / "engine" / "cli"
HEAVY = ("torch", "triton", "numpy", "engine.kernels", "engine.runtime", "engine.training", "engine.perf.aot",
         "engine.perf.step", "engine.perf.analytic", "engine.device", "engine.passes")


def _top_level_imports(path: Path, everywhere: bool = False) -> list[str]:
    """Imported names (`from a import b` is a.b); with everywhere=True, function-level imports too."""
    import ast

    names = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree) if everywhere else tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [f"{node.module}.{a.name}" for a in node.names]  # `from engine import x` is engine.x
    return names


@pytest.mark.parametrize("path", sorted(CLI_DIR.glob("*.py")), ids=lambda p: p.name)
def test_command_modules_import_heavy_modules_only_in_handlers(path):
    heavy = [n for n in _top_level_imports(path) if n == "engine" or any(n == h or n.startswith(h + ".") for h in HEAVY)]
    assert not heavy, f"{path.name} imports {heavy} at module level; import them inside the handler"


def test_command_modules_import_no_private_names_of_each_other():
    for path in CLI_DIR.glob("*.py"):
        private = [n for n in _top_level_imports(path, everywhere=True)
                   if n.startswith("engine.cli.") and n.rsplit(".", 1)[1].startswith("_")]
        assert not private, (path.name, private)


def test_parser_check_and_fmt_import_no_torch():
    """Building the parser, --help, check and fmt import neither torch nor triton (nor numpy)."""
    code = ("import contextlib, io\n"
            "from engine.cli.main import build_parser, main\n"
            "build_parser().format_help()\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['check', 'examples/digits.cnn']) == 0\n"
            "    assert main(['fmt', 'examples/digits.cnn']) == 0\n")
    assert heavy_imports(code, ROOT) == []


def test_a_reader_that_goes_away_is_not_an_error():
    """`fusenet check FILE... | head -1`: the pipe closes while fusenet still writes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("FUSENET_DEBUG", None)
    files = [str(p) for p in sorted((ROOT / "examples").glob("*.cnn"))] * 12  # more than a pipe buffer
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "check", *files], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # the reader is gone
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "internal error" not in err and "Traceback" not in err and "BrokenPipe" not in err
