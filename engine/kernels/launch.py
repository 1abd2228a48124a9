"""One door for every kernel launch, so launches can be recorded.

Every host launcher calls `launch(kernel, grid, *args, **meta)` instead of
`kernel[grid](...)`. Normally that is all it does. Inside `recording()` it also
notes each distinct specialization (kernel, argument types, constexpr values),
which is how `fusenet inspect` and the sm_80/sm_90 compile tests learn exactly
which kernel variants a network needs: run the network once, collect, compile.

The recorded specialization follows the rules Triton's JIT uses on a GPU, so
that compiling it ahead of time gives the same binary the GPU would run:

* parameters annotated `tl.constexpr` are constexprs (defaults applied);
* a `None` argument and an integer argument equal to 1 are specialised to
  constexprs (as the JIT does), unless the kernel lists it in
  `do_not_specialize`;
* tensors become pointer types (`*fp16`, ...), Python ints `i32`/`i64`/`u64`,
  floats `fp32`, bools `u1` (Triton >= 3.x spells them so);
* pointers whose address is a multiple of 16 and integers divisible by 16 are
  noted in `Specialization.divisible` (Triton's `tt.divisibility = 16`).

This works for both `JITFunction` (GPU) and the interpreter's
`InterpretedFunction`, which lacks `.params`, by reading the Python
signature of the wrapped function.

`recording(dry_run=True)` records without executing any kernel (outputs stay
uninitialised): the way to collect the GPU-tile variants of a whole network
cheaply on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
import inspect as _inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

_TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "u1",
}
for _name, _ty in (("float8_e4m3fn", "fp8e4nv"), ("float8_e5m2", "fp8e5"), ("uint16", "u16"),
                   ("uint32", "u32"), ("uint64", "u64")):
    if hasattr(torch, _name):
        _TORCH_TO_TRITON[getattr(torch, _name)] = _ty

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "debug",
                   "launch_cooperative_grid", "launch_pdl")


@dataclass(frozen=True)
class Specialization:
    """A kernel variant: enough to compile it ahead of time for any GPU target."""

    kernel: Any  # the @triton.jit function (JITFunction or InterpretedFunction)
    signature: tuple[tuple[str, str], ...]  # (arg name, triton type) for runtime args
    constexprs: tuple[tuple[str, Any], ...]  # (arg name, value) for tl.constexpr args
    num_warps: int = 4
    num_stages: int = 3
    label: str = field(default="", compare=False)
    # runtime args known divisible by 16 (pointer address / integer value), as the JIT specialises
    divisible: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return kernel_name(self.kernel)


_recorded: list[Specialization] | None = None
_dry_run: bool = False
_observers: list[Callable[[Any, tuple], None]] = []  # open observing() blocks, innermost last
_launch_observers: list[Callable[[Any, Any, tuple, dict], None]] = []  # open observing_launches() blocks


@contextlib.contextmanager
def recording(dry_run: bool = False) -> Iterator[list[Specialization]]:
    """Collect the distinct kernel specializations launched inside the block.

    With `dry_run=True`, `launch` records but does not run the kernels (the
    launchers' outputs stay uninitialised). Nested blocks pass their records up.
    """
    global _recorded, _dry_run
    outer, _recorded = _recorded, []
    outer_dry, _dry_run = _dry_run, bool(dry_run) or _dry_run
    try:
        yield _recorded
    finally:
        inner, _recorded = _recorded, outer
        _dry_run = outer_dry
        if outer is not None:
            for spec in inner:
                if spec not in outer:
                    outer.append(spec)



@contextlib.contextmanager
def observing(observer: Callable[[Any, tuple], None]) -> Iterator[None]:
    """Call `observer(kernel, args)` for every launch inside the block, before it
    runs (or is skipped by a dry run): how launches are counted and their
    tensor arguments measured."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


@contextlib.contextmanager
def observing_launches(observer: Callable[[Any, Any, tuple, dict], None]) -> Iterator[None]:
    """Call `observer(kernel, grid, args, meta)` for every launch inside the block: the
    whole launch (grid and constexprs too), for the static performance estimate
    (engine.perf.gemm_perf counts programs and loop trips from it)."""
    _launch_observers.append(observer)
    try:
        yield
    finally:
        _launch_observers.remove(observer)


@contextlib.contextmanager
def launch_log() -> Iterator[list[str]]:
    """The name of every kernel launched inside the block, in launch order (one
    entry per launch, unlike `recording`, which keeps distinct variants).
    Combines with `recording(dry_run=True)` to count launches without running them."""
    log: list[str] = []
    with observing(lambda kernel, args: log.append(kernel_name(kernel))):
        yield log


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(fn))


def is_dry_run() -> bool:
    """True inside `recording(dry_run=True)`: kernels are recorded, not run."""
    return _recorded is not None and _dry_run


def is_recording() -> bool:
    """True inside `recording()`: launches are being recorded (and maybe not run)."""
    return _recorded is not None


try:  # Triton's own argument specialiser (3.x: C++), so types match what the JIT compiles
    from triton._C.libtriton import native_specialize_impl as _native_specialize
    from triton.backends.compiler import BaseBackend as _BaseBackend
except Exception:  # pragma: no cover - older/newer triton without it
    _native_specialize = None


