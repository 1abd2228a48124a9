"""The formatter: canonical text that parses back to the same program, is a
fixed point, and keeps every comment. (Generated programs: test_properties.py.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dsl import ast
from dsl.formatter import format_expr, format_program
from dsl.parser import parse

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.cnn"))


def comments(text: str) -> list[str]:
    return re.findall(r"#[^\n]*", text)


def roundtrip(text: str) -> str:
    p = parse(text)
    out = format_program(p)
    assert parse(out) == p
    assert format_program(parse(out)) == out, "formatting is not idempotent"
    assert [c.strip() for c in comments(out)] == [c.strip() for c in comments(text)]
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_roundtrip_and_are_canonical(path):
    text = path.read_text()
    assert roundtrip(text) == text


def test_messy_layout_becomes_canonical():
    text = "network   n{ input 3x8x8\n\tconv 4   kernel = (3)->relu\n  x=maxpool 2\n}\ntrain{\nbatch 4\n   optimizer sgd lr=0.1\n}"
    assert roundtrip(text) == (
        "network n {\n"
        "    input 3x8x8\n"
        "    conv 4 kernel=3 -> relu\n"
        "    x = maxpool 2\n"
        "}\n"
        "\n"
        "train {\n"
        "    batch     4\n"
        "    optimizer sgd lr=0.1\n"
        "}\n"
    )


def test_comments_stay_where_they_were():
    text = """\
# head
block b(c, s=1) {  # on the block line
    # first in block
    conv c kernel=3 stride=s pad=1  # trailing
    residual {
        relu
        # last in body
    } shortcut {  # on the shortcut line
        # first in shortcut
        conv c kernel=1
    }  # after the residual
    # last in block
}

# between
network n {
    input 3x8x8
    repeat 2 {
        # in repeat
        b 4
        # end of repeat
    }
    # last in network
}

train {
    # first option
    batch 4  # trailing option
    seed  1
    # last in train
}
# end of file
"""
    assert roundtrip(text) == text


def test_comment_only_train_and_empty_bodies():
    text = "network n {\n    input 3x8x8\n    residual {\n    }\n}\n\ntrain {\n    # nothing yet\n}\n"
    assert roundtrip(text) == text


def test_minimal_parentheses():
    text = "network n {\n    input 3x8x8\n    l a=(1 + 2) * 3 b=1 + (2 * 3) c=(1 - 2) - 3 d=1 - (2 - 3) e=-(a + 1) f=2 * -3 g=(-1) h=a // (b % 2)\n}\n"
    out = roundtrip(text)
    assert "a=(1 + 2) * 3 b=1 + 2 * 3 c=1 - 2 - 3 d=1 - (2 - 3) e=-(a + 1) f=2 * -3 g=-1 h=a // (b % 2)" in out


def test_negative_positionals_after_the_first_keep_their_parentheses():
    # right after the layer's name a '-' is a sign, so the first needs none
    text = "network n {\n    input 3x8x8\n    l (-1) (-a * 2) c-1\n    repeat (-1) {\n    }\n}\n"
    out = roundtrip(text)
    assert "    l -1 (-a * 2) c - 1\n" in out
    assert "    repeat (-1) {\n" in out


def test_numbers_kept_as_written():
    out = roundtrip("network n {\n    input 3x8x8\n    l 5e-4 1.50 .5 2. 1E3 007\n}\n")
    assert "    l 5e-4 1.50 .5 2. 1E3 007\n" in out


def test_strings_dims_and_bools():
    out = roundtrip('network n {\n    input 3x8x8\n    l "a b" 3x3 k=1x7 t=true\n}\ntrain {\n    data "x/y"\n}\n')
    assert '    l "a b" 3x3 k=1x7 t=true\n' in out and '    data "x/y"\n' in out


def test_non_option_statements_in_train_are_kept():
    # not valid train options (load reports them), but fmt must not lose them
    text = "network n {\n    input 3x8x8\n}\n\ntrain {\n    a = batch 3\n    batch 4 -> seed 1\n    residual {\n        relu\n    }\n}\n"
    assert roundtrip(text) == text


def test_hand_built_ast_without_positions():
    net = ast.Network(
        "n",
        (
            ast.Input(ast.Dims((3, 8, 8))),
            ast.Chain((ast.Layer("conv", (ast.Num(4),), (ast.Keyword("kernel", ast.Num(3)),)), ast.Layer("relu")), "t"),
            ast.Residual((ast.Chain((ast.Layer("relu"),)),), ()),
        ),
    )
    p = ast.Program((), net, ast.TrainSection((ast.Chain((ast.Layer("seed", (ast.Num(1),)),)),)))
    out = format_program(p)
    assert out == (
        "network n {\n    input 3x8x8\n    t = conv 4 kernel=3 -> relu\n    residual {\n        relu\n    } shortcut {\n    }\n}\n"
        "\ntrain {\n    seed 1\n}\n"
    )
    assert parse(out) == p


def test_format_expr_without_text_uses_value():
    assert format_expr(ast.Num(3)) == "3"
    assert format_expr(ast.BinOp("*", ast.Num(0.5), ast.Name("c"))) == "0.5 * c"


def test_blank_line_after_a_header_comment_is_kept():
    text = "# digits.cnn: a header\n# second line\n\nnetwork n {\n    input 3x8x8\n}\n"
    assert roundtrip(text) == text
    # several blank lines become one, and a comment right above its item stays attached
    messy = "# header\n\n\n\n# about n\nnetwork n {\n    input 3x8x8\n}\n\n# section\n\ntrain {\n    seed 1\n}\n"
    assert roundtrip(messy) == "# header\n\n# about n\nnetwork n {\n    input 3x8x8\n}\n\n# section\n\ntrain {\n    seed 1\n}\n"


def test_no_blank_line_is_invented_after_a_trailing_comment():
    text = "network n {\n    input 3x8x8\n}\n# end\n\n\n"
    assert roundtrip(text) == "network n {\n    input 3x8x8\n}\n# end\n"


def test_signed_first_arguments_round_trip():
    text = "network n {\n    input 3x8x8\n    scale -0.125\n    l -1 (-2) a * 3\n}\n\ntrain {\n    clip_grad -5\n}\n"
    assert roundtrip(text) == text


def test_one_dimensional_input_round_trips():
    text = "network n {\n    input 20\n    linear 4\n}\n"
    assert roundtrip(text) == text


def test_long_left_chains_format_without_recursion():
    terms = " - ".join(str(k) for k in range(3000))
    text = f"network n {{\n    input 3x8x8\n    scale {terms}\n    l k=(1 - 2) * 3 - (4 - 5)\n}}\n"
    out = roundtrip(text)
    assert f"    scale {terms}\n" in out and "    l k=(1 - 2) * 3 - (4 - 5)\n" in out
