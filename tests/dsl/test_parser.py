"""The parser: the v0 contract programs, the AST it builds, positions, comments."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dsl import ast
from dsl.ast import BinOp, Chain, Dims, Input, Keyword, Layer, Name, Neg, Num, Repeat, Residual, Str
from dsl.errors import FusenetError
from dsl.parser import parse
from engine.ir.frontend import load

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.cnn"))
DESIGN = Path("/work/shared/DESIGN.md")

# The three programs of DESIGN.md section 1 (the v0 contract), verbatim.
DESIGN_PROGRAMS = {
    "digits": """\
# digits.cnn: a small CNN for 8x8 handwritten digits
network digits {
    input 1x8x8
    conv 16 kernel=3 pad=1 -> bn -> relu
    conv 32 kernel=3 pad=1 -> bn -> relu -> maxpool 2
    global_avgpool
    linear 10
}

train {
    data      digits
    split     0.2
    batch     64
    epochs    15
    optimizer sgd lr=0.1 momentum=0.9 nesterov=true weight_decay=5e-4
    schedule  cosine warmup=1
    loss      cross_entropy label_smoothing=0.1
    seed      0
}
""",
    "resnet_small": """\
# resnet_small.cnn: parametric blocks, residuals, repeats
block basic(c, stride=1) {
    residual {
        conv c kernel=3 stride=stride pad=1 bias=false -> bn -> relu
        conv c kernel=3 pad=1 bias=false -> bn
    } shortcut {
        conv c kernel=1 stride=stride bias=false -> bn
    }
    relu
}

network resnet_small {
    input 3x32x32
    conv 16 kernel=3 pad=1 bias=false -> bn -> relu
    basic 16
    basic 32 stride=2
    repeat 2 {
        basic 64 stride=2
    }
    global_avgpool
    dropout 0.1
    linear 10
}
""",
    "unet_tiny": """\