def _fallback_specialize(value: Any, specialize: bool) -> tuple[str, Any]:
    if value is None:
        return "constexpr", None
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype], ("D" if value.data_ptr() % 16 == 0 else "")
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        if -(2**31) <= value < 2**31:
            ty = "i32"
        elif 2**63 <= value < 2**64:
            ty = "u64"
        elif -(2**63) <= value < 2**63:
            ty = "i64"
        else:
            raise ValueError(f"integer kernel argument {value} does not fit in 64 bits")
        return ty, ("D" if specialize and value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"cannot type kernel argument {value!r}")


def is_tensor_descriptor(value: Any) -> bool:
    """A host-side TMA tensor descriptor (triton.tools.tensor_descriptor.TensorDescriptor)."""
    return type(value).__name__ == "TensorDescriptor" and hasattr(value, "base") and hasattr(value, "block_shape")


def _specialize(value: Any, specialize: bool) -> tuple[str, Any]:
    """(triton type or 'constexpr', attribute string or value) for one runtime argument."""
    if isinstance(value, torch.Tensor) and value.dtype not in _TORCH_TO_TRITON:
        raise TypeError(f"unsupported tensor dtype {value.dtype} for a kernel argument")
    if is_tensor_descriptor(value):
        # Triton spells it `tensordesc<bf16[64, 128]>` (3.6 and 3.9); no divisibility attribute
        if _native_specialize is not None:
            with contextlib.suppress(Exception):
                return _native_specialize(_BaseBackend, value, False, specialize, True)[:2]
        return f"tensordesc<{_TORCH_TO_TRITON[value.base.dtype]}[{', '.join(map(str, value.block_shape))}]>", None
    if _native_specialize is not None and (value is None or isinstance(value, (torch.Tensor, bool, int, float))):
        try:
            ty, attr = _native_specialize(_BaseBackend, value, False, specialize, True)[:2]
            return ty, attr
        except Exception:
            pass
    return _fallback_specialize(value, specialize)


def _is_constexpr_annotation(annotation: Any) -> bool:
    if annotation is _inspect.Parameter.empty or annotation is None:
        return False
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    return "constexpr" in str(text)


def kernel_params(kernel) -> list[tuple[_inspect.Parameter, bool, bool]]:
    """(parameter, is_constexpr, do_not_specialize) per kernel parameter, cached on the kernel."""
    cached = getattr(kernel, "_fusenet_params", None)
    if cached is not None:
        return cached
    fn = getattr(kernel, "fn", kernel)
    sig = _inspect.signature(fn)
    opts = getattr(kernel, "kwargs", None) or {}
    dns = getattr(kernel, "do_not_specialize", None)
    if dns is None:
        dns = opts.get("do_not_specialize") or ()
    dns = set(dns)
    out = []
    for i, p in enumerate(sig.parameters.values()):
        out.append((p, _is_constexpr_annotation(p.annotation), i in dns or p.name in dns))
    try:
        kernel._fusenet_params = out
    except Exception:
        pass
    return out


def _unwrap(value: Any) -> Any:
    # tl.constexpr(3) -> 3
    cls = type(value)
    if cls.__name__ == "constexpr" and cls.__module__.startswith("triton") and hasattr(value, "value"):
        return value.value
    return value


def _make_spec(kernel, args, meta) -> Specialization:
    params = kernel_params(kernel)
    kwargs = {k: v for k, v in meta.items() if k not in _LAUNCH_OPTIONS}
    fn = getattr(kernel, "fn", kernel)
    try:
        bound = _inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        name = getattr(fn, "__name__", repr(fn))
        raise TypeError(f"launch of kernel {name}: {e}") from None
    bound.apply_defaults()
    values = bound.arguments
    signature, constexprs, divisible = [], [], []
    for p, is_constexpr, no_spec in params:
        value = _unwrap(values[p.name])
        if is_constexpr:
            constexprs.append((p.name, value))
            continue
        ty, attr = _specialize(value, not no_spec)
        if ty == "constexpr":
            constexprs.append((p.name, value))
            continue
        signature.append((p.name, ty))
        if isinstance(attr, str) and "D" in attr:
            divisible.append(p.name)
    return Specialization(
        kernel=kernel,
        signature=tuple(signature),
        constexprs=tuple(constexprs),
        num_warps=int(meta.get("num_warps", 4)),
        num_stages=int(meta.get("num_stages", 3)),
        divisible=tuple(divisible),
    )


def specialization(kernel, args: tuple, meta: dict) -> Specialization:
    """The variant a launch `launch(kernel, grid, *args, **meta)` compiles (what `recording` notes)."""
    return _make_spec(kernel, args, meta)


def _record(kernel, args, meta) -> None:
    spec = _make_spec(kernel, args, meta)
    if spec not in _recorded:
        _recorded.append(spec)


def launch(kernel, grid, *args, **meta):
    """Launch `kernel[grid](*args, **meta)`, recording its specialization if asked.

    Inside `recording(dry_run=True)` the kernel is recorded and not run (returns None).
    """
    for observer in _observers:
        observer(kernel, args)
    for observer in _launch_observers:
        observer(kernel, grid, args, meta)
    if _recorded is not None:
        _record(kernel, args, meta)
        if _dry_run:
            return None
    return kernel[grid](*args, **meta)
