"""Dropout with a counter-based mask: nothing is stored between forward and backward.

Mask convention (shared by every kernel that fuses dropout, e.g. conv/linear
epilogues, through the `dropout_mask_scale` device function):

  * `offsets` = the int32 flat element index of the value in the logical,
    contiguous, channels-last output tensor: `row * C + col` for `[M, C]` rows
    (`((n*H + h)*W + w)*C + c` for NHWC). Tensors must have < 2**31 elements.
  * the seed: a runtime integer in [0, 2**31) (a kernel argument, never a
    constexpr, so a new seed per step does not recompile);
  * element kept iff `tl.rand(seed, offsets) >= p` (probability 1-p), kept values
    scaled by 1/(1-p), dropped ones set to 0.

So a fused epilogue that calls `dropout_mask_scale(acc, seed, row*C + col, p)` on
its output tile produces exactly what `dropout(y, p, seed)` would on the
unfused output, and its backward can use `dropout_backward` (or the same
device function on the incoming gradient).

Where the seed comes from (`resolve_seed`, SEED_MODE):
  0  a host integer (eager use, tests): the seed argument itself;
  1  a `ClockSeed` in the forward: drawn on the device from the step clock
     (engine.kernels.clock), `philox(base seed + step, site)`, so a training
     step captured once in a CUDA graph draws fresh masks at every replay; the
     first program records the seed it drew in `ClockSeed.used` (int64 [1]);
  2  a `ClockSeed` in the backward: the recorded seed, so the mask is the
     forward's even though the loss advances the clock in between.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.common import block_1d, check_activation, contiguous
from engine.kernels.launch import launch

MAX_SEED = 2**31


class ClockSeed:
    """A per-step dropout seed drawn on the device for dropout site `site` (an id
    unique in the network) from `counters` (engine.kernels.clock: int64 [2], base
    seed and step). `forward_args()` allocates `used` (int64 [1]), where the forward
    kernel records the seed it drew; `backward_args()` makes kernels read it back."""

    def __init__(self, counters: torch.Tensor, site: int):
        if counters.dtype != torch.int64 or counters.numel() < 2:
            raise ValueError("ClockSeed needs the step clock's int64 counters")
        self.counters, self.site = counters, int(site)
        self.used: torch.Tensor | None = None

    def forward_args(self) -> tuple:
        """(seed, clock_ptr, used_ptr, site, SEED_MODE) of a forward launch (draw and record)."""
        self.used = torch.empty(1, dtype=torch.int64, device=self.counters.device)  # [1] the drawn seed
        return 0, self.counters, self.used, self.site, 1

    def backward_args(self) -> tuple:
        """(seed, clock_ptr, used_ptr, site, SEED_MODE) of a backward launch (the recorded seed)."""
        if self.used is None:
            raise RuntimeError("the dropout backward ran before its forward recorded a seed")
        return 0, self.counters, self.used, self.site, 2


def seed_args(seed, backward: bool = False) -> tuple:
    """(seed, clock_ptr, used_ptr, site, SEED_MODE) kernel arguments for an int seed or a ClockSeed."""
    if isinstance(seed, ClockSeed):
        return seed.backward_args() if backward else seed.forward_args()
    return int(seed), None, None, 0, 0


@triton.jit
def resolve_seed(seed, clock_ptr, used_ptr, site, is_first, SEED_MODE: tl.constexpr):
    """The dropout seed of a launch (see the module docstring). `is_first`: whether
    this program records a drawn seed (exactly one program should)."""
    if SEED_MODE == 1:
        key = tl.load(clock_ptr) + tl.load(clock_ptr + 1)  # int64 base seed + step
        s = (tl.randint(key, site + tl.zeros((), tl.int32)) & 0x7FFFFFFF).to(tl.int32)
        tl.store(used_ptr, s.to(tl.int64), mask=is_first)
    elif SEED_MODE == 2:
        s = tl.load(used_ptr).to(tl.int32)
    else:
        s = seed
    return s


@triton.jit
def dropout_mask_scale(v, seed, offsets, p):
    """Apply the dropout mask to `v` (fp32 block of any shape).

    `offsets` (int32, same shape as v) = flat index of each element in the
    contiguous output (see module docstring); `seed` runtime int; `p` drop
    probability as a runtime fp32 with 0 <= p < 1 (hosts handle p >= 1 by
    writing zeros). Returns where(rand(seed, offsets) >= p, v / (1 - p), 0)."""
    r = tl.rand(seed, offsets)  # same shape as offsets, uniform [0, 1)
    keep = r >= p
    return tl.where(keep, v * (1.0 / (1.0 - p)), 0.0)


@triton.jit
def _dropout_kernel(
    x_ptr,  # [n] input (or upstream gradient in the backward)
    y_ptr,  # [n] output, x's dtype
    n,
    seed, clock_ptr, used_ptr, site,  # see resolve_seed
    p,
    SEED_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int32 flat index (n < 2**31)
    mask = offs < n
    s = resolve_seed(seed, clock_ptr, used_ptr, site, pid == 0, SEED_MODE)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] fp32
    y = dropout_mask_scale(x, s, offs, p)  # [BLOCK] fp32
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def check_seed(seed) -> None:
    """A dropout seed: an int in [0, 2**31) or a ClockSeed."""
    if isinstance(seed, ClockSeed):
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"dropout seed must be an int in [0, 2**31) or a ClockSeed, got {seed!r}")


def _check(x, p, seed):
    check_activation(x)
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
        raise ValueError(f"dropout probability must be in [0, 1], got {p!r}")
    check_seed(seed)
    if x.numel() >= 2**31:
        raise ValueError("dropout: tensors must have fewer than 2**31 elements (int32 mask offsets)")


def _run(x: torch.Tensor, p: float, seed, backward: bool) -> torch.Tensor:
    _check(x, p, seed)
    x = contiguous(x)
    if p >= 1.0:
        return torch.zeros_like(x)
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    blk, nw = block_1d(n)
    *sargs, mode = seed_args(seed, backward)
    launch(_dropout_kernel, (triton.cdiv(n, blk),), x, y, n, *sargs, float(p), SEED_MODE=mode, BLOCK=blk,
           num_warps=nw)
    return y


def dropout_forward(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    """Training-mode dropout of x (new tensor, x's dtype). No autograd.
    p == 1 gives zeros. `seed`: an int, or a ClockSeed (drawn on the device, recorded)."""
    return _run(x, p, seed, backward=False)


def dropout_backward(dy: torch.Tensor, p: float, seed) -> torch.Tensor:
    """Gradient of dropout_forward: the same mask (regenerated from the seed, or
    from the seed a ClockSeed's forward recorded, and the flat offsets) applied to dy."""
    return _run(dy, p, seed, backward=True)


class DropoutFunction(torch.autograd.Function):
    """y = dropout(x) with mask rand(seed, flat index) >= p. Saves nothing but
    (p, seed): the backward regenerates the mask."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = float(p), seed
        return dropout_forward(x, p, seed)

    @staticmethod
    def backward(ctx, dy):
        return dropout_backward(dy, ctx.p, ctx.seed), None, None


def dropout(x: torch.Tensor, p: float, seed, training: bool = True) -> torch.Tensor:
    """Autograd-aware dropout. Identity (x itself) when not training or p == 0."""
    _check(x, p, seed)
    if not training or p == 0.0:
        return x
    return DropoutFunction.apply(x, p, seed)
