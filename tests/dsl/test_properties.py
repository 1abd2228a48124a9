"""Hypothesis properties of the front end.

1. Formatter round trip on GENERATED programs: parse(format(p)) == p, and
   formatting is a fixed point.
2. Mutation robustness: any text mutation of a valid program either loads or
   is rejected with located diagnostics; never any other exception.
"""
from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsl import ast
from dsl.errors import FusenetError
from dsl.formatter import format_program
from dsl.parser import parse
from dsl.schema import LAYERS, TRAIN_OPTIONS
from engine.ir.frontend import Spec, load

EXAMPLES = {p.stem: p.read_text() for p in sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.cnn"))}

# ---- a strategy for random valid programs -------------------------------------------------------

PARAMS = ["c", "w", "stride", "k", "s", "depth"]
TAPS = ["e1", "e2", "skip", "x"]
BLOCK_NAMES = ["basic", "group", "conv_bn", "res"]
KEYWORDS = sorted({k.name for sig in list(LAYERS.values()) + list(TRAIN_OPTIONS.values()) for k in sig.keywords})
SYMBOLS = ["same", "true", "false", "bilinear", "nearest"]

ints = st.integers(0, 10**6).map(lambda n: ast.Num(n, str(n)))
float_texts = st.one_of(
    st.sampled_from(["0.5", "1e-3", "5e-4", "2.", ".25", "1.5E2", "0.0", "3.14159", "1e+3"]),
    st.floats(0, 1e6, allow_nan=False, allow_infinity=False).map(repr),
)
floats = float_texts.map(lambda t: ast.Num(float(t), t))
atoms = st.one_of(
    ints,
    floats,
    st.sampled_from(PARAMS + SYMBOLS).map(ast.Name),
    st.lists(st.integers(0, 512), min_size=2, max_size=3).map(lambda v: ast.Dims(tuple(v))),
    st.text(st.characters(blacklist_characters='"\n\r', blacklist_categories=("Cs",)), max_size=8).map(ast.Str),
)
exprs = st.recursive(
    atoms,
    lambda sub: st.one_of(
        st.builds(ast.BinOp, st.sampled_from(["+", "-", "*", "/", "//", "%"]), sub, sub),
        st.builds(ast.Neg, sub),
    ),
    max_leaves=6,
)


@st.composite
def layers(draw, names):
    name = draw(names)
    args = draw(st.lists(exprs, max_size=3))
    kw_names = draw(st.lists(st.sampled_from(KEYWORDS), max_size=3, unique=True))
    kwargs = tuple(ast.Keyword(k, draw(exprs)) for k in kw_names)
    return ast.Layer(name, tuple(args), kwargs)


LAYER_NAMES = st.sampled_from(sorted(LAYERS) + BLOCK_NAMES)


def chains(names=LAYER_NAMES):
    return st.builds(
        ast.Chain,
        st.lists(layers(names), min_size=1, max_size=3).map(tuple),
        st.one_of(st.none(), st.sampled_from(TAPS)),
    )


def stmts():
    return st.recursive(
        chains(),
        lambda sub: st.one_of(
            st.builds(
                ast.Residual,
                st.lists(sub, max_size=3).map(tuple),
                st.one_of(st.none(), st.lists(sub, max_size=2).map(tuple)),
            ),
            st.builds(ast.Repeat, exprs, st.lists(sub, max_size=3).map(tuple)),
        ),
        max_leaves=8,
    )


bodies = st.lists(stmts(), max_size=5).map(tuple)


@st.composite
def block_defs(draw):
    names = draw(st.lists(st.sampled_from(PARAMS), max_size=3, unique=True))
    params = tuple(ast.Param(n, draw(st.one_of(st.none(), exprs))) for n in names)
    return ast.BlockDef(draw(st.sampled_from(BLOCK_NAMES)), params, draw(bodies))


@st.composite
def networks(draw):
    dims = ast.Dims(tuple(draw(st.lists(st.integers(1, 64), min_size=3, max_size=3))))
    body = draw(bodies)
    return ast.Network(draw(st.sampled_from(["n", "resnet", "digits_2"])), (ast.Input(dims),) + body)


train_sections = st.lists(
    st.builds(ast.Chain, st.tuples(layers(st.sampled_from(sorted(TRAIN_OPTIONS))))), max_size=6
).map(lambda opts: ast.TrainSection(tuple(opts)))

programs = st.builds(
    ast.Program,
    st.lists(block_defs(), max_size=3).map(tuple),
    networks(),
    st.one_of(st.none(), train_sections),
)


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(programs)
def test_generated_programs_roundtrip(program):
    text = format_program(program)
    parsed = parse(text)
    assert parsed == program, text
    assert format_program(parsed) == text


# ---- mutations of valid programs ----------------------------------------------------------------

TOKENS = ["{", "}", "(", ")", "->", "=", ",", "x", "-", "*", "//", "#", '"', "\n", " ", "\t", "0", "1", "7",
          "3x3", "1e999", ".5", "relu", "conv", "add", "concat", "e1", "same", "true", "residual", "shortcut",
          "repeat", "block", "network", "train", "input", "freeze", "c", "stride=2", "pad=same", "kernel=0",
          "groups=3", "99999999999999999999", "1e308*1e308", "upsample", "blurpool", "linear", "flatten", "é", "\r\n"]


@st.composite
def mutations(draw):
    text = EXAMPLES[draw(st.sampled_from(sorted(EXAMPLES)))]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "dup_line", "drop_line", "swap_numbers", "dup_token", "swap_tokens"]))
        i = draw(st.integers(0, len(text)))
        if kind == "delete":
            text = text[:i] + text[i + 1:]
        elif kind == "insert":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i:]
        elif kind == "replace":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i + 1:]
        elif kind in ("dup_line", "drop_line"):
            lines = text.split("\n")
            j = draw(st.integers(0, len(lines) - 1))
            if kind == "dup_line":
                lines.insert(j, lines[j])
            else:
                del lines[j]
            text = "\n".join(lines)
        elif kind == "swap_numbers":
            new = draw(st.sampled_from(["0", "1", "2", "3", "5", "64", "1000", "2.5", "1x1"]))
            nums = list(re.finditer(r"\d+", text))
            if nums:
                m = nums[draw(st.integers(0, len(nums) - 1))]
                text = text[: m.start()] + new + text[m.end():]
        else:
            toks = re.findall(r"\S+|\s+", text)
            if len(toks) > 1:
                a, b = draw(st.integers(0, len(toks) - 1)), draw(st.integers(0, len(toks) - 1))
                if kind == "dup_token":
                    toks.insert(a, toks[a])
                else:
                    toks[a], toks[b] = toks[b], toks[a]
                text = "".join(toks)
    return text


