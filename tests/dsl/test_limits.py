"""The documented limits of dsl/limits.py: programs that expand exponentially,
nest deeply or hold numbers out of range get one located error, quickly; none
hangs, runs out of memory or overflows Python's stack. Programs just inside a
limit still load."""
from __future__ import annotations

import re
import time

import pytest

from dsl import limits
from dsl.errors import FusenetError
from dsl.formatter import format_program
from dsl.parser import parse
from engine.ir.frontend import load


def net(*body: str, pre: str = "") -> str:
    """A network `n` on 3x8x8 input; its body starts on line pre-lines + 3."""
    return pre + "network n {\n    input 3x8x8\n" + "".join(f"    {b}\n" for b in body) + "}\n"


def nested(open_line: str, depth: int, inner: str = "relu") -> list[str]:
    return [open_line] * depth + [inner] + ["}"] * depth


def one_error(text: str, seconds: float = 2.0):
    """The program's single diagnostic, checked to be located and formatted with a caret."""
    start = time.perf_counter()
    with pytest.raises(FusenetError) as info:
        load(text)
    elapsed = time.perf_counter() - start
    assert elapsed < seconds, f"took {elapsed:.2f} s"
    err = info.value
    assert len(err.diagnostics) == 1, err.format()
    d = err.diagnostics[0]
    lines = text.split("\n")
    assert 1 <= d.pos.line <= len(lines) and 1 <= d.pos.col <= len(lines[d.pos.line - 1]) + 1, d
    out = err.format().splitlines()
    assert out[0].startswith(f"<string>:{d.pos.line}:{d.pos.col}: error: ")
    assert re.fullmatch(r" {%d}\^~*" % (4 + d.pos.col - 1), out[2]), err.format()
    return d


# ---- 1. expansion is bounded ----------------------------------------------------------------------


def test_three_nested_repeat_1000_is_refused_before_expanding():
    d = one_error(net(*nested("repeat 1000 {", 3)), seconds=1.0)
    assert d.message == "this expands the network to more than 250,000 layers"
    assert (d.pos.line, d.pos.col) == (3, 5)
    assert "MAX_LAYERS" in d.hint and "250,000" in d.hint


def test_twenty_two_nested_repeat_2_is_refused():
    d = one_error(net(*nested("repeat 2 {", 22)), seconds=1.0)
    assert "more than 250,000 layers" in d.message and "MAX_LAYERS" in d.hint


def test_blocks_calling_blocks_twice_are_refused_before_expanding():
    blocks = "block b0() {\n    relu\n}\n" + "".join(f"block b{i}() {{\n    b{i - 1}\n    b{i - 1}\n}}\n" for i in range(1, 30))
    d = one_error(net("conv 4 kernel=1 -> b29", pre=blocks), seconds=1.0)
    assert "more than 250,000 layers" in d.message
    assert (d.pos.line, d.pos.col) == (blocks.count("\n") + 3, 24)  # the call in the network
    assert d.notes == ()  # the network statement is the call: nothing more to point at


def test_repeat_with_a_parameter_count_is_refused_before_expanding_its_body():
    # the block's size depends on n, but once n is known the repeat's body has a size
    pre = "block deep(n) {\n    repeat n {\n        repeat 1000 {\n            repeat 1000 {\n                relu\n            }\n        }\n    }\n}\n"
    d = one_error(net("deep 1000", pre=pre), seconds=1.0)
    assert "more than 250,000 layers" in d.message
    assert (d.pos.line, d.pos.col) == (12, 5)  # the call in the network
    assert [(n.message, n.pos.line) for n in d.notes] == [("repeat 1000 of a body of more than 250,000 layers here", 2)]


def test_repeat_whose_body_size_depends_on_a_parameter_is_refused_after_one_iteration():
    pre = "block row(n) {\n    repeat n {\n        relu\n    }\n}\n"
    d = one_error(net("repeat 1000 {", "    row 1000", "}", pre=pre), seconds=2.0)
    assert "more than 250,000 layers" in d.message
    assert (d.pos.line, d.pos.col) == (8, 5) and d.notes == ()  # the repeat is the network's statement