# unet_tiny.cnn: named taps, concat, upsample (encoder-decoder)
network unet_tiny {
    input 3x32x32
    e1 = conv 16 kernel=3 pad=1 -> relu
    e2 = maxpool 2 -> conv 32 kernel=3 pad=1 -> relu
    maxpool 2 -> conv 64 kernel=3 pad=1 -> relu
    upsample 2 -> conv 32 kernel=3 pad=1 -> relu
    concat e2
    upsample 2 mode=bilinear -> conv 16 kernel=3 pad=1 -> leaky_relu slope=0.1
    add e1
    conv 2 kernel=1
}
""",
}


def test_design_programs_are_current():
    """The embedded copies are the programs of DESIGN.md section 1 (when it is at hand)."""
    if not DESIGN.exists():
        pytest.skip("DESIGN.md not available")
    section = DESIGN.read_text().split("## 1.")[1].split("## 2.")[0]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    assert sorted(blocks) == sorted(DESIGN_PROGRAMS.values())


@pytest.mark.parametrize("name", sorted(DESIGN_PROGRAMS))
def test_design_program_compiles_as_written(name):
    spec = load(DESIGN_PROGRAMS[name])
    assert spec.graph.name == name
    example = load(ROOT / "examples" / f"{name}.cnn")
    # the same network as the example of that name (whose parameters tests/runtime/test_reference.py
    # checks against a hand-written PyTorch model)
    assert spec.program.network == example.program.network
    assert spec.program.blocks == example.program.blocks
    assert sum(n.params for n in spec.graph) == sum(n.params for n in example.graph)
    assert [n.shape for n in spec.graph] == [n.shape for n in example.graph]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_parses_and_compiles(path):
    spec = load(path)
    assert spec.graph.name == path.stem
    assert spec.filename == str(path)
    assert all(n.shape is not None for n in spec.graph)


def test_digits_ast():
    p = parse(DESIGN_PROGRAMS["digits"])
    assert p.blocks == () and p.network.name == "digits"
    body = p.network.body
    assert body[0] == Input(Dims((1, 8, 8)))
    assert body[1] == Chain(
        (
            Layer("conv", (Num(16),), (Keyword("kernel", Num(3)), Keyword("pad", Num(1)))),
            Layer("bn"),
            Layer("relu"),
        )
    )
    assert body[4] == Chain((Layer("linear", (Num(10),)),))
    opts = [o.layers[0] for o in p.train.options]
    assert [o.name for o in opts] == ["data", "split", "batch", "epochs", "optimizer", "schedule", "loss", "seed"]
    assert opts[4].kwarg("weight_decay").value == Num(5e-4)
    assert opts[4].kwarg("nesterov").value == Name("true")
    assert opts[4].kwarg("nope") is None


def test_train_config_from_digits():
    t = load(DESIGN_PROGRAMS["digits"]).train
    assert (t.data, t.split, t.batch, t.epochs, t.seed) == ("digits", 0.2, 64, 15, 0)
    assert (t.optimizer.name, t.optimizer.lr, t.optimizer.momentum, t.optimizer.nesterov, t.optimizer.weight_decay) == (
        "sgd", 0.1, 0.9, True, 5e-4)
    assert (t.schedule.name, t.schedule.warmup) == ("cosine", 1)
    assert (t.loss, t.label_smoothing) == ("cross_entropy", 0.1)


def test_train_config_all_options():
    text = """network n {
    input 3x8x8
    a = relu
}
train {
    data "some/path"
    optimizer adamw beta1=0.8 beta2=0.99 eps=1e-6
    schedule plateau factor=0.5 patience=2 min_lr=1e-5
    augment crop=2 flip=true cutout=4
    precision bf16
    clip_grad 1
    early_stop 3
    freeze a
    sync_bn
}
"""
    t = load(text).train
    assert t.data == "some/path"
    assert (t.optimizer.name, t.optimizer.lr, t.optimizer.weight_decay, t.optimizer.beta1) == ("adamw", 1e-3, 1e-2, 0.8)
    assert (t.schedule.name, t.schedule.factor, t.schedule.patience) == ("plateau", 0.5, 2)
    assert (t.augment.crop, t.augment.flip, t.augment.cutout) == (2, True, 4)
    assert (t.precision, t.clip_grad, t.early_stop, t.freeze, t.sync_bn) == ("bf16", 1.0, 3, ("a",), True)


def test_resnet_small_ast():
    p = parse(DESIGN_PROGRAMS["resnet_small"])
    (b,) = p.blocks
    assert b.name == "basic" and [(q.name, q.default) for q in b.params] == [("c", None), ("stride", Num(1))]
    res = b.body[0]
    assert isinstance(res, Residual) and len(res.body) == 2 and len(res.shortcut) == 1
    assert res.shortcut[0].layers[0].kwarg("stride").value == Name("stride")
    rep = p.network.body[4]
    assert isinstance(rep, Repeat) and rep.count == Num(2)
    assert rep.body == (Chain((Layer("basic", (Num(64),), (Keyword("stride", Num(2)),)),)),)


def test_residual_without_shortcut_is_identity():
    p = parse("network n {\n    input 3x4x4\n    residual {\n        relu\n    }\n}\n")
    assert p.network.body[1].shortcut is None


def test_unet_taps_parse():
    p = parse(DESIGN_PROGRAMS["unet_tiny"])
    binds = [s.bind for s in p.network.body if isinstance(s, Chain)]
    assert binds == ["e1", "e2", None, None, None, None, None, None]
    assert p.network.body[5] == Chain((Layer("concat", (Name("e2"),)),))


@pytest.mark.parametrize(
    "text,want",
    [
        ("a + b * c", BinOp("+", Name("a"), BinOp("*", Name("b"), Name("c")))),
        ("(a + b) * c", BinOp("*", BinOp("+", Name("a"), Name("b")), Name("c"))),
        ("a - b - c", BinOp("-", BinOp("-", Name("a"), Name("b")), Name("c"))),
        ("a - (b - c)", BinOp("-", Name("a"), BinOp("-", Name("b"), Name("c")))),
        ("a // 2 % 3", BinOp("%", BinOp("//", Name("a"), Num(2)), Num(3))),
        ("a / 2", BinOp("/", Name("a"), Num(2))),
        ("-a * 2", BinOp("*", Neg(Name("a")), Num(2))),
        ("-(a + 1)", Neg(BinOp("+", Name("a"), Num(1)))),
        ("2 * -3", BinOp("*", Num(2), Neg(Num(3)))),
        ("3x3", Dims((3, 3))),
        ("1x7", Dims((1, 7))),
        ('"x y"', Str("x y")),
        ("1.5", Num(1.5)),
        (".5", Num(0.5)),
        ("5e-4", Num(5e-4)),
        ("2.", Num(2.0)),
        ("1E3", Num(1000.0)),
    ],
)
def test_keyword_expressions(text, want):
    p = parse(f"network n {{\n    input 3x8x8\n    l k={text}\n}}\n")
    assert p.network.body[1].layers[0].kwargs[0].value == want


def test_number_types_and_text():
    p = parse("network n {\n    input 3x8x8\n    l 16 16.0 5e-4\n}\n")
    a, b, c = p.network.body[1].layers[0].args
    assert type(a.value) is int and type(b.value) is float and type(c.value) is float
    assert (a.text, b.text, c.text) == ("16", "16.0", "5e-4")


def test_positional_minus_is_binary():
    # `conv c -1` is `conv (c - 1)`: a positional argument cannot start with a unary minus
    p = parse("network n {\n    input 3x8x8\n    l c -1 (-2) 3\n}\n")
    args = p.network.body[1].layers[0].args
    assert args == (BinOp("-", Name("c"), Num(1)), Neg(Num(2)), Num(3))


def test_positions():
    text = "block b(c) {\n    conv c*2 kernel=3\n}\nnetwork n {\n    input 3x8x8\n    e1 = b 4 -> relu\n}\n"
    p = parse(text)
    b = p.blocks[0]
    assert (b.pos.line, b.pos.col) == (1, 7)
    conv = b.body[0].layers[0]
    assert (conv.pos.line, conv.pos.col, conv.pos.end_col) == (2, 5, 9)
    arg = conv.args[0]
    assert (arg.pos.line, arg.pos.col, arg.pos.end_col) == (2, 10, 13)
    kw = conv.kwargs[0]
    assert (kw.pos.col, kw.pos.end_col) == (14, 22)
    inp = p.network.body[0]
    assert (inp.pos.line, inp.pos.col, inp.dims.pos.col) == (5, 5, 11)
    chain = p.network.body[1]
    assert (chain.pos.line, chain.pos.col) == (6, 5)
    assert [(la.pos.line, la.pos.col) for la in chain.layers] == [(6, 10), (6, 17)]
    assert str(chain.pos) == "6:5"


def test_layout_does_not_matter():
    a = parse("network n {\n    input 3x8x8\n    conv 4 kernel=3 -> relu\n}\n")
    b = parse("\n\n# c\nnetwork   n{ input 3x8x8\n\tconv 4   kernel = 3->relu # c\n\n\n}")
    assert a == b


def test_blank_lines_and_crlf():
    a = parse("network n {\n    input 3x8x8\n    relu\n}\n")
    b = parse("network n {\r\n\r\n    input 3x8x8\r\n    relu\r\n}\r\n")
    assert a == b


def test_one_line_program():
    p = parse("network n { input 3x8x8 }")
    assert p.network.body == (Input(Dims((3, 8, 8))),)


def test_comments_are_collected():
    text = "# top\nnetwork n {  # after brace\n    input 3x8x8\n    # own\n    relu  # trailing\n}\n# end\n"
    p = parse(text)
    assert [(c.text, c.line, c.own_line) for c in p.comments] == [
        ("# top", 1, True),
        ("# after brace", 2, False),
        ("# own", 4, True),
        ("# trailing", 5, False),
        ("# end", 7, True),
    ]


def test_block_without_params_and_empty_bodies():
    p = parse("block b() {\n}\nnetwork n {\n    input 3x8x8\n    b\n    repeat 2 {\n    }\n}\n")
    assert p.blocks[0].params == () and p.blocks[0].body == ()
    assert load("block b() {\n}\nnetwork n {\n    input 3x8x8\n    b\n}\n").graph.output.shape == (3, 8, 8)


def test_parse_keeps_source_and_filename():
    p = parse(DESIGN_PROGRAMS["unet_tiny"], "u.cnn")
    assert p.source == DESIGN_PROGRAMS["unet_tiny"] and p.filename == "u.cnn"


def test_block_order_and_train_position_are_free():
    text = "train {\n    seed 3\n}\nnetwork n {\n    input 3x8x8\n    b\n}\nblock b() {\n    relu\n}\n"
    spec = load(text)
    assert spec.train.seed == 3 and [n.op for n in spec.graph] == ["input", "relu"]


@pytest.mark.parametrize("word", ["input", "residual", "repeat"])
def test_statement_keywords_are_reserved(word):
    # (block, network, train and shortcut are keywords only where they can occur: the lexer is contextual)
    with pytest.raises(FusenetError):
        parse(f"network n {{\n    input 3x8x8\n    {word} = relu\n}}\n")


def test_ast_is_hashable_and_frozen():
    p = parse(DESIGN_PROGRAMS["resnet_small"])
    hash(p.network)
    with pytest.raises(Exception):
        p.network.name = "x"  # type: ignore[misc]
    assert isinstance(p.network.body, tuple) and p.network.body == tuple(p.network.body)
    assert ast.NOWHERE.line == 0


# -- issue 13: the language side -----------------------------------------------------------------


@pytest.mark.parametrize(
    "line,args",
    [
        ("scale -0.125", (Neg(Num(0.125)),)),
        ("l -1 (-2) c -1", (Neg(Num(1)), Neg(Num(2)), BinOp("-", Name("c"), Num(1)))),
        ("l -a * 2", (BinOp("*", Neg(Name("a")), Num(2)),)),
        ("l -1 - 2", (BinOp("-", Neg(Num(1)), Num(2)),)),
    ],
)
def test_first_positional_may_be_signed(line, args):
    # right after the layer's name a '-' can only be a sign; later it stays binary
    p = parse(f"network n {{\n    input 3x8x8\n    {line}\n}}\n")
    assert p.network.body[1].layers[0].args == args


def test_signed_arguments_in_train_and_layers_load():
    spec = load("network n {\n    input 3x8x8\n    scale -0.125\n}\ntrain {\n    clip_grad 5\n    seed 1\n}\n")
    assert spec.graph.output.attrs["factor"] == -0.125


def test_input_features():
    p = parse("network n {\n    input 20\n    linear 4\n}\n")
    inp = p.network.body[0]
    assert inp == Input(Dims((20,)))
    assert (inp.pos.col, inp.dims.pos.col, inp.dims.pos.end_col) == (5, 11, 13)
    assert load("network n {\n    input 20\n    linear 4\n}\n").graph.input_shape == (20,)


def test_input_features_must_be_an_integer():
    with pytest.raises(FusenetError) as info:
        parse("network n {\n    input 2.5\n}\n")
    (d,) = info.value.diagnostics
    assert (d.pos.line, d.pos.col, d.message) == (2, 11, "input size 2.5 is not an integer")
    assert "input F" in d.hint


def test_utf8_bom_is_ignored():
    text = "network n {\n    input 3x8x8\n    relu\n}\n"
    assert parse("\ufeff" + text) == parse(text)
    with pytest.raises(FusenetError) as info:
        load("\ufeff" + text.replace("relu", "rleu"))
    assert (info.value.diagnostics[0].pos.line, info.value.diagnostics[0].pos.col) == (3, 5)


def test_grammar_is_conflict_and_collision_free_in_strict_mode():
    # the runtime parser skips Lark's slow collision check; strict mode here keeps the grammar honest
    from dsl.parser import build_lark

    build_lark(strict=True)


def test_runtime_parser_skips_the_collision_check(monkeypatch):
    # `fusenet check` builds the parser on every run: the check took 0.3-0.5 s of it
    import lark.lexer

    from dsl import parser

    def refuse(*args, **kwargs):
        raise AssertionError("the collision check ran")

    monkeypatch.setattr(lark.lexer, "_check_regex_collisions", refuse)
    parser._lark.cache_clear()
    try:
        assert parser._lark().parse("network n {\n    input 3x8x8\n}\n")
        assert lark.lexer.has_interegular  # restored for everyone else
    finally:
        parser._lark.cache_clear()
