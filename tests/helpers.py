"""The one comparison helper every kernel and network test uses.

`check_against_torch(ours, ref, inputs)` runs `ours` on the inputs as given and
`ref` (a PyTorch function) on fp64 copies, then compares the outputs and the
gradients of every input that requires grad. Tolerances are per dtype and
relative to the fp64 reference's scale, so one rule serves tiny and large sums.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# (atol as a fraction of the reference's max |value|, rtol) per compute dtype.
TOLERANCES = {
    torch.float32: (2e-5, 1e-4),
    "tf32": (2e-3, 5e-3),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.5e-2, 5e-2),
    # whole networks in fp32: errors of many fp32 kernels compound through
    # depth and batch-norm cancellation
    "network_fp32": (1e-4, 1e-3),
}


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if out is None:
        return []
    raise TypeError(f"unexpected output type {type(out)}")


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tol=torch.float32, what: str = "", scale: float | None = None
) -> None:
    """Elementwise |a - e| <= atol * max|e| + rtol * |e|, with a readable failure.

    `scale` overrides max|e| as the magnitude atol is relative to: whole-network
    checks pass the largest gradient of the network, so a gradient that is
    mathematically zero (a conv bias before training-mode batch norm) is judged
    against the network's scale, not against its own rounding noise."""
    atol_frac, rtol = TOLERANCES[tol]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), f"{what}: non-finite values differ"
    if scale is None:
        scale = e.abs().max().item() if e.numel() else 0.0
    bound = atol_frac * max(scale, 1e-6) + rtol * e.abs()
    err = (a - e).abs()
    bad = err > bound
    if bad.any():
        i = int(torch.argmax((err - bound).flatten()))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{e.numel()} elements off; worst at flat index {i}: "
            f"got {a.flatten()[i].item():.6g}, expected {e.flatten()[i].item():.6g} "
            f"(max err {err.max().item():.3g}, reference scale {scale:.3g})"
        )


def check_against_torch(
    ours: Callable[..., Any],
    ref: Callable[..., Any],
    inputs: Sequence[Any],
    *,
    tol=None,
    grad: bool = True,
    seed: int = 0,
) -> tuple[Any, Any]:
    """Compare ours(*inputs) with ref(*fp64 copies of inputs), forward and backward.

    Tensors in `inputs` that require grad get their gradients compared, using the
    same random upstream gradient for both sides. `tol` defaults to the dtype of
    the first floating input. Returns (our outputs, reference outputs).
    """
    floats = [t for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
    tol = tol if tol is not None else (floats[0].dtype if floats else torch.float32)

    ours_in = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    ref_in = [
        (t.detach().to(torch.float64) if t.is_floating_point() else t.detach().clone()).requires_grad_(t.requires_grad)
        if isinstance(t, torch.Tensor)
        else t
        for t in inputs
    ]
    out = ours(*ours_in)
    expected = ref(*ref_in)
    outs, exps = _flatten(out), _flatten(expected)
    assert len(outs) == len(exps), f"ours gave {len(outs)} outputs, reference {len(exps)}"
    for k, (o, e) in enumerate(zip(outs, exps)):
        assert_close(o, e, tol, what=f"output {k}")

    if grad and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        gen = torch.Generator().manual_seed(seed)
        diff = [(o, e) for o, e in zip(outs, exps) if e.requires_grad]
        ups = [torch.randn(e.shape, generator=gen, dtype=torch.float64) for _, e in diff]
        torch.autograd.backward([e for _, e in diff], [u.to(e.device) for (_, e), u in zip(diff, ups)])
        torch.autograd.backward([o for o, _ in diff], [u.to(o.dtype).to(o.device) for (o, _), u in zip(diff, ups)])
        for k, (a, b) in enumerate(zip(ours_in, ref_in)):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                assert a.grad is not None, f"input {k}: no gradient from ours"
                assert_close(a.grad, b.grad, tol, what=f"grad of input {k}")
    return out, expected


# aten ops that allocate, view or copy memory but compute nothing. `set_` is how
# the Triton interpreter aliases each tensor argument's storage.
DATA_MOVEMENT_OPS = frozenset({
    "_to_copy", "_unsafe_view", "alias", "as_strided", "clone", "copy_", "detach", "empty",
    "empty_like", "empty_strided", "expand", "fill_", "lift_fresh", "new_empty", "permute",
    "reshape", "set_", "slice", "t", "view", "zero_", "zeros",
})

# more views and allocations that most kernel paths are allowed
SHAPE_OPS = frozenset({
    "contiguous", "new_empty_strided", "new_zeros", "resolve_conj", "resolve_neg",
    "select", "squeeze", "unsqueeze", "zeros_like",
})


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten op dispatched inside `with OpRecorder() as rec:`.

    Tests compare `rec.ops` with an allow-list of data-movement ops to prove a
    kernel path does no PyTorch arithmetic."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def check_network_against_reference(
    ours: torch.nn.Module,
    ref: torch.nn.Module,
    x: torch.Tensor,
    tol="network_fp32",
    *,
    grad_floor: float = 0.0,
    seed: int | None = None,
) -> None:
    """A compiled network against the fp64 reference on input x: the output, the
    input gradient and every parameter gradient, for one random upstream gradient.

    grad_floor: a parameter gradient is judged against max(its own scale,
    grad_floor x the largest parameter gradient), for gradients that are zero
    up to rounding (a conv bias before training-mode batch norm).
    seed: torch.manual_seed before each forward, so both draw the same dropout seeds.
    """
    xo, xr = x.detach().clone().requires_grad_(), x.detach().double().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    yo = ours(xo)
    if seed is not None:
        torch.manual_seed(seed)
    yr = ref(xr)
    assert_close(yo, yr, tol, what="output")
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    yo.backward(g.to(yo.dtype))
    yr.backward(g)
    assert_close(xo.grad, xr.grad, tol, what="input gradient")
    top = max(p.grad.abs().max().item() for p in ref.parameters())
    for (key, po), (_, pr) in zip(ours.named_parameters(), ref.named_parameters()):
        scale = max(pr.grad.abs().max().item(), grad_floor * top) if grad_floor else None
        assert_close(po.grad, pr.grad, tol, what=f"gradient of {key}", scale=scale)


# The language's activations, plus "none": the `act` values every fused kernel takes.
# Read from the one table that defines them, so a new activation joins every test.
def heavy_imports(code: str, cwd, watch: Sequence[str] = ("torch", "triton", "numpy")) -> list[str]:
    """Which of the `watch` modules a fresh interpreter has imported after running `code` in
    `cwd` (the tests that pin the DSL-only paths and the base modules as torch-free)."""
    import json
    import subprocess
    import sys

    probe = (f"{code}\nimport json as _json, sys as _sys\n"
             f"print(_json.dumps(sorted(m for m in {tuple(watch)!r} if m in _sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])  # the printed list


from engine.kernels.activations import ACTIVATIONS as _ACTIVATION_TABLE  # noqa: E402

ACTIVATIONS = ["none", *_ACTIVATION_TABLE]


def torch_act(z: torch.Tensor, act: str, slope: float) -> torch.Tensor:
    """The PyTorch oracle of a kernel's activation epilogue (the reference network's own);
    `slope` is the activation's parameter (leaky_relu's slope, elu's alpha)."""
    from engine.kernels.activations import oracle

    return oracle(act, z, slope)
