"""AST to graph IR: bind arguments, expand blocks, unroll repeats, resolve taps.

Every error is collected with its source position; expansion goes on past an
error where it safely can, so one run reports several problems. An error inside
a block body also gets a note per enclosing block call, innermost first, since
the body alone does not say which use of the block went wrong.

Expansion is bounded (dsl/limits.py): at most MAX_LAYERS layers, bodies nested
MAX_NESTING deep counting through block calls, block calls MAX_CALL_DEPTH deep.
Nested repeats and blocks that call blocks twice grow exponentially, so:
- a repeat or block call whose size the source fixes (dsl/sizes.py) is refused
  before any of it is built; a repeat whose count depends on a block parameter
  as soon as its first iteration shows the rest would pass MAX_LAYERS;
- layers (made, or refused with an error) and block calls are counted as they
  are expanded, since a body of failing layers makes no node to count;
- a repeat iteration or block call that made no node is not run again: the
  next would make none either, only repeat the first one's errors;
- expansion stops once the collector holds all the errors it keeps.
Passing a bound stops the whole expansion with one located error: no partial
graph.
"""
from __future__ import annotations

from typing import Any, Mapping

from dsl import ast
from dsl.errors import Collector, Note, did_you_mean
from dsl.gc_pause import gc_paused
from dsl.limits import MAX_CALL_DEPTH, MAX_CHANNELS, MAX_LAYERS, MAX_NESTING, MAX_REPEAT, MAX_SIZE
from dsl.schema import LAYERS, bind
from dsl.sizes import StaticSize
from dsl.values import EvalError, evaluate
from engine.ir.graph import Graph, Node
from engine.ir.ops import Group, is_

__all__ = ["MAX_REPEAT", "CallSites", "expand", "expand_with_call_sites"]

_LAYERS_HINT = (
    f"fusenet expands at most {MAX_LAYERS:,} layers (MAX_LAYERS in dsl/limits.py); "
    "nested repeats and block calls multiply, so lower a repeat count or a level of nesting"
)

# node id -> one "in block 'b' called here" note per block call the node was
# expanded in, innermost first; nodes written in the network itself are absent.
CallSites = Mapping[int, tuple[Note, ...]]


class _Abort(Exception):
    """Stop expanding the current chain after an error (already reported)."""


class _Full(Exception):
    """Stop the whole expansion: the collector holds as many errors as it keeps."""


class _Limit(Exception):
    """Stop the whole expansion: a bound of dsl/limits.py was passed."""

    def __init__(self, message: str, pos: ast.Pos, hint: str, notes: tuple[Note, ...] = ()):
        super().__init__(message)
        self.message, self.pos, self.hint, self.notes = message, pos, hint, notes


def _layers(n: int) -> str:
    return f"{n:,}" if n <= MAX_LAYERS else f"more than {MAX_LAYERS:,}"


def _call_key(block: ast.BlockDef, args: dict):
    """What a call's expansion depends on, or None if it cannot be a set member."""
    # the type too: 1, 1.0 and true are equal keys but not equal arguments
    key = (block.name, tuple((name, type(v), v) for name, v in args.items()))
    try:
        hash(key)
    except TypeError:
        return None
    return key