def test_running_count_stops_what_no_size_predicts(monkeypatch):
    # plain chains have no repeat or block to size beforehand: nodes are counted as made
    import engine.ir.expand as expand

    monkeypatch.setattr(expand, "MAX_LAYERS", 10)
    d = one_error(net("relu", "relu -> relu -> relu", "relu -> relu -> relu", "relu -> relu -> relu -> relu"))
    assert d.message == "this expands the network to more than 10 layers"
    assert (d.pos.line, d.pos.col) == (6, 29)  # the eleventh layer
    load(net("relu", "relu -> relu -> relu", "relu -> relu -> relu", "relu -> relu -> relu"))  # ten: fine


def test_exactly_the_layer_limit_loads(monkeypatch):
    import engine.ir.expand as expand

    monkeypatch.setattr(expand, "MAX_LAYERS", 1000)
    body = ("repeat 10 {", "    repeat 100 {", "        relu", "    }", "}")
    assert len(load(net(*body)).graph.nodes) - 1 == 1000
    d = one_error(net("relu", *body))
    assert d.message == "this expands the network to more than 1,000 layers" and d.pos.line == 4


def test_nesting_of_three_hundred_residuals_is_refused_by_the_parser():
    d = one_error(net(*nested("residual {", 300)))
    assert "nested too deeply" in d.message and "MAX_NESTING" in d.hint


def test_nesting_at_the_limit_loads():
    spec = load(net(*nested("residual {", limits.MAX_NESTING)))
    assert len(spec.graph.nodes) == 1 + 1 + limits.MAX_NESTING


def test_nesting_through_block_calls_is_bounded():
    inner = "\n".join(nested("residual {", 40))
    pre = f"block deep() {{\n{inner}\n}}\n"
    d = one_error(net(*nested("residual {", 40, inner="deep")[:81], pre=pre))
    assert "nested more than 64 deep once blocks are expanded" in d.message
    assert d.notes and d.notes[0].message == "in block 'deep' called here"


def test_block_call_chain_is_bounded():
    blocks = "block b0() {\n    relu\n}\n" + "".join(f"block b{i}() {{\n    b{i - 1}\n}}\n" for i in range(1, 40))
    d = one_error(net("b39", pre=blocks))
    assert d.message.startswith("block calls nested more than 32 deep (b39 -> b38 -> b37 -> ... ->")
    assert "MAX_CALL_DEPTH" in d.hint


def test_block_call_chain_at_the_limit_loads():
    blocks = "block b0() {\n    relu\n}\n" + "".join(f"block b{i}() {{\n    b{i - 1}\n}}\n" for i in range(1, limits.MAX_CALL_DEPTH))
    assert len(load(net(f"b{limits.MAX_CALL_DEPTH - 1}", pre=blocks)).graph.nodes) == 2


def test_deep_bodies_in_a_long_chain_of_blocks_are_refused_without_recursion_error():
    # each block nests 60 bodies deep and calls the next at the bottom: 33 x 60 levels in all
    blocks = "block d0() {\n    relu\n}\n"
    for k in range(1, 34):
        blocks += f"block d{k}() {{\n" + "\n".join(nested("residual {", 60, inner=f"d{k - 1}")) + "\n}\n"
    d = one_error(net("d33", pre=blocks))
    assert "nested more than 64 deep once blocks are expanded" in d.message


def test_repeat_count_above_limit_names_it():
    d = one_error(net("repeat 1001 {", "    relu", "}"))
    assert "0..1000" in d.message and "MAX_REPEAT" in d.hint


# ---- 2. numbers in sane ranges ------------------------------------------------------------------


