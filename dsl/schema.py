"""What every built-in layer and train option accepts: names, types, defaults.

`bind(sig, layer, evaluate)` matches a layer's positional and keyword
arguments against its signature, converts each value to its declared type, and
reports every mismatch with the argument's position and a hint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from dsl.ast import Expr, Layer
from dsl.errors import Collector, did_you_mean, nearest
from dsl.limits import MAX_BATCH, MAX_CHANNELS, MAX_COUNT, MAX_INT, MAX_SIZE
from dsl.values import EvalError, Symbol, describe

REQUIRED = object()  # marks a parameter without default


@dataclass(frozen=True)
class ParamSpec:
    name: str
    # int | posint | nonneg | float | nonnegfloat | posfloat | prob | bool | pair | pospair | pad | choice | tap | data
    type: str
    default: Any = REQUIRED
    choices: tuple[str, ...] = ()
    high: int = MAX_INT  # the largest integer (or each of a pair's) accepted: see dsl/limits.py

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Signature:
    name: str
    positional: tuple[ParamSpec, ...] = ()
    keywords: tuple[ParamSpec, ...] = ()
    variadic: ParamSpec | None = None  # extra positionals of this type (freeze a b c)

    def usage(self) -> str:
        parts = [self.name]
        parts += [p.name.upper() if p.required else f"[{p.name.upper()}]" for p in self.positional]
        if self.variadic:
            parts.append(f"{self.variadic.name.upper()}...")
        parts += [f"{k.name}=" for k in self.keywords]
        return " ".join(parts)


def P(name, type, default=REQUIRED, choices=(), high=MAX_INT):
    return ParamSpec(name, type, default, tuple(choices), high)


_LIMIT_NAMES = {MAX_CHANNELS: "MAX_CHANNELS", MAX_SIZE: "MAX_SIZE", MAX_BATCH: "MAX_BATCH", MAX_COUNT: "MAX_COUNT", MAX_INT: "MAX_INT"}
_C, _S = MAX_CHANNELS, MAX_SIZE  # the bounds of channel counts and of spatial sizes
_POOL = (P("stride", "pospair", None, high=_S), P("pad", "pair", (0, 0), high=_S))
LAYERS: dict[str, Signature] = {
    s.name: s
    for s in [
        Signature(
            "conv",
            (P("out", "posint", high=_C),),
            (
                P("kernel", "pospair", high=_S),
                P("stride", "pospair", (1, 1), high=_S),
                P("pad", "pad", (0, 0), high=_S),
                P("dilation", "pospair", (1, 1), high=_S),
                P("groups", "posint", 1, high=_C),
                P("bias", "bool", True),
            ),
        ),
        Signature("linear", (P("out", "posint", high=_C),), (P("bias", "bool", True),)),
        Signature("bn", (), (P("eps", "nonnegfloat", 1e-5), P("momentum", "prob", 0.1))),
        Signature("relu"),
        Signature("leaky_relu", (), (P("slope", "float", 0.01),)),
        Signature("sigmoid"),
        Signature("tanh"),
        Signature("gelu"),
        Signature("silu"),
        Signature("relu6"),
        Signature("hardswish"),
        Signature("hardsigmoid"),
        Signature("elu", (), (P("alpha", "float", 1.0),)),
        Signature("mish"),
        Signature("softmax"),
        Signature("maxpool", (P("kernel", "pospair", high=_S),), _POOL),
        Signature("avgpool", (P("kernel", "pospair", high=_S),), _POOL),
        Signature("global_avgpool"),
        Signature("global_maxpool"),
        Signature("blurpool", (), (P("stride", "posint", 2, high=_S), P("filter", "posint", 3, high=_S))),
        Signature("dropout", (P("p", "prob", 0.5),)),
        Signature("flatten"),
        Signature("upsample", (P("factor", "posint", high=_S),), (P("mode", "choice", "nearest", ("nearest", "bilinear")),)),
        Signature("scale", (P("factor", "float"),)),
        Signature("add", (P("tap", "tap"),)),
        Signature("concat", (P("tap", "tap"),)),
    ]
}

ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu", "relu6", "hardswish", "hardsigmoid", "elu", "mish")

TRAIN_OPTIONS: dict[str, Signature] = {
    s.name: s
    for s in [
        Signature("data", (P("source", "data"),)),
        Signature("split", (P("fraction", "prob"),)),
        Signature("batch", (P("size", "posint", high=MAX_BATCH),)),
        Signature("epochs", (P("count", "posint", high=MAX_COUNT),)),
        Signature(
            "optimizer",
            (P("name", "choice", choices=("sgd", "adam", "adamw")),),
            (
                P("lr", "posfloat", None),  # 0 would train nothing
                P("momentum", "prob", 0.0),
                P("nesterov", "bool", False),
                P("weight_decay", "nonnegfloat", None),
                P("beta1", "prob", 0.9),
                P("beta2", "prob", 0.999),
                P("eps", "posfloat", 1e-8),  # Adam divides by sqrt(v) + eps
            ),
        ),
        Signature(
            "schedule",
            (P("name", "choice", choices=("constant", "step", "cosine", "plateau")),),
            (
                P("warmup", "nonneg", 0, high=MAX_COUNT),
                P("step_size", "posint", 10, high=MAX_COUNT),
                P("gamma", "nonnegfloat", 0.1),
                P("factor", "prob", 0.1),
                P("patience", "nonneg", 5, high=MAX_COUNT),
                P("min_lr", "nonnegfloat", 0.0),
            ),
        ),
        Signature(
            "loss",
            (P("name", "choice", choices=("cross_entropy", "centernet")),),
            (
                P("label_smoothing", "prob", 0.0),  # cross_entropy
                P("size_weight", "nonnegfloat", 0.1),  # centernet: weight of the box-size L1 term
                P("offset_weight", "nonnegfloat", 1.0),  # centernet: weight of the center-offset L1 term
                P("alpha", "posfloat", 2.0),  # centernet: focal loss exponent
                P("beta", "nonnegfloat", 4.0),  # centernet: penalty reduction near a center
            ),
        ),
        Signature("augment", (), (P("crop", "nonneg", 0, high=_S), P("flip", "bool", False), P("cutout", "nonneg", 0, high=_S))),
        Signature("precision", (P("dtype", "choice", choices=("fp32", "tf32", "fp16", "bf16")),)),
        Signature("clip_grad", (P("max_norm", "nonnegfloat"),)),
        Signature("early_stop", (P("patience", "nonneg", high=MAX_COUNT),)),
        Signature("freeze", (), (), variadic=P("tap", "tap")),
        Signature("seed", (P("value", "nonneg"),)),
        Signature("sync_bn", (P("enabled", "bool", True),)),
    ]
}


class TypeMismatch(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        hint = "use // for integer division" if isinstance(v, float) and v.is_integer() else None
        raise TypeMismatch(f"{what} must be an integer, got {describe(v)}", hint)
    return v


def _at_most(spec: ParamSpec, values, what: str) -> None:
    big = max(values)
    if big > spec.high:
        name = _LIMIT_NAMES.get(spec.high, "")
        raise TypeMismatch(
            f"{what} must be at most {spec.high:,}, got {big:,}",
            f"fusenet's limit here is {spec.high:,} ({name} in dsl/limits.py)" if name else None,
        )


def _pair(v: Any, what: str) -> tuple[int, int]:
    if isinstance(v, tuple):
        if len(v) != 2:
            raise TypeMismatch(f"{what} takes one integer or an HxW pair, got {describe(v)}")
        return (int(v[0]), int(v[1]))
    n = _int(v, what)
    return (n, n)


def coerce(spec: ParamSpec, v: Any, what: str) -> Any:
    """Convert an evaluated argument to its declared type or raise TypeMismatch."""
    t = spec.type
    if t == "int":
        return _int(v, what)
    if t in ("posint", "nonneg"):
        n = _int(v, what)
        low = 1 if t == "posint" else 0
        if n < low:
            raise TypeMismatch(f"{what} must be at least {low}, got {n}")
        _at_most(spec, (n,), what)
        return n
    if t in ("float", "nonnegfloat", "posfloat", "prob"):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeMismatch(f"{what} must be a number, got {describe(v)}")
        if not math.isfinite(v):
            raise TypeMismatch(f"{what} must be a finite number, got {describe(v)}")
        if t == "prob" and not 0.0 <= v < 1.0:
            raise TypeMismatch(f"{what} must be in [0, 1), got {v:g}")
        if t == "posfloat" and not v > 0:
            raise TypeMismatch(f"{what} must be greater than 0, got {v:g}")
        if t == "nonnegfloat" and v < 0:
            raise TypeMismatch(f"{what} must not be negative, got {v:g}")
        return float(v)
    if t == "bool":
        if not isinstance(v, bool):
            raise TypeMismatch(f"{what} must be true or false, got {describe(v)}")
        return v
    if t in ("pair", "pospair"):
        p = _pair(v, what)
        low = 1 if t == "pospair" else 0
        if min(p) < low:
            raise TypeMismatch(f"{what} must be at least {low}, got {'x'.join(map(str, p))}")
        _at_most(spec, p, what)
        return p
    if t == "pad":
        if isinstance(v, Symbol):
            if v != "same":
                raise TypeMismatch(f"{what} must be an integer, an HxW pair or 'same', got {describe(v)}")
            return "same"
        p = _pair(v, what)
        if min(p) < 0:
            raise TypeMismatch(f"{what} must not be negative")
        _at_most(spec, p, what)
        return p
    if t == "choice":
        if not isinstance(v, Symbol) or v not in spec.choices:
            hint = did_you_mean(str(v), spec.choices) if isinstance(v, str) else None
            raise TypeMismatch(f"{what} must be one of {', '.join(spec.choices)}; got {describe(v)}", hint)
        return str(v)
    if t == "tap":
        if not isinstance(v, Symbol):
            raise TypeMismatch(f"{what} must be a tap name, got {describe(v)}")
        return str(v)
    if t == "data":
        if not isinstance(v, str):
            raise TypeMismatch(f'{what} must be a dataset name or a quoted path, got {describe(v)}')
        return str(v)
    raise AssertionError(f"unknown parameter type {t}")


def bind(
    sig: Signature,
    layer: Layer,
    evaluate: Callable[[Expr], Any],
    errors: Collector,
    kind: str = "layer",
) -> dict[str, Any] | None:
    """Match `layer`'s arguments to `sig`; return {param: value} or None on error."""
    ok = True
    values: dict[str, Any] = {}

    def value_of(spec: ParamSpec, expr: Expr, what: str) -> Any:
        nonlocal ok
        try:
            return coerce(spec, evaluate(expr), what)
        except EvalError as e:
            errors.error(e.message, e.pos, e.hint)
        except TypeMismatch as e:
            errors.error(e.message, expr.pos, e.hint)
        ok = False
        return None

    args = list(layer.args)
    for i, spec in enumerate(sig.positional):
        if i < len(args):
            values[spec.name] = value_of(spec, args[i], f"{sig.name}'s {spec.name.upper()}")
        elif spec.required:
            errors.error(
                f"'{sig.name}' needs {spec.name.upper()}",
                layer.pos,
                f"usage: {sig.usage()}",
            )
            ok = False
        else:
            values[spec.name] = spec.default
    extra = args[len(sig.positional):]
    if sig.variadic is not None:
        values[sig.variadic.name] = tuple(value_of(sig.variadic, e, f"{sig.name}'s {sig.variadic.name.upper()}") for e in extra)
    elif extra:
        n = len(sig.positional)
        errors.error(
            f"'{sig.name}' takes {n} positional argument{'s' if n != 1 else ''}, got {len(args)}",
            extra[0].pos,
            f"usage: {sig.usage()}",
        )
        ok = False

    known = {k.name: k for k in sig.keywords}
    seen: set[str] = set()
    # Keywords that a misspelling was taken for: the misspelling's "did you mean"
    # already says what is missing, so no second error says it again.
    meant: set[str] = set()
    for kw in layer.kwargs:
        if kw.name in seen:
            errors.error(f"'{kw.name}' given twice", kw.pos)
            ok = False
            continue
        seen.add(kw.name)
        spec = known.get(kw.name)
        if spec is None:
            guess = nearest(kw.name, known)
            if guess is not None:
                meant.add(guess)
            hint = did_you_mean(kw.name, known) or (
                f"'{sig.name}' takes no keyword arguments" if not known else f"{sig.name} takes: {', '.join(known)}"
            )
            errors.error(f"unknown parameter '{kw.name}' for {kind} '{sig.name}'", kw.pos, hint)
            ok = False
            continue
        values[spec.name] = value_of(spec, kw.value, f"{sig.name}'s {kw.name}")
    for spec in sig.keywords:
        if spec.name in values:
            continue
        if not spec.required:
            values[spec.name] = spec.default
        elif spec.name not in meant:  # else its misspelling was reported and already cleared ok
            errors.error(f"'{sig.name}' needs {spec.name}=", layer.pos, f"usage: {sig.usage()}")
            ok = False
    if not ok:
        return None
    order = [p.name for p in sig.positional] + ([sig.variadic.name] if sig.variadic else []) + [k.name for k in sig.keywords]
    return {name: values[name] for name in order if name in values}