class _Expander:
    def __init__(self, program: ast.Program, errors: Collector):
        self.program, self.errors = program, errors
        self.blocks: dict[str, ast.BlockDef] = {}
        self.nodes: list[Node] = []
        self.counters: dict[str, int] = {}
        self.stack: list[str] = []  # block names being expanded (recursion check)
        self.depth = 0  # residual/repeat bodies open around the statement being expanded
        self.work = 0  # layers and block calls expanded so far (see count_work)
        self.calls = 0  # of which block calls
        self.barren: set = set()  # (block, arguments) of calls that made no node
        self.call_notes: tuple[Note, ...] = ()  # one per enclosing block call, innermost first
        self.call_sites: dict[int, tuple[Note, ...]] = {}
        self.top_pos = ast.NOWHERE  # the network-level statement being expanded
        self.taps: dict[str, int] = {}
        self.tap_pos: dict[str, ast.Pos] = {}
        self.tap_layers: dict[str, tuple[str, ...]] = {}
        self.input_shape: tuple[int, ...] | None = None
        self.sizes = StaticSize(self.blocks)
        for b in program.blocks:
            if b.name in LAYERS:
                errors.error(f"block '{b.name}' has the name of a built-in layer", b.pos, "rename the block")
            elif b.name in self.blocks:
                errors.error(
                    f"block '{b.name}' defined twice",
                    b.pos,
                    notes=[Note("first defined here", self.blocks[b.name].pos)],
                )
            else:
                self.blocks[b.name] = b
            seen = set()
            for p in b.params:
                if p.name in seen:
                    errors.error(f"parameter '{p.name}' appears twice in block '{b.name}'", p.pos)
                seen.add(p.name)

    # -- limits --------------------------------------------------------------
    def refuse_if_too_big(self, more: int | None, pos: ast.Pos, what: str) -> None:
        """Refuse, before expanding it, a construct known to make `more` layers
        that would take the network past MAX_LAYERS."""
        if more is not None and self.work + more > MAX_LAYERS:
            notes = (Note(f"{what} here", pos),) if pos != self.top_pos else ()
            raise _Limit(f"this expands the network to more than {MAX_LAYERS:,} layers", self.top_pos, _LAYERS_HINT, notes)

    def nested(self, stmt, stmts, current: int, env: dict, scope: dict) -> int:
        """Expand a residual, shortcut or repeat body, one level deeper."""
        if self.depth >= MAX_NESTING:
            raise _Limit(
                f"bodies nested more than {MAX_NESTING} deep once blocks are expanded",
                stmt.pos,
                f"residual/repeat bodies nest at most {MAX_NESTING} deep, counting those of the blocks "
                "a body calls (MAX_NESTING in dsl/limits.py)",
                self.call_notes,
            )
        self.depth += 1
        try:
            return self.statements(stmts, current, env, scope)
        finally:
            self.depth -= 1

    # -- nodes ---------------------------------------------------------------
    def count_work(self, call: bool = False) -> None:
        """Count one layer about to be expanded (made, or refused with an error)
        or one block call: each costs time, and a body of misspelt layers or a
        call that fails makes no node to count."""
        if self.errors.full:
            raise _Full  # the program is rejected: looking for a 201st error is wasted time
        self.work += 1
        self.calls += call
        if self.work > MAX_LAYERS:
            what = "layers and block calls" if self.calls else "layers"
            raise _Limit(f"this expands the network to more than {MAX_LAYERS:,} {what}", self.top_pos, _LAYERS_HINT)

    def add_node(self, op: str, inputs: tuple[int, ...], attrs: dict, pos: ast.Pos) -> int:
        name = ""
        if is_(op, Group.PARAMETRIC):
            k = self.counters.get(op, 0)
            self.counters[op] = k + 1
            name = f"{op}{k}"
        node = Node(len(self.nodes), op, inputs, attrs, pos, name)
        self.nodes.append(node)
        if self.call_notes:
            self.call_sites[node.id] = self.call_notes
        return node.id

    # -- statements ------------------------------------------------------------
    def network(self, net: ast.Network) -> None:
        body = list(net.body)
        if not body or not isinstance(body[0], ast.Input):
            pos = body[0].pos if body else net.pos
            self.errors.error("the network must start with `input CxHxW`", pos, "e.g. input 3x32x32")
            return
        dims = body[0].dims.values
        if len(dims) not in (1, 3) or min(dims) < 1:
            self.errors.error(
                f"input must be CxHxW (or F features), got {'x'.join(map(str, dims))}",
                body[0].dims.pos,
                "e.g. input 3x32x32 for images, input 20 for 20 features",
            )
            return
        bounds = (MAX_CHANNELS,) if len(dims) == 1 else (MAX_CHANNELS, MAX_SIZE, MAX_SIZE)
        if any(d > b for d, b in zip(dims, bounds)):
            what = "features" if len(dims) == 1 else "channels, height and width"
            self.errors.error(
                f"input {'x'.join(map(str, dims))} is too large",
                body[0].dims.pos,
                f"input {what} are at most {'x'.join(f'{b:,}' for b in bounds)} (MAX_CHANNELS, MAX_SIZE in dsl/limits.py)",
            )
            return
        self.input_shape = tuple(dims)
        current = self.add_node("input", (), {}, body[0].pos)
        scope: dict[str, int] = {}
        self.statements(body[1:], current, {}, scope, top=True)

    def statements(self, stmts, current: int, env: dict, scope: dict, top: bool = False) -> int:
        for stmt in stmts:
            if top:
                self.top_pos = stmt.pos
            try:
                current = self.statement(stmt, current, env, scope, top)
            except _Abort:
                continue
        return current

    def statement(self, stmt, current: int, env: dict, scope: dict, top: bool) -> int:
        if isinstance(stmt, ast.Input):
            self.errors.error("`input` may appear only once, as the network's first line", stmt.pos)
            raise _Abort
        if isinstance(stmt, ast.Residual):
            self.count_work()  # the add that merges the two branches
            start = current
            body_out = self.nested(stmt, stmt.body, start, env, dict(scope))
            short_out = self.nested(stmt, stmt.shortcut, start, env, dict(scope)) if stmt.shortcut is not None else start
            return self.add_node("add", (body_out, short_out), {"merge": "residual"}, stmt.pos)
        if isinstance(stmt, ast.Repeat):
            count = self.value(stmt.count, env)
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_REPEAT:
                self.errors.error(
                    f"repeat count must be an integer in 0..{MAX_REPEAT}",
                    stmt.count.pos,
                    "MAX_REPEAT in dsl/limits.py; for a deeper network, nest a repeat in a block"
                    if isinstance(count, int) and count > MAX_REPEAT
                    else None,
                )
                raise _Abort
            size = self.sizes.body(stmt.body, len(self.stack), self.depth + 1)
            more = None if size is None else count * size
            self.refuse_if_too_big(more, stmt.pos, f"repeat {count} of a body of {_layers(size or 0)} layers")
            for i in range(count):
                nodes_before, work_before = len(self.nodes), self.work
                current = self.nested(stmt, stmt.body, current, env, scope)
                if i == 0:  # a body sized only now: every iteration expands the same statements
                    if len(self.nodes) == nodes_before:
                        # Nor will the others make any (only repeat the first one's
                        # errors): stop, or 30 nested `repeat 2` around an empty
                        # body would run 2**30 empty iterations.
                        break
                    per = self.work - work_before
                    self.refuse_if_too_big(per * (count - 1), stmt.pos, f"repeat {count} of a body of {_layers(per)} layers")
            return current
        assert isinstance(stmt, ast.Chain)
        owners_before = len(self.nodes)
        for layer in stmt.layers:
            if top:
                self.top_pos = layer.pos
            current = self.layer(layer, current, env, scope)
        if stmt.bind:
            if stmt.bind in scope and top:
                first = self.tap_pos.get(stmt.bind)  # none if bound in a repeat's body, which shares the scope
                self.errors.error(
                    f"tap '{stmt.bind}' is defined twice",
                    stmt.pos,
                    notes=[Note("first defined here", first)] if first else [],
                )
            scope[stmt.bind] = current
            if top:
                self.taps[stmt.bind] = current
                self.tap_pos[stmt.bind] = stmt.pos
                self.tap_layers[stmt.bind] = tuple(n.name for n in self.nodes[owners_before:] if n.name)
        return current

    def value(self, expr: ast.Expr, env: dict) -> Any:
        try:
            return evaluate(expr, env)
        except EvalError as e:
            self.errors.error(e.message, e.pos, e.hint)
            raise _Abort from None

    def layer(self, layer: ast.Layer, current: int, env: dict, scope: dict) -> int:
        if layer.name in self.blocks:
            return self.call_block(self.blocks[layer.name], layer, current, env, scope)
        self.count_work()
        sig = LAYERS.get(layer.name)
        if sig is None:
            known = list(LAYERS) + list(self.blocks)
            hint = did_you_mean(layer.name, known)
            if layer.name in ("input",):
                hint = "`input` is a statement of its own on the network's first line"
            self.errors.error(f"unknown layer '{layer.name}'", layer.pos, hint)
            raise _Abort
        attrs = bind(sig, layer, lambda e: evaluate(e, env), self.errors)
        if attrs is None:
            raise _Abort
        inputs = (current,)
        if layer.name in ("add", "concat"):
            tap = attrs["tap"]
            if tap not in scope:
                hint = did_you_mean(tap, scope) or (
                    f"taps defined so far: {', '.join(scope)}" if scope else "bind one first: `name = layer -> ...`"
                )
                self.errors.error(f"undefined tap '{tap}'", layer.args[0].pos, hint)
                raise _Abort
            inputs = (current, scope[tap])
        return self.add_node(layer.name, inputs, attrs, layer.pos)

    def call_block(self, block: ast.BlockDef, layer: ast.Layer, current: int, env: dict, scope: dict) -> int:
        if block.name in self.stack:
            chain = " -> ".join(self.stack + [block.name])
            self.errors.error(f"block '{block.name}' uses itself ({chain})", layer.pos, "blocks cannot be recursive")
            raise _Abort
        if len(self.stack) >= MAX_CALL_DEPTH:
            calls = self.stack + [block.name]
            shown = " -> ".join(calls if len(calls) <= 8 else calls[:3] + ["..."] + calls[-3:])
            raise _Limit(
                f"block calls nested more than {MAX_CALL_DEPTH} deep ({shown})",
                layer.pos,
                f"a block may call blocks at most {MAX_CALL_DEPTH} calls deep (MAX_CALL_DEPTH in dsl/limits.py)",
            )
        size = self.sizes.body(block.body, len(self.stack) + 1, self.depth)
        self.refuse_if_too_big(size, layer.pos, f"block '{block.name}', of {_layers(size or 0)} layers, called")
        self.count_work(call=True)
        args = self.bind_block_args(block, layer, env)
        key = _call_key(block, args)
        if key in self.barren:
            # A body sees only its arguments: a call that made no node (an empty
            # block, or one whose every layer failed) makes none again, and
            # repeating it would repeat its errors, 2**30 times if blocks call
            # such a block twice, 30 deep.
            return current
        nodes_before = len(self.nodes)
        first_error = len(self.errors.diagnostics)
        note = Note(f"in block '{block.name}' called here", layer.pos)
        outer_notes = self.call_notes
        self.stack.append(block.name)
        # Nodes made in this call are tagged with where the call is (for shape
        # errors found later), and enclosing calls come after: innermost first.
        self.call_notes = (note,) + outer_notes
        try:
            # A block body sees only its parameters and its own taps.
            out = self.statements(block.body, current, args, {})
            if len(self.nodes) == nodes_before and key is not None:
                self.barren.add(key)
            return out
        finally:
            self.stack.pop()
            self.call_notes = outer_notes
            # and so are the errors reported meanwhile
            self.errors.add_note_since(first_error, note)

    def bind_block_args(self, block: ast.BlockDef, layer: ast.Layer, env: dict) -> dict:
        names = [p.name for p in block.params]
        usage = f"{block.name}({', '.join(p.name + ('' if p.default is None else '=…') for p in block.params)})"
        if len(layer.args) > len(names):
            self.errors.error(
                f"block '{block.name}' takes {len(names)} argument{'s' if len(names) != 1 else ''}, got {len(layer.args)}",
                layer.args[len(names)].pos,
                f"usage: {usage}",
            )
            raise _Abort
        values: dict[str, Any] = {}
        for p, expr in zip(block.params, layer.args):
            values[p.name] = self.value(expr, env)
        for kw in layer.kwargs:
            if kw.name not in names:
                self.errors.error(
                    f"block '{block.name}' has no parameter '{kw.name}'",
                    kw.pos,
                    did_you_mean(kw.name, names) or f"usage: {usage}",
                )
                raise _Abort
            if kw.name in values:
                self.errors.error(f"'{kw.name}' given twice", kw.pos)
                raise _Abort
            values[kw.name] = self.value(kw.value, env)
        for p in block.params:
            if p.name not in values:
                if p.default is None:
                    self.errors.error(f"block '{block.name}' needs '{p.name}'", layer.pos, f"usage: {usage}")
                    raise _Abort
                values[p.name] = self.value(p.default, dict(values))
        return values


def expand(program: ast.Program, errors: Collector) -> Graph | None:
    """Build the graph IR for a parsed program (shapes not yet inferred)."""
    return expand_with_call_sites(program, errors)[0]


def expand_with_call_sites(program: ast.Program, errors: Collector) -> tuple[Graph | None, CallSites]:
    """`expand`, plus where each node's enclosing block calls are, for
    `infer_shapes` to note under a shape error found inside a block body."""
    ex = _Expander(program, errors)
    if program.network is not None:
        try:
            with gc_paused():
                ex.network(program.network)
        except _Limit as e:
            errors.error(e.message, e.pos, e.hint, e.notes)
            return None, {}
        except _Full:
            errors.stopped = True
            return None, {}
    if ex.input_shape is None:
        return None, {}
    graph = Graph(
        program.network.name,
        tuple(ex.nodes),
        ex.input_shape,
        dict(ex.taps),
        dict(ex.tap_layers),
    )
    return graph, dict(ex.call_sites)