def check_outcome(text: str) -> None:
    try:
        spec = load(text)
    except FusenetError as e:
        assert e.diagnostics
        for d in e.diagnostics:
            assert d.pos.line >= 1 and d.pos.col >= 1, d
            assert d.message.strip()
        out = e.format()
        assert out.startswith("<string>:") and "Traceback" not in out
        return
    assert isinstance(spec, Spec)
    assert all(n.shape is not None for n in spec.graph)
    # a program that loads also survives the formatter
    p = parse(text)
    assert parse(format_program(p)) == p


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_mutated_programs_load_or_fail_cleanly(text):
    check_outcome(text)


# Crashes found by mutation (and fixed): kept as regressions.
REGRESSIONS = [
    "network n {\n    input 3x8x8\n    conv 1e999 kernel=1\n}\n",  # OverflowError converting inf to int
    "network n {\n    input 3x8x8\n    conv (1e308*1e308-1e308*1e308) kernel=1\n}\n",  # nan
    "network n {\n    input 3x8x8\n    conv " + "9" * 400 + "/3 kernel=1\n}\n",  # int/int too large for a float
    "network n {\n    input 3x8x8\n    relu\n}\ntrain {\n    epochs 21e9994\n}\n",
    "",
]


def test_regressions():
    for text in REGRESSIONS:
        check_outcome(text)
