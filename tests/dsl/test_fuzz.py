"""Fuzzing the front end: thousands of mutated programs through the entry point
`fusenet check` uses (engine.ir.frontend.load), and a sample through the real
CLI. Every program must load, or be rejected with located diagnostics; nothing
may raise anything else, hang, or print an invisible character raw.

Seeded and reproducible: the seed is printed, and every failure names it and
shows the program. FUSENET_FUZZ_SEED=N reruns a seed (`random` draws one);
FUSENET_FUZZ_PROGRAMS=N and FUSENET_FUZZ_CLI_PROGRAMS=N change how many
programs a run tries in-process and through the CLI.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dsl.errors import FusenetError, escape_invisible
from dsl.formatter import format_program
from dsl.parser import parse
from engine.ir.frontend import Spec, load

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SEED = 13
PROGRAMS = int(os.environ.get("FUSENET_FUZZ_PROGRAMS", "2500"))
# Each CLI run starts a Python that imports the engine (and, until `check` is
# torch-free, torch: about 2.5 s of CPU a run here).
CLI_PROGRAMS = int(os.environ.get("FUSENET_FUZZ_CLI_PROGRAMS", "20"))
# Per program, in CPU time (not wall time, which other processes stretch): 1 s,
# plus a little per layer built and per character parsed, since a legal
# program may expand to MAX_LAYERS layers (seconds of honest work). A hang or
# anything worse than linear still fails.
CPU_BUDGET_S = 1.0
CPU_PER_LAYER_S = 30e-6
CPU_PER_CHAR_S = 40e-6  # and per character: parsing 100 KB of parentheses is honest work too
HANG_S = 10.0  # wall time after which a program counts as hung and is interrupted


def _seed() -> int:
    raw = os.environ.get("FUSENET_FUZZ_SEED", str(DEFAULT_SEED))
    return random.SystemRandom().randrange(2**32) if raw == "random" else int(raw)


SEED = _seed()


# ---- the corpus: the examples and the programs of the other front-end tests ----------------------


def _sibling(name: str):
    """Another test module of this folder, loaded by path (pytest imports tests in importlib
    mode, so test modules are not importable by name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"fuzz_corpus_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _corpus() -> list[str]:
    test_errors, test_parser, test_properties = (_sibling(n) for n in ("test_errors", "test_parser", "test_properties"))

    programs = [p.read_text() for p in sorted((ROOT / "examples").glob("*.cnn"))]
    programs += list(test_parser.DESIGN_PROGRAMS.values())
    programs += [case[1] for case in test_errors.CASES]
    programs += [text for text in test_properties.REGRESSIONS if text]
    programs += [
        "network mlp {\n    input 20\n    linear 32 -> bn -> relu\n    scale -0.5\n    linear 3\n}\n"
        "train {\n    clip_grad 1.5\n    optimizer adamw lr=1e-3 weight_decay=0.01\n    augment crop=2 flip=true\n}\n",
        "block b(c, s=1, n=2) {\n    repeat n {\n        residual {\n            conv c kernel=3 stride=s pad=1\n"
        "        } shortcut {\n            conv c kernel=1 stride=s\n        }\n    }\n}\n"
        "network n {\n    input 3x16x16\n    x = b 8\n    b 16 s=2 n=1 -> concat x\n}\n",
    ]
    return programs


CORPUS = _corpus()

# ---- mutations --------------------------------------------------------------------------------------

TOKENS = ["{", "}", "(", ")", "->", "=", ",", "x", "-", "+", "*", "/", "//", "%", "#", '"', "\n", " ", "\t",
          "0", "1", "7", "-1", "3x3", "1x1x1", ".5", "1e-3", "relu", "conv", "add", "concat", "e1", "same",
          "true", "residual", "shortcut", "repeat", "block", "network", "train", "input", "freeze", "c",
          "stride=2", "pad=same", "kernel=0", "groups=3", "upsample", "blurpool", "linear", "flatten",
          "input 20", "scale -1", "clip_grad -5"]
ODD_CHARS = ["\x00", "\x0c", "\x0b", "\x1b", "\x7f", "\x85", "\u00a0", "\u200b", "\u2028", "\ufeff", "\ufffd",
             "é", "ß", "\U0001f600", "\r", "\\", "'", "`", "$", "@", "~", "!", "?", ";", ":", "[", "]"]
HUGE = ["9" * 5000, "9" * 400, "9" * 400 + ".5", "1e309", "1e-400", "9223372036854775808", "9223372036854775807",
        "1048577", "65537", "4294967296", " + ".join(["1"] * 500), "(" + "-" * 2000 + "1)", "(" + "-" * 100 + "1)",
        " * ".join(["99999"] * 8), "(" * 400 + "1" + ")" * 400, "(1 - " * 150 + "1" + ")" * 150, "0", "00", "1001"]
NESTERS = ["repeat 2 {", "repeat 1000 {", "residual {", "repeat 1 {"]


def _mutate_once(rng: random.Random, text: str) -> str:
    kind = rng.choice(["delete", "insert_token", "replace_token", "insert_char", "dup_line", "drop_line",
                       "swap_lines", "huge_number", "nest", "splice", "repeat_line", "exponential", "deep_blocks",
                       "small_number", "small_number"])  # the last keeps many programs valid
    i = rng.randint(0, len(text))
    lines = text.split("\n")
    j = rng.randrange(len(lines))
    if kind == "delete":
        return text[:i] + text[i + rng.randint(1, 8):]
    if kind == "insert_token":
        return text[:i] + rng.choice(TOKENS) + text[i:]
    if kind == "replace_token":
        spans = [m.span() for m in re.finditer(r"\S+", text)]
        if spans:
            a, b = rng.choice(spans)
            return text[:a] + rng.choice(TOKENS) + text[b:]
        return text
    if kind == "insert_char":
        return text[:i] + rng.choice(ODD_CHARS) + text[i:]
    if kind == "dup_line":
        lines.insert(j, lines[j])
    elif kind == "drop_line":
        del lines[j]
    elif kind == "swap_lines":
        k = rng.randrange(len(lines))
        lines[j], lines[k] = lines[k], lines[j]
    elif kind == "repeat_line":
        lines[j:j + 1] = [lines[j]] * rng.choice([10, 100])
    elif kind in ("huge_number", "small_number"):
        numbers = list(re.finditer(r"\d+(\.\d*)?", text))
        if numbers:
            m = rng.choice(numbers)
            new = rng.choice(HUGE if kind == "huge_number" else ["1", "2", "3", "4", "8", "16", "0.5"])
            return text[:m.start()] + new + text[m.end():]
        return text
    elif kind == "nest":
        depth = rng.choice([3, 30, 64, 65, 300])
        opener = rng.choice(NESTERS)
        lines[j:j + 1] = [opener] * depth + [lines[j]] + ["}"] * depth
    elif kind == "splice":
        other = rng.choice(CORPUS).split("\n")
        a = rng.randrange(len(other))
        lines[j:j] = other[a:a + rng.randint(1, 6)]
    elif kind == "exponential":
        # small, or so big that a few edits still leave it refused before expansion:
        # sizes in between are legal programs of 100,000 layers, which take seconds
        k = rng.choice([3, 8, 40])
        blocks = ["block z0() {", "    relu", "}"]
        for level in range(1, k):
            blocks += [f"block z{level}() {{", f"    z{level - 1}", f"    z{level - 1}", "}"]
        lines = blocks + lines
        lines.insert(min(len(lines), len(blocks) + 2 + j), f"    z{k - 1}")
    elif kind == "deep_blocks":  # nesting inside blocks that call blocks: deep only once expanded
        k, depth = rng.choice([3, 40]), rng.choice([2, 20, 60])
        blocks = ["block y0() {", "    relu", "}"]
        for level in range(1, k):
            blocks += [f"block y{level}() {{"] + ["residual {"] * depth + [f"y{level - 1}"] + ["}"] * depth + ["}"]
        lines = blocks + lines
        lines.insert(min(len(lines), len(blocks) + 2 + j), f"    y{k - 1}")
    return "\n".join(lines)


def mutated(rng: random.Random) -> str:
    text = rng.choice(CORPUS)
    for _ in range(rng.choice([1, 1, 2, 3])):
        text = _mutate_once(rng, text)
    return text


# ---- checking one program ------------------------------------------------------------------------------


class _Hung(Exception):
    pass


def _alarm(signum, frame):
    raise _Hung


def _located(err: FusenetError, text: str) -> None:
    lines = text.removeprefix("\ufeff").split("\n")
    out = err.format()
    assert err.diagnostics, "an error without diagnostics"
    for d in err.diagnostics:
        assert 1 <= d.pos.line <= len(lines), f"line {d.pos.line} outside the file: {d}"
        assert 1 <= d.pos.col <= len(lines[d.pos.line - 1].rstrip("\r")) + 1, f"column outside line {d.pos.line}: {d}"
        assert d.message.strip()
    head, *rest = out.split("\n")
    d = err.diagnostics[0]
    assert head == escape_invisible(f"<string>:{d.pos.line}:{d.pos.col}: error: {d.message}"), head
    assert re.fullmatch(r" {%d}\^~*" % (4 + d.pos.col - 1), rest[1]), f"no caret under column {d.pos.col}:\n{out}"
    raw = [c for c in out if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0]
    assert not raw, f"raw control characters {raw!r} in:\n{out}"
    assert "Traceback" not in out


class _LayerCounter:
    """Counts the layers (made or refused with an error) and block calls the
    expander expands: the work a program asks for."""

    def __init__(self, monkeypatch):
        import engine.ir.expand as expand

        self.count = 0
        count_work = expand._Expander.count_work

        def counting(expander, *args, **kwargs):
            self.count += 1
            return count_work(expander, *args, **kwargs)

        monkeypatch.setattr(expand._Expander, "count_work", counting)


def _as_source(text: str) -> str:
    # load() takes a one-line string without '{' for a file name (`fusenet check x.cnn`)
    return text if "\n" in text or "{" in text else text + "\n"


def check_program(text: str) -> tuple[str, float]:
    """("accepted" | "rejected", CPU seconds); raises AssertionError on a failure."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    start = time.process_time()
    try:
        try:
            spec = load(_as_source(text))
        except FusenetError as err:
            cpu = time.process_time() - start
            _located(err, text)
            return "rejected", cpu
        cpu = time.process_time() - start
        assert isinstance(spec, Spec) and all(n.shape is not None for n in spec.graph)
        formatted = format_program(parse(text))  # an accepted program survives fmt
        assert parse(formatted) == parse(text)
        assert format_program(parse(formatted)) == formatted
        return "accepted", cpu
    except _Hung:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    raise AssertionError(f"no answer after {HANG_S:.0f} s (wall time)")


def _failure(k: int, text: str, why: str) -> str:
    shown = text if len(text) <= 2000 else text[:1000] + f"\n... ({len(text):,} characters) ...\n" + text[-500:]
    return f"fuzz seed {SEED}, program {k} (rerun: FUSENET_FUZZ_SEED={SEED}): {why}\n---- program ----\n{shown!r}"


def _programs(count: int) -> list[str]:
    rng = random.Random(SEED)
    return [mutated(rng) for _ in range(count)]


def test_mutated_programs_load_or_are_rejected_with_located_errors(monkeypatch):
    print(f"fuzz seed {SEED} (FUSENET_FUZZ_SEED={SEED} reproduces this run), {PROGRAMS} programs")
    layers = _LayerCounter(monkeypatch)
    outcomes: dict[str, int] = {}
    slowest = (0.0, -1)
    for k, text in enumerate(_programs(PROGRAMS)):
        why = None
        layers.count = 0
        try:
            outcome, cpu = check_program(text)
        except AssertionError as e:
            why = str(e)
        except Exception as e:  # noqa: BLE001 - exactly what the test is for
            why = f"{type(e).__name__}: {e}"
        if why is not None:
            pytest.fail(_failure(k, text, why), pytrace=False)
        budget = CPU_BUDGET_S + CPU_PER_LAYER_S * layers.count + CPU_PER_CHAR_S * len(text)
        if cpu > budget:
            pytest.fail(_failure(k, text, f"took {cpu:.2f} s of CPU for {layers.count:,} layers (budget {budget:.2f} s)"), pytrace=False)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        slowest = max(slowest, (cpu, k))
    print(f"outcomes {outcomes}; slowest program {slowest[1]} at {slowest[0]:.3f} s CPU")
    # the mutations must exercise both sides, or the test proves little
    assert outcomes.get("accepted", 0) >= PROGRAMS // 100 and outcomes.get("rejected", 0) >= PROGRAMS // 2, outcomes


def _run_cli(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FUSENET_DEBUG": ""}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "check", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def test_rejected_programs_through_the_real_cli(tmp_path):
    rng = random.Random(SEED + 1)
    chosen: list[str] = []
    while len(chosen) < CLI_PROGRAMS:
        text = mutated(rng)
        try:
            load(_as_source(text))
        except FusenetError:
            chosen.append(text)
    paths = []
    for k, text in enumerate(chosen):
        path = tmp_path / f"fuzz{k}.cnn"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        paths.append(path)
    with ThreadPoolExecutor(max_workers=4) as pool:  # each run starts a Python; overlap the start-ups
        results = list(pool.map(_run_cli, paths))
    for k, (path, result) in enumerate(zip(paths, results)):
        why = None
        if result.returncode != 1:
            why = f"exit status {result.returncode}, not 1"
        elif "Traceback" in result.stderr or "internal error" in result.stderr:
            why = "a traceback or an internal error"
        elif not result.stderr.startswith(f"{path}:"):
            why = "the message does not start with the file's location"
        if why:
            pytest.fail(_failure(k, chosen[k], f"{why}\n---- stderr ----\n{result.stderr[-3000:]}"), pytrace=False)