@pytest.mark.parametrize(
    "line,col,message,hint",
    [
        ("conv " + "9" * 5000 + " kernel=3", 10, "integer 999999999999...(5000 digits) is too large", "MAX_INT"),
        ("conv 9223372036854775808 kernel=3", 10, "integer 9223372036854775808 is too large", "2**63"),
        ("scale 1e309", 11, "number 1e309 is too large for a 64-bit float", "1.8e308"),
        ("scale " + "9" * 400 + ".5", 11, "is too large for a 64-bit float", "1.8e308"),
        ("scale " + "9" * 400, 11, "is too large", "MAX_INT"),
        ("conv 4 kernel=3x" + "9" * 30, 19, "is too large", "MAX_INT"),
        ("conv 4 kernel=" + "*".join(["3037000499"] * 3), 19, "'*': result too large", "MAX_INT"),
        ("conv 2000000 kernel=3", 10, "conv's OUT must be at most 1,048,576, got 2,000,000", "MAX_CHANNELS"),
        ("conv 4 kernel=70000", 19, "conv's kernel must be at most 65,536, got 70,000", "MAX_SIZE"),
        ("conv 4 kernel=3 stride=1x99999", 28, "conv's stride must be at most 65,536", "MAX_SIZE"),
        ("conv 4 kernel=3 pad=99999", 25, "conv's pad must be at most 65,536", "MAX_SIZE"),
        ("linear 99999999", 12, "linear's OUT must be at most 1,048,576", "MAX_CHANNELS"),
        ("upsample 100000", 14, "upsample's FACTOR must be at most 65,536", "MAX_SIZE"),
    ],
)
def test_number_out_of_range_is_located(line, col, message, hint):
    d = one_error(net(line))
    assert message in d.message
    assert (d.pos.line, d.pos.col) == (3, col)
    assert d.hint and hint in d.hint


@pytest.mark.parametrize(
    "option,col,message",
    [
        ("batch 99999999", 11, "batch's SIZE must be at most 16,777,216"),
        ("epochs 2000000", 12, "epochs's COUNT must be at most 1,000,000"),
        ("clip_grad -5", 15, "clip_grad's MAX_NORM must not be negative, got -5"),
        ("optimizer sgd lr=-0.1", 22, "optimizer's lr must be greater than 0"),
        ("optimizer adamw weight_decay=-1", 34, "optimizer's weight_decay must not be negative"),
        ("augment crop=100000", 18, "augment's crop must be at most 65,536"),
    ],
)
def test_train_numbers_out_of_range_are_located(option, col, message):
    d = one_error(net("relu") + f"train {{\n    {option}\n}}\n")
    assert message in d.message
    assert (d.pos.line, d.pos.col) == (6, col)


def test_input_sizes_are_bounded():
    d = one_error("network n {\n    input 3x100000x8\n}\n")
    assert "input 3x100000x8 is too large" in d.message and "MAX_SIZE" in d.hint
    d = one_error("network n {\n    input 5000000\n}\n")
    assert "too large" in d.message and "features" in d.hint


def test_layers_cannot_grow_a_tensor_past_the_limits():
    d = one_error(net("upsample 1000 -> upsample 1000"))
    assert "the output, 3x8000000x8000000, is too large" in d.message and "MAX_SIZE" in d.hint
    assert (d.pos.line, d.pos.col) == (3, 22)


# ---- 3. deep input: no RecursionError ---------------------------------------------------------------


def test_sum_of_five_hundred_terms_evaluates():
    spec = load(net("conv " + " + ".join(["1"] * 500) + " kernel=1"))
    assert spec.graph.output.attrs["out"] == 500


def test_sum_of_three_thousand_terms_evaluates_formats_and_compares():
    text = net("scale " + " - ".join(["1"] * 3000))
    spec = load(text)
    assert spec.graph.output.attrs["factor"] == 1 - 2999
    p = parse(text)
    assert parse(format_program(p)) == p  # equality walks a 3,000-deep left spine
    assert hash(parse(format_program(p))) == hash(p)


