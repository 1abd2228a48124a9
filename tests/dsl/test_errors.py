"""Rejected programs: every error is located (line, column), says what is wrong,
and hints at the fix where one helps. Errors are part of the language."""
from __future__ import annotations

import re

import pytest

from dsl.errors import FusenetError
from engine.ir.frontend import load


def src(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def net(*body: str, pre: tuple[str, ...] = (), post: tuple[str, ...] = ()) -> str:
    """A network `n` on 3x8x8 input; its body starts on line len(pre) + 3."""
    return src(*pre, "network n {", "    input 3x8x8", *body, "}", *post)


def diagnostics(text: str):
    with pytest.raises(FusenetError) as info:
        load(text)
    return info.value.diagnostics, info.value


BLOCK_B = ("block b(c, stride=1) {", "    conv c kernel=1 stride=stride", "}")  # 3 lines

# (id, program, line, col, message substring, hint substring or None)
CASES = [
    # -- syntax errors ------------------------------------------------------------
    ("syntax-dangling-arrow", net("    conv 16 kernel=3 ->"), 3, 24, "unexpected end of line", "expected a name"),
    ("syntax-stray-paren", net("    conv 16 kernel=3 )"), 3, 22, "unexpected ')'", None),
    ("syntax-bad-character", net("    conv 16 kernel=3 @"), 3, 22, "unexpected character '@'", "names use letters"),
    ("syntax-single-quotes", net("    conv 16 'x'"), 3, 13, "unexpected character '''", "double quotes"),
    ("syntax-unclosed-brace", src("network n {", "    input 3x8x8", "    relu"), 3, 9, "unexpected end of file", "missing its '}'"),
    ("syntax-stray-equals", net("    conv 16 kernel=3 =4"), 3, 22, "unexpected '='", "key=value"),
    ("syntax-network-without-name", src("network {", "    input 3x8x8", "}"), 1, 9, "unexpected '{'", "expected a name"),
    # -- unknown names ------------------------------------------------------------
    ("unknown-layer", net("    conv 8 kernel=3 -> bn", "    cnov 16 kernel=3"), 4, 5, "unknown layer 'cnov'", "did you mean 'conv'?"),
    ("unknown-layer-in-chain", net("    conv 8 kernel=3 -> rleu"), 3, 24, "unknown layer 'rleu'", "did you mean 'relu'?"),
    ("unknown-parameter", net("    conv 16 kernal=3"), 3, 13, "unknown parameter 'kernal' for layer 'conv'", "did you mean 'kernel'?"),
    ("unknown-parameter-no-keywords", net("    relu inplace=true"), 3, 10, "unknown parameter 'inplace'", "takes no keyword"),
    # -- argument types -----------------------------------------------------------
    ("float-channels", net("    conv 16.5 kernel=3"), 3, 10, "conv's OUT must be an integer, got number 16.5", None),
    ("name-as-channels", net("    conv relu kernel=3"), 3, 10, "conv's OUT must be an integer, got name 'relu'", None),
    ("bool-dropout", net("    dropout true"), 3, 13, "dropout's P must be a number, got boolean true", None),
    ("dropout-out-of-range", net("    dropout 1.5"), 3, 13, "must be in [0, 1)", None),
    ("bad-upsample-mode", net("    upsample 2 mode=bicubic"), 3, 21, "must be one of nearest, bilinear", None),
    ("kernel-triple", net("    conv 4 kernel=1x2x3"), 3, 19, "one integer or an HxW pair", None),
    ("true-division-in-block", src("block b(c) {", "    conv c/2 kernel=1", "}", "network n {", "    input 3x8x8", "    b 4", "}"),
     2, 10, "must be an integer, got number 2", "use // for integer division"),
    ("division-by-zero", net("    conv 4//0 kernel=1"), 3, 10, "division by zero", None),
    ("huge-float-literal", net("    scale 1e999"), 3, 11, "number 1e999 is too large for a 64-bit float", "1.8e308"),
    # -- arity ----------------------------------------------------------------------
    ("missing-positional-conv", net("    conv kernel=3"), 3, 5, "'conv' needs OUT", "usage: conv OUT kernel="),
    ("missing-positional-maxpool", net("    maxpool"), 3, 5, "'maxpool' needs KERNEL", "usage: maxpool KERNEL"),
    ("missing-keyword-kernel", net("    conv 4"), 3, 5, "'conv' needs kernel=", "usage: conv OUT"),
    ("extra-positional", net("    conv 16 3 kernel=3"), 3, 13, "'conv' takes 1 positional argument, got 2", "usage: conv"),
    ("keyword-twice", net("    conv 4 kernel=1 kernel=3"), 3, 21, "'kernel' given twice", None),
    # -- taps -------------------------------------------------------------------------
    ("undefined-tap", net("    e1 = conv 3 kernel=1", "    add e2"), 4, 9, "undefined tap 'e2'", "taps defined so far: e1"),
    ("undefined-tap-misspelt", net("    skip = conv 3 kernel=1", "    concat skp"), 4, 12, "undefined tap 'skp'", "did you mean 'skip'?"),
    ("undefined-tap-none-bound", net("    add e1"), 3, 9, "undefined tap 'e1'", "bind one first"),
    ("duplicate-tap", net("    e1 = relu", "    e1 = relu"), 4, 5, "tap 'e1' is defined twice", None),
    ("tap-outside-block", src("block b() {", "    add e1", "}", "network n {", "    input 3x8x8", "    e1 = relu", "    b", "}"),
     2, 9, "undefined tap 'e1'", None),
    # -- blocks -------------------------------------------------------------------------
    ("block-too-many-args", net("    b 1 2 3", pre=BLOCK_B), 6, 11, "block 'b' takes 2 arguments, got 3", "usage: b(c, stride=…)"),
    ("block-unknown-keyword", net("    b 4 strid=2", pre=BLOCK_B), 6, 9, "block 'b' has no parameter 'strid'", "did you mean 'stride'?"),
    ("block-missing-required", net("    b stride=2", pre=BLOCK_B), 6, 5, "block 'b' needs 'c'", "usage: b(c, stride=…)"),
    ("block-recursive", src("block b(c) {", "    relu -> b c", "}", "network n {", "    input 3x8x8", "    b 4", "}"),
     2, 13, "block 'b' uses itself (b -> b)", "cannot be recursive"),
    ("block-mutually-recursive", src("block a(c) {", "    b c", "}", "block b(c) {", "    a c", "}", "network n {", "    input 3x8x8", "    a 4", "}"),
     5, 5, "block 'a' uses itself (a -> b -> a)", "cannot be recursive"),
    ("block-duplicate", net("    relu", pre=("block b() {", "    relu", "}", "block b(c) {", "    relu", "}")), 4, 7, "block 'b' defined twice", None),
    ("block-named-like-builtin", net("    relu", pre=("block conv(c) {", "    relu", "}")), 1, 7, "block 'conv' has the name of a built-in layer", "rename"),
    ("block-param-twice", net("    relu", pre=("block b(c, c) {", "    relu", "}")), 1, 12, "parameter 'c' appears twice", None),
    # -- shapes ---------------------------------------------------------------------------
    ("spatial-zero", net("    conv 4 kernel=5 -> conv 4 kernel=5"), 3, 24,
     "conv shrinks height to 0: (H + 2*pad - dilation*(k-1) - 1)/stride + 1 = (4 + 2*0 - 1*(5-1) - 1)/1 + 1 = 0", "input height is 4"),
    ("spatial-zero-pool", net("    maxpool 2 -> maxpool 2 -> maxpool 2 -> maxpool 2"), 3, 44, "maxpool shrinks height to 0", None),
    ("spatial-zero-width-only", src("network n {", "    input 3x8x2", "    conv 4 kernel=3", "}"), 3, 5,
     "conv shrinks width to 0: (W + 2*pad - dilation*(k-1) - 1)/stride + 1 = (2 + 2*0 - 1*(3-1) - 1)/1 + 1 = 0", "input width is 2"),
    ("linear-on-image", net("    conv 4 kernel=3", "    linear 10"), 4, 5, "'linear' needs a flat N x features input", "flatten"),
    ("conv-after-flatten", net("    flatten -> conv 4 kernel=1"), 3, 16, "'conv' needs a CxHxW image", None),
    ("pad-same-stride-2", net("    conv 4 kernel=3 stride=2 pad=same"), 3, 5, "pad=same needs stride 1", "explicit padding"),
    ("pad-same-even-kernel", net("    conv 4 kernel=2 pad=same"), 3, 5, "uneven padding", "odd kernel"),
    ("groups-not-dividing", net("    conv 4 kernel=3 groups=2"), 3, 5, "groups=2 must divide both input channels (3)", "depthwise"),
    ("pool-pad-too-big", net("    maxpool 2 pad=2"), 3, 5, "pad 2x2 is more than half its kernel", None),
    ("residual-shape-mismatch", net("    residual {", "        conv 8 kernel=1", "    }"), 3, 5, "residual body and shortcut: shapes differ, 8x8x8 vs 3x8x8", "1x1 conv"),
    # -- network structure ------------------------------------------------------------------
    ("missing-network", src("block b(c) {", "    relu", "}"), 1, 1, "no network defined", "network NAME"),
    ("missing-input", src("network n {", "    conv 3 kernel=1", "}"), 2, 5, "must start with `input CxHxW`", "input 3x32x32"),
    ("input-twice", net("    input 3x8x8"), 3, 5, "`input` may appear only once", None),
    ("input-zero", src("network n {", "    input 0x8x8", "}"), 2, 11, "input must be CxHxW", None),
    ("second-network", net("    relu") + net("    relu"), 5, 9, "a second network 'n'", None),
    ("repeat-negative", net("    repeat (-1) {", "        relu", "    }"), 3, 13, "repeat count must be an integer", None),
    # -- train section ------------------------------------------------------------------------
    ("train-unknown-option", net("    relu", post=("train {", "    epoch 3", "}")), 6, 5, "unknown train option 'epoch'", "did you mean 'epochs'?"),
    ("train-bad-optimizer", net("    relu", post=("train {", "    optimizer sdg", "}")), 6, 15, "must be one of sgd, adam, adamw", "did you mean 'sgd'?"),
    ("train-batch-float", net("    relu", post=("train {", "    batch 1.5", "}")), 6, 11, "batch's SIZE must be an integer, got number 1.5", None),
    ("train-lr-string", net("    relu", post=("train {", '    optimizer sgd lr="fast"', "}")), 6, 22, "optimizer's lr must be a number", None),
    ("train-momentum-with-adam", net("    relu", post=("train {", "    optimizer adam momentum=0.9", "}")), 6, 20, "'momentum' is an sgd option, not adam's", "beta1="),
    ("train-nesterov-without-momentum", net("    relu", post=("train {", "    optimizer sgd nesterov=true", "}")), 6, 19, "nesterov=true needs momentum > 0", None),
    ("train-unknown-keyword", net("    relu", post=("train {", "    schedule cosine warmpu=2", "}")), 6, 21, "unknown parameter 'warmpu' for train option 'schedule'", "did you mean 'warmup'?"),
    ("train-option-twice", net("    relu", post=("train {", "    seed 1", "    seed 2", "}")), 7, 5, "train option 'seed' given twice (first on line 6)", None),
    ("train-chain", net("    relu", post=("train {", "    batch 4 -> seed 1", "}")), 6, 5, "a train option is one line", None),
    ("train-freeze-unknown-tap", net("    e1 = conv 3 kernel=1", post=("train {", "    freeze e2", "}")), 6, 12, "freeze: no tap named 'e2'", "taps: e1"),
    ("train-second-section", net("    relu", post=("train {", "    seed 1", "}", "train {", "    seed 2", "}")), 8, 1, "a second train section", "merge"),
]


@pytest.mark.parametrize("text,line,col,message,hint", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_is_located(text, line, col, message, hint):
    diags, err = diagnostics(text)
    d = diags[0]
    assert message in d.message, err.format()
    assert (d.pos.line, d.pos.col) == (line, col), err.format()
    if hint is not None:
        assert d.hint is not None and hint in d.hint, err.format()
    # the formatted message: file:line:col: error: ..., the source line, a caret under the column
    lines = err.format().splitlines()
    assert lines[0] == f"<string>:{line}:{col}: error: {d.message}"
    source_line = text.splitlines()[line - 1]
    assert lines[1] == "    " + source_line.rstrip()
    assert re.fullmatch(r" {%d}\^~*" % (4 + col - 1), lines[2]), lines[2]
    if d.hint:
        assert f"hint: {d.hint}" in lines


def test_at_least_thirty_cases():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


def test_single_diagnostic_for_single_mistake():
    diags, _ = diagnostics(net("    cnov 16 kernel=3"))
    assert len(diags) == 1


def test_three_independent_mistakes_give_three_diagnostics():
    text = net(
        "    cnov 4",  # line 3: unknown layer
        "    e1 = relu",
        "    add e9",  # line 5: undefined tap
        "    dropout true",  # line 6: wrong type
    )
    diags, err = diagnostics(text)
    assert [(d.pos.line, d.pos.col) for d in diags] == [(3, 5), (5, 9), (6, 13)], err.format()
    assert "unknown layer 'cnov'" in diags[0].message
    assert "undefined tap 'e9'" in diags[1].message
    assert "dropout's P" in diags[2].message
    assert err.format().count(": error: ") == 3


def test_errors_in_network_and_train_are_reported_together():
    text = net("    conv 4.5 kernel=3", post=("train {", "    batch 0", "    optimizer adma", "}"))
    diags, err = diagnostics(text)
    assert [d.pos.line for d in diags] == [3, 6, 7], err.format()


def test_several_syntax_errors_in_one_run():
    text = net("    conv 16 kernel=3 )", "    relu", "    bn eps=", "    relu")
    diags, err = diagnostics(text)
    assert [(d.pos.line, d.message) for d in diags] == [(3, "unexpected ')'"), (5, "unexpected end of line")], err.format()


def test_concat_mismatch_names_both_definitions():
    text = net("    e1 = conv 4 kernel=1", "    maxpool 2", "    concat e1")
    diags, err = diagnostics(text)
    (d,) = diags
    assert (d.pos.line, d.pos.col) == (5, 5)
    assert "'concat e1' needs equal HxW: 4x4x4 vs 4x8x8" in d.message
    assert [(n.pos.line, n.pos.col) for n in d.notes] == [(4, 5), (3, 10)]
    assert "maxpool 2" in d.notes[0].message and "4x4x4" in d.notes[0].message
    assert "'e1' is 4x8x8" in d.notes[1].message and "conv 4 kernel=1" in d.notes[1].message
    text_out = err.format()
    assert "<string>:4:5: note: " in text_out and "<string>:3:10: note: " in text_out
    assert "hint: upsample or pool" in text_out


def test_add_mismatch_names_both_definitions():
    text = net("    e1 = conv 4 kernel=1", "    conv 8 kernel=1", "    add e1")
    (d,), _ = diagnostics(text)
    assert (d.pos.line, d.pos.col) == (5, 5)
    assert "'add e1': shapes differ, 8x8x8 vs 4x8x8" in d.message
    assert [n.pos.line for n in d.notes] == [4, 3]


def test_duplicate_tap_and_block_point_at_first_definition():
    (d,), _ = diagnostics(net("    e1 = relu", "    e1 = relu"))
    assert [(n.message, n.pos.line) for n in d.notes] == [("first defined here", 3)]
    (d,), _ = diagnostics(net("    relu", pre=("block b() {", "    relu", "}", "block b(c) {", "    relu", "}")))
    assert [(n.message, n.pos.line, n.pos.col) for n in d.notes] == [("first defined here", 1, 7)]


def test_shape_error_does_not_cascade():
    # everything downstream of a bad layer keeps an unknown shape and reports nothing more
    (d,), _ = diagnostics(net("    conv 4 kernel=9", "    conv 4 kernel=9", "    linear 10"))
    assert d.pos.line == 3


def test_filename_in_message(tmp_path):
    f = tmp_path / "bad.cnn"
    f.write_text(net("    cnov 4"))
    with pytest.raises(FusenetError) as info:
        load(f)
    assert info.value.format().startswith(f"{f}:3:5: error: unknown layer 'cnov'")


def test_missing_file_is_a_clean_error(tmp_path):
    with pytest.raises(FusenetError) as info:
        load(tmp_path / "nope.cnn")
    assert info.value.format() == f"{tmp_path / 'nope.cnn'}: error: no such file: {tmp_path / 'nope.cnn'}"


def test_empty_text_is_a_program_without_network():
    (d,), _ = diagnostics("")
    assert (d.pos.line, d.message) == (1, "no network defined")


def test_tabs_and_crlf_positions():
    text = "network n {\r\n\tinput 3x8x8\r\n\tcnov 4\r\n}\r\n"
    (d,), err = diagnostics(text)
    assert (d.pos.line, d.pos.col) == (3, 2)
    assert "unknown layer 'cnov'" in err.format()


def test_line_numbers_ignore_form_feeds_and_unicode_separators():
    # str.splitlines() would count \x0c and \u2028 as line breaks; the parser does not
    text = "# a\x0cb\u2028c\n" + net("    cnov 4")
    (d,), err = diagnostics(text)
    assert (d.pos.line, d.pos.col) == (4, 5)
    assert err.format().splitlines()[1] == "        cnov 4"


def test_end_of_file_position_with_crlf():
    (d,), err = diagnostics("network n {\r\n    input 3x8x8\r\n    relu\r\n")
    assert (d.pos.line, d.pos.col, d.message) == (3, 9, "unexpected end of file")


# -- a misspelt required keyword ---------------------------------------------------


def test_misspelt_required_keyword_is_one_diagnostic():
    # `kernel` is missing only because it is misspelt: the did-you-mean says so, no second "needs kernel="
    diags, err = diagnostics(net("    conv 16 kernal=3"))
    assert len(diags) == 1, err.format()
    assert err.format().splitlines() == [
        "<string>:3:13: error: unknown parameter 'kernal' for layer 'conv'",
        "        conv 16 kernal=3",
        "                ^~~~~~~~",
        "hint: did you mean 'kernel'?",
    ]


def test_misspelling_does_not_hide_other_missing_arguments():
    diags, err = diagnostics(net("    conv kernal=3"))
    assert [(d.pos.line, d.pos.col, d.message, d.hint) for d in diags] == [
        (3, 5, "'conv' needs OUT", "usage: conv OUT kernel= stride= pad= dilation= groups= bias="),
        (3, 10, "unknown parameter 'kernal' for layer 'conv'", "did you mean 'kernel'?"),
    ], err.format()
    # a misspelling of a keyword that has a default does not excuse the missing kernel=
    diags, err = diagnostics(net("    conv 16 strde=2"))
    assert [(d.pos.line, d.pos.col, d.message, d.hint) for d in diags] == [
        (3, 13, "unknown parameter 'strde' for layer 'conv'", "did you mean 'stride'?"),
        (3, 5, "'conv' needs kernel=", "usage: conv OUT kernel= stride= pad= dilation= groups= bias="),
    ], err.format()


# -- errors inside a block body name the call ----------------------------------------

BLOCK_CONV5 = ("block b(c) {", "    conv c kernel=5", "}")  # 3 lines


def test_shape_error_in_block_notes_the_call_that_fails():
    # the body fits the first call's 8x8 input; only the second call's 4x4 shrinks to nothing
    (d,), err = diagnostics(net("    b 4", "    b 4", pre=BLOCK_CONV5))
    assert [(n.message, n.pos.line, n.pos.col) for n in d.notes] == [("in block 'b' called here", 7, 5)]
    assert err.format().splitlines() == [
        "<string>:2:5: error: conv shrinks height to 0: (H + 2*pad - dilation*(k-1) - 1)/stride + 1 "
        "= (4 + 2*0 - 1*(5-1) - 1)/1 + 1 = 0",
        "        conv c kernel=5",
        "        ^~~~",
        "<string>:7:5: note: in block 'b' called here",
        "        b 4",
        "        ^",
        "hint: the input height is 4; use a smaller kernel or stride, more padding, or remove a downsampling layer",
    ]


def test_nested_blocks_note_every_call_innermost_first():
    pre = ("block inner(c) {", "    conv c kernel=5", "}", "block outer(c) {", "    inner c", "}")
    (d,), err = diagnostics(net("    outer 4", "    outer 4", pre=pre))
    assert err.format().splitlines() == [
        "<string>:2:5: error: conv shrinks height to 0: (H + 2*pad - dilation*(k-1) - 1)/stride + 1 "
        "= (4 + 2*0 - 1*(5-1) - 1)/1 + 1 = 0",
        "        conv c kernel=5",
        "        ^~~~",
        "<string>:5:5: note: in block 'inner' called here",
        "        inner c",
        "        ^~~~~",
        "<string>:10:5: note: in block 'outer' called here",
        "        outer 4",
        "        ^~~~~",
        "hint: the input height is 4; use a smaller kernel or stride, more padding, or remove a downsampling layer",
    ]


def test_argument_error_in_block_body_notes_the_call():
    (d,), err = diagnostics(net("    relu", "    b 0", pre=BLOCK_CONV5))
    assert (d.pos.line, d.pos.col, d.message) == (2, 10, "conv's OUT must be at least 1, got 0")
    assert [(n.message, n.pos.line, n.pos.col) for n in d.notes] == [("in block 'b' called here", 7, 5)]
    assert err.format().splitlines()[3:6] == ["<string>:7:5: note: in block 'b' called here", "        b 0", "        ^"]


def test_nested_expansion_error_notes_every_call():
    pre = ("block inner(c) {", "    cnov c", "}", "block outer(c) {", "    relu -> inner c", "}")
    (d,), _ = diagnostics(net("    outer 4", pre=pre))
    assert (d.pos.line, d.pos.col, d.message) == (2, 5, "unknown layer 'cnov'")
    assert [(n.message, n.pos.line, n.pos.col) for n in d.notes] == [
        ("in block 'inner' called here", 5, 13),
        ("in block 'outer' called here", 9, 5),
    ]


def test_call_note_comes_after_the_errors_own_notes():
    pre = ("block b() {", "    e1 = conv 4 kernel=1", "    maxpool 2", "    concat e1", "}")
    (d,), _ = diagnostics(net("    b", pre=pre))
    assert [(n.pos.line, n.pos.col) for n in d.notes] == [(3, 5), (2, 10), (8, 5)]
    assert d.notes[-1].message == "in block 'b' called here"


def test_errors_outside_block_bodies_have_no_call_note():
    # an error at the call itself, or in the network, is already located at the call
    diags, _ = diagnostics(net("    b 1 2 3", "    b c=1 c=2", "    cnov 4", pre=BLOCK_B))
    assert [(d.pos.line, d.message) for d in diags] == [
        (6, "block 'b' takes 2 arguments, got 3"),
        (7, "'c' given twice"),
        (8, "unknown layer 'cnov'"),
    ]
    assert all(d.notes == () for d in diags)


# -- invisible characters are named, never printed raw ------------------------------------------


@pytest.mark.parametrize(
    "char,named,shown",
    [
        ("\x00", "U+0000 (null, \\x00)", "\u2400"),
        ("\x0c", "U+000C (form feed, \\x0c)", "\u240c"),
        ("\x1b", "U+001B (escape, \\x1b)", "\u241b"),
        ("\x7f", "U+007F (delete, \\x7f)", "\u2421"),
        ("\u00a0", "U+00A0 (no-break space)", "\u00a0"),
        ("\u200b", "U+200B (zero width space)", "\ufffd"),
        ("\ufeff", "U+FEFF (byte-order mark)", "\ufffd"),
        ("\u0085", "U+0085 (control character, \\x85)", "\ufffd"),
    ],
)
def test_invisible_character_is_named_and_shown_escaped(char, named, shown):
    (d,), err = diagnostics(net(f"    relu{char}"))
    assert (d.pos.line, d.pos.col) == (3, 9)
    assert d.message == f"unexpected character {named}"
    out = err.format().splitlines()
    assert out[1] == f"        relu{shown}" and out[2] == " " * 12 + "^"  # one column each: the caret lines up
    assert char not in err.format() or char == "\u00a0"


def test_visible_characters_are_quoted_as_before():
    (d,), _ = diagnostics(net("    relu @"))
    assert d.message == "unexpected character '@'"


# -- the spec file: only a regular file, of bounded size ---------------------------------------------


def test_fifo_is_refused_without_blocking(tmp_path):
    import os
    import time

    fifo = tmp_path / "spec.cnn"
    os.mkfifo(fifo)
    start = time.perf_counter()
    with pytest.raises(FusenetError) as info:
        load(fifo)
    assert time.perf_counter() - start < 1.0
    assert info.value.format().startswith(f"{fifo}: error: not a regular file")


def test_device_is_refused():
    from pathlib import Path

    with pytest.raises(FusenetError) as info:
        load(Path("/dev/zero"))
    assert info.value.format().startswith("/dev/zero: error: not a regular file")


def test_file_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    import engine.ir.frontend as frontend

    monkeypatch.setattr(frontend, "MAX_SOURCE_BYTES", 1000)
    f = tmp_path / "big.cnn"
    f.write_text(net("    relu") + "#" * 1000 + "\n")
    with pytest.raises(FusenetError) as info:
        load(f)
    assert info.value.format().startswith(f"{f}: error: file too large (")
    assert "MAX_SOURCE_BYTES" in info.value.format()
    f.write_text(net("    relu"))
    load(f)


def test_bom_file_loads(tmp_path):
    f = tmp_path / "notepad.cnn"
    f.write_bytes(b"\xef\xbb\xbf" + net("    relu").encode())
    assert [n.op for n in load(f).graph] == ["input", "relu"]


# -- many errors, and crashes found by tests/dsl/test_fuzz.py -------------------------------------


def test_thousands_of_errors_format_quickly_and_are_counted():
    import time

    text = net(*["    cnov 4"] * 3000)
    start = time.perf_counter()
    diags, err = diagnostics(text)
    out = err.format()
    assert time.perf_counter() - start < 5.0
    assert len(diags) == 200 and err.stopped  # checking stops once the collector is full
    assert out.count(": error: ") == 50
    assert out.endswith("<string>: 150 more errors not shown\n<string>: checking stopped after 200 errors")


def test_tap_bound_in_a_repeat_then_again_is_an_error_not_a_crash():
    # found by tests/dsl/test_fuzz.py: the second binding looked up where a first, top-level one was
    (d,), _ = diagnostics(net("    repeat 1 {", "        e1 = relu", "    }", "    e1 = relu"))
    assert (d.pos.line, d.message) == (6, "tap 'e1' is defined twice")


def test_error_on_a_last_line_holding_only_a_carriage_return_has_a_caret():
    # found by tests/dsl/test_fuzz.py: the excerpt dropped that line, so no caret was printed
    (d,), err = diagnostics(net("    relu") + "\r")
    assert (d.pos.line, d.pos.col) == (5, 1)
    assert err.format().splitlines()[1:3] == ["    ", "    ^"]
