"""`check` and `fmt` over several files and folders (what editors and pre-commit hooks run),
`fmt --write` through a symbolic link, validated numeric flags, and help texts."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main
from engine.cli.main import build_parser
from helpers import heavy_imports

ROOT = Path(__file__).resolve().parents[2]
DIGITS = (ROOT / "examples" / "digits.cnn").read_text()
UGLY = "network n {\ninput 1x8x8\n  conv 4 kernel=3   pad=1\n}\n"
BAD = "network n {\n    input 3x8x8\n    cnov 16 kernel=3\n}\n"


def test_check_takes_several_files(tmp_path, capsys):
    (tmp_path / "a.cnn").write_text(DIGITS)
    (tmp_path / "b.cnn").write_text(UGLY)
    assert main(["check", str(tmp_path / "a.cnn"), str(tmp_path / "b.cnn")]) == 0
    out = capsys.readouterr().out
    assert f"== {tmp_path / 'a.cnn'}" in out and "network n:" in out and "network digits:" in out


def test_check_reports_every_bad_file_and_goes_on(tmp_path, capsys):
    (tmp_path / "bad.cnn").write_text(BAD)
    (tmp_path / "good.cnn").write_text(DIGITS)
    assert main(["check", str(tmp_path / "bad.cnn"), str(tmp_path / "good.cnn")]) == 1
    cap = capsys.readouterr()
    assert "bad.cnn:3:5: error" in cap.err and "network digits:" in cap.out


def test_fmt_check_over_a_tree(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.cnn").write_text(DIGITS)
    (tmp_path / "sub" / "b.cnn").write_text(UGLY)
    (tmp_path / "notes.txt").write_text("not a spec")
    assert main(["fmt", "--check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "b.cnn: not in canonical format" in err and "a.cnn" not in err
    assert main(["fmt", "--write", str(tmp_path)]) == 0
    assert main(["fmt", "--check", str(tmp_path)]) == 0


def test_fmt_several_files_needs_check_or_write(tmp_path, capsys):
    (tmp_path / "a.cnn").write_text(DIGITS)
    assert main(["fmt", str(tmp_path / "a.cnn"), str(tmp_path / "a.cnn")]) == 2
    assert "--check" in capsys.readouterr().err


def test_folder_without_specs_is_an_error(tmp_path, capsys):
    assert main(["fmt", "--check", str(tmp_path)]) == 1
    assert "holds no .cnn files" in capsys.readouterr().err


def test_fmt_write_through_a_symlink_keeps_the_link(tmp_path):
    target = tmp_path / "real.cnn"
    target.write_text(UGLY)
    link = tmp_path / "link.cnn"
    link.symlink_to(target)
    assert main(["fmt", "--write", str(link)]) == 0
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert target.read_text() != UGLY and main(["fmt", "--check", str(target)]) == 0


def test_fmt_write_leaves_a_canonical_file_untouched(tmp_path):
    p = tmp_path / "a.cnn"
    p.write_text(DIGITS)
    before = p.stat().st_mtime_ns
    assert main(["fmt", "--write", str(p)]) == 0
    assert p.stat().st_mtime_ns == before


@pytest.mark.parametrize("argv", [
    ["check", "--kernels", "--batch", "-1", "examples/digits.cnn"],
    ["check", "--kernels", "--batch", "0", "examples/digits.cnn"],
    ["inspect", "--batch", "-4", "examples/digits.cnn"],
    ["train", "examples/digits.cnn", "--lr", "-1"],
    ["train", "examples/digits.cnn", "--lr", "nan"],
    ["train", "examples/digits.cnn", "--epochs", "0"],
    ["eval", "examples/digits.cnn", "--checkpoint", "c", "--batch", "-5"],
    ["eval", "examples/digits.cnn", "--checkpoint", "c", "--batch", "0"],
    ["extract", "examples/digits.cnn", "--checkpoint", "c", "--tap", "t", "--batch", "0"],
    ["predict", "examples/digits.cnn", "--checkpoint", "c", "--top", "-3", "x.png"],
])
def test_bad_numbers_in_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "must be" in err and "Traceback" not in err


def _help_of(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()


def test_every_argument_of_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in sub.choices.items()
               for a in p._actions if a.dest != "help" and not a.help]
    assert not missing, f"arguments without help text: {missing}"
    assert "number of epochs" in _help_of("train") and "how many classes" in _help_of("predict")


def test_check_fmt_and_help_import_neither_torch_nor_triton(tmp_path):
    (tmp_path / "a.cnn").write_text(DIGITS)
    code = ("import contextlib, io\n"
            "from engine.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            f"    assert main(['check', 'examples/digits.cnn', {str(tmp_path / 'a.cnn')!r}]) == 0\n"
            f"    assert main(['fmt', '--check', {str(tmp_path)!r}]) == 0\n")
    assert heavy_imports(code, ROOT) == []
