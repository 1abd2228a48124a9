"""One door for every kernel launch, so launches can be recorded.

Every host launcher calls `launch(kernel, grid, *args, **meta)` instead of
`kernel[grid](...)`. Normally that is all it does. Inside `recording()` it also
notes each distinct specialization (kernel, argument types, constexpr values),
which is how `fusenet inspect` and the sm_80/sm_90 compile tests learn exactly
which kernel variants a network needs: run the network once, collect, compile.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

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
    torch.bool: "i1",
}


@dataclass(frozen=True)
class Specialization:
    """A kernel variant: enough to compile it ahead of time for any GPU target."""

    kernel: Any  # the @triton.jit function
    signature: tuple[tuple[str, str], ...]  # (arg name, triton type) for runtime args
    constexprs: tuple[tuple[str, Any], ...]  # (arg name, value) for tl.constexpr args
    num_warps: int = 4
    num_stages: int = 3
    label: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__


_recorded: list[Specialization] | None = None


@contextlib.contextmanager
def recording() -> Iterator[list[Specialization]]:
    """Collect the distinct kernel specializations launched inside the block."""
    global _recorded
    outer, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        inner, _recorded = _recorded, outer
        if outer is not None:
            for spec in inner:
                if spec not in outer:
                    outer.append(spec)


def _triton_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if not -(2**31) <= value < 2**31 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def _record(kernel, args, meta) -> None:
    fn = kernel.fn if hasattr(kernel, "fn") else kernel
    params = kernel.arg_names if hasattr(kernel, "arg_names") else fn.__code__.co_varnames
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr} if hasattr(kernel, "params") else set()
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")})
    signature, constexprs = [], []
    for name in params:
        if name not in bound:
            continue  # defaulted constexpr
        value = bound[name]
        if name in constexpr_names or value is None:
            constexprs.append((name, value))
        else:
            signature.append((name, _triton_type(value)))
    spec = Specialization(
        kernel=kernel,
        signature=tuple(signature),
        constexprs=tuple(constexprs),
        num_warps=meta.get("num_warps", 4),
        num_stages=meta.get("num_stages", 3),
    )
    if spec not in _recorded:
        _recorded.append(spec)


def launch(kernel, grid, *args, **meta):
    """Launch `kernel[grid](*args, **meta)`, recording its specialization if asked."""
    if _recorded is not None:
        _record(kernel, args, meta)
    return kernel[grid](*args, **meta)
