"""The `fusenet` command line: output and exit status.

Exit status: 0 success; 1 an invalid program, and also a file that cannot be
read (no such file, a directory): that is reported like any other rejected
input, as `path: error: ...` on stderr; 2 a usage error caught by argparse
(no such subcommand, missing file argument, unknown flag).
Never a Python traceback.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
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
    assert main(["check", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


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