def test_two_thousand_unary_minuses_are_refused():
    d = one_error(net("scale (" + "-" * 2000 + "1)"))
    assert "expression nested too deeply (more than 100 levels)" in d.message and "MAX_EXPR_DEPTH" in d.hint


def test_unary_minuses_at_the_limit_evaluate():
    spec = load(net("scale (" + "-" * limits.MAX_EXPR_DEPTH + "2)"))
    assert spec.graph.output.attrs["factor"] == 2.0


def test_right_nested_parentheses_are_refused_past_the_limit():
    d = one_error(net("scale " + "(1 - " * 300 + "1" + ")" * 300))
    assert "nested too deeply" in d.message


def test_redundant_parentheses_cost_nothing():
    spec = load(net("scale " + "(" * 3000 + "2" + ")" * 3000))
    assert spec.graph.output.attrs["factor"] == 2.0


def test_deep_braces_of_every_kind_are_refused_cleanly():
    for opener in ("repeat 1 {", "residual {", "residual {\n} shortcut {"):
        d = one_error(net(*nested(opener, 300)))
        assert "nested too deeply" in d.message


def test_deep_programs_format():
    # fmt runs the parser and the formatter only: both must survive the limits
    text = net(*nested("residual {", limits.MAX_NESTING), "scale (" + "-" * limits.MAX_EXPR_DEPTH + "2)")
    p = parse(text)
    assert parse(format_program(p)) == p


# ---- found by tests/dsl/test_fuzz.py -----------------------------------------------------------------


def test_nested_repeats_of_an_empty_body_finish_at_once():
    # no layers, but 2**30 iterations if each were run
    start = time.process_time()
    spec = load(net(*nested("repeat 2 {", 30, inner="e = b"), pre="block b() {\n}\n"))
    assert time.process_time() - start < 1.0
    assert len(spec.graph.nodes) == 1


def test_a_failing_call_repeated_exponentially_is_reported_once():
    # found by tests/dsl/test_fuzz.py: z19's call of z18 fails, and z20..z39 call it 2**20 times
    blocks = "block z0() {\n    relu\n}\n" + "".join(f"block z{i}() {{\n    z{i - 1}\n    z{i - 1}\n}}\n" for i in range(1, 40))
    blocks = blocks.replace("block z19() {\n    z18\n    z18\n}", "block z19() {\n    z18 z18\n}")
    start = time.process_time()
    with pytest.raises(FusenetError) as info:
        load(net("z39", pre=blocks))
    assert time.process_time() - start < 1.0
    (d,) = info.value.diagnostics
    assert d.message == "block 'z18' takes 0 arguments, got 1"
    assert [n.message for n in d.notes][:2] == ["in block 'z19' called here", "in block 'z20' called here"]


def test_exponentially_many_distinct_failing_calls_stop_at_the_error_cap():
    # every call differs (n*2, n*2+1) and every leaf fails: nothing to size, nothing to reuse
    blocks = "block z0(n) {\n    repeat n % 3 {\n        cnov\n    }\n}\n"
    blocks += "".join(f"block z{i}(n) {{\n    z{i - 1} n * 2\n    z{i - 1} n * 2 + 1\n}}\n" for i in range(1, 31))
    start = time.process_time()
    with pytest.raises(FusenetError) as info:
        load(net("z30 1", pre=blocks))
    assert time.process_time() - start < 1.0
    assert info.value.stopped and len(info.value.diagnostics) == 200
    assert info.value.format().endswith("checking stopped after 200 errors")


def test_empty_block_called_exponentially_finishes_at_once():
    blocks = "block z0() {\n}\n" + "".join(f"block z{i}() {{\n    z{i - 1}\n    z{i - 1}\n}}\n" for i in range(1, 31))
    start = time.process_time()
    assert len(load(net("z30 -> relu", pre=blocks)).graph.nodes) == 2
    assert time.process_time() - start < 1.0
