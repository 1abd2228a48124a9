"""Fused multi-tensor optimizers: one Triton launch per step per parameter group.

At construction every parameter of a group is re-pointed (`p.data = view`) into
one flat fp32 buffer (values preserved), and the optimizer state (momentum,
exp_avg, exp_avg_sq) lives in flat buffers of the same layout. A step copies the
gradients into a flat gradient buffer (a copy per parameter, no arithmetic) and
launches one kernel over a block table: each program owns one block of one
parameter (`start, end, segment` rows), so a program never straddles two
parameters and can look up that parameter's per-segment values.

Parameters whose `.grad` is None are skipped exactly as in torch.optim: no
update, no weight decay, no state change (a per-segment has-grad flag; the
program returns without touching memory).

Hyperparameters (lr, betas, eps, weight decay, momentum, dampening) and the
step-dependent values (bias corrections folded into `step_size` / `bc2_sqrt`,
momentum first-step scales) are runtime kernel scalars, never constexprs, so lr
schedules never recompile. They are read from `group[...]` at every step, so
`torch.optim.lr_scheduler` works. Only when parameters of a group are at
different step counts (a parameter that missed steps because its grad was None)
do the step-dependent values come per segment from a small table (`PER_SEG`).

`state[p]` holds torch-compatible entries (`momentum_buffer`; `step`, `exp_avg`,
`exp_avg_sq`) that are views into the flat buffers, so `state_dict()` saves them
and `load_state_dict()` copies loaded values back into the flat buffers.
Checkpoints interchange with torch.optim.SGD / Adam / AdamW.

Caveat: a parameter must stay a view of the flat buffer; if `p.data` is
replaced (e.g. `model.to(...)` after building the optimizer) the next step
detects it (pointer check), copies the new value into the flat buffer and
re-points the parameter.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from engine import device
from engine.kernels.launch import launch


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------
@triton.jit
def _sgd_kernel(
    param_ptr, grad_ptr, mom_ptr, blk_ptr, seg_ptr,
    lr, weight_decay, momentum, buf_scale, grad_scale,
    HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, PER_SEG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """torch.optim.SGD on one block of one parameter.

    buf = buf * buf_scale + grad_scale * g: (momentum, 1 - dampening) normally,
    (0, 1) on a parameter's first step (buffer := g, buffers start at zero).
    """
    pid = tl.program_id(0)
    start = tl.load(blk_ptr + pid * 3)  # int64 first flat element of this block
    end = tl.load(blk_ptr + pid * 3 + 1)  # int64 end of this block's parameter segment
    seg = tl.load(blk_ptr + pid * 3 + 2)  # int64 parameter index in the group
    has_grad = tl.load(seg_ptr + seg * 3)  # fp32 1.0 / 0.0
    if has_grad != 0.0:
        if PER_SEG:
            buf_scale = tl.load(seg_ptr + seg * 3 + 1)
            grad_scale = tl.load(seg_ptr + seg * 3 + 2)
        offs = start + tl.arange(0, BLOCK)  # [BLOCK] flat indices
        mask = offs < end
        p = tl.load(param_ptr + offs, mask=mask, other=0.0)  # [BLOCK] fp32
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0)  # [BLOCK] fp32
        if HAS_WD:
            g = g + weight_decay * p
        if HAS_MOMENTUM:
            buf = tl.load(mom_ptr + offs, mask=mask, other=0.0)  # [BLOCK] fp32
            buf = buf * buf_scale + grad_scale * g
            tl.store(mom_ptr + offs, buf, mask=mask)
            if NESTEROV:
                g = g + momentum * buf
            else:
                g = buf
        tl.store(param_ptr + offs, p - lr * g, mask=mask)


@triton.jit
def _adam_kernel(
    param_ptr, grad_ptr, m_ptr, v_ptr, blk_ptr, seg_ptr,
    weight_decay, decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
    HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, PER_SEG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """torch.optim.Adam (L2 into the grad) or AdamW (DECOUPLED: p *= 1 - lr*wd) on one block.

    step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t) (host double math).
    """
    pid = tl.program_id(0)
    start = tl.load(blk_ptr + pid * 3)  # int64
    end = tl.load(blk_ptr + pid * 3 + 1)  # int64
    seg = tl.load(blk_ptr + pid * 3 + 2)  # int64
    has_grad = tl.load(seg_ptr + seg * 3)  # fp32 1.0 / 0.0
    if has_grad != 0.0:
        if PER_SEG:
            step_size = tl.load(seg_ptr + seg * 3 + 1)
            bc2_sqrt = tl.load(seg_ptr + seg * 3 + 2)
        offs = start + tl.arange(0, BLOCK)  # [BLOCK] flat indices
        mask = offs < end
        p = tl.load(param_ptr + offs, mask=mask, other=0.0)  # [BLOCK] fp32
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0)  # [BLOCK] fp32
        if HAS_WD:
            if DECOUPLED:
                p = p * decay
            else:
                g = g + weight_decay * p
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)  # [BLOCK] fp32 exp_avg
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)  # [BLOCK] fp32 exp_avg_sq
        m = m + one_minus_beta1 * (g - m)  # torch's lerp_(g, 1 - beta1)
        v = v * beta2 + one_minus_beta2 * (g * g)
        denom = tl.sqrt(v) / bc2_sqrt + eps
        p = p - step_size * (m / denom)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(param_ptr + offs, p, mask=mask)


# ----------------------------------------------------------------------------
# flat group storage
# ----------------------------------------------------------------------------
def _block_size() -> int:
    return 1 << 16 if device.INTERPRETED else 2048


class _FlatGroup:
    """One param group's flat buffers, block table and per-segment table."""

    def __init__(self, params: list[torch.Tensor]):
        if not params:
            raise ValueError("optimizer got an empty parameter group")
        dev = params[0].device
        for p in params:
            if p.dtype != torch.float32:
                raise ValueError(f"fused optimizers need fp32 parameters, got {p.dtype} (shape {tuple(p.shape)})")
            if p.device != dev:
                raise ValueError(f"all parameters of a group must be on one device: {p.device} vs {dev}")
            if p.is_sparse:
                raise ValueError("sparse parameters are not supported")
        self.params = list(params)
        self.shapes = [tuple(p.shape) for p in params]
        self.numels = [p.numel() for p in params]
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.total = total
        self.device = dev
        self.flat_param = torch.empty((max(total, 1),), device=dev, dtype=torch.float32)
        self.flat_grad = torch.zeros((max(total, 1),), device=dev, dtype=torch.float32)
        with torch.no_grad():
            for p, a, n in zip(params, self.offsets, self.numels):
                view = self.flat_param[a:a + n].view(p.shape)
                view.copy_(p.detach())
                p.data = view
        self.bufs: dict[str, torch.Tensor] = {}
        self.steps = [0] * len(params)  # host step counts (Adam)
        self.block = _block_size()
        rows = []
        for i, (a, n) in enumerate(zip(self.offsets, self.numels)):
            for b0 in range(0, n, self.block):
                rows.append((a + b0, a + n, i))
        self.n_blocks = len(rows)
        self.blk_table = torch.tensor(rows if rows else [(0, 0, 0)], dtype=torch.int64).to(dev)
        self.seg_table = torch.zeros((len(params), 3), device=dev, dtype=torch.float32)
        self._seg_key: Any = None

    def param_view(self, buf: torch.Tensor, i: int) -> torch.Tensor:
        a, n = self.offsets[i], self.numels[i]
        return buf[a:a + n].view(self.shapes[i])

    def buffer(self, name: str) -> torch.Tensor:
        if name not in self.bufs:
            self.bufs[name] = torch.zeros((max(self.total, 1),), device=self.device, dtype=torch.float32)
        return self.bufs[name]

    def sync_params(self) -> None:
        """Re-point parameters whose .data was replaced since the last step."""
        for i, p in enumerate(self.params):
            view = self.param_view(self.flat_param, i)
            if p.data_ptr() != view.data_ptr() or tuple(p.shape) != self.shapes[i] or p.stride() != view.stride():
                if tuple(p.shape) != self.shapes[i]:
                    raise ValueError(f"parameter {i} changed shape from {self.shapes[i]} to {tuple(p.shape)}")
                if p.dtype != torch.float32 or p.device != self.device:
                    raise ValueError(f"parameter {i} moved to {p.dtype} on {p.device}; rebuild the optimizer")
                with torch.no_grad():
                    view.copy_(p.detach())
                p.data = view

    def gather_grads(self) -> list[bool]:
        """Copy every available grad into flat_grad; returns the has-grad flags."""
        has = []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                has.append(False)
                continue
            if g.is_sparse:
                raise ValueError("fused optimizers do not support sparse gradients")
            dst = self.param_view(self.flat_grad, i)
            if g.data_ptr() != dst.data_ptr() or g.stride() != dst.stride() or g.dtype != torch.float32:
                dst.copy_(g)
            has.append(True)
        return has

    def set_segments(self, has: list[bool], values: list[tuple[float, float]] | None) -> None:
        """Upload the per-segment table: has-grad flags, and per-segment values if given."""
        key = (tuple(has), None if values is None else tuple(values))
        if key == self._seg_key:
            return
        rows = [
            (1.0 if h else 0.0, *(values[i] if values is not None else (0.0, 0.0)))
            for i, h in enumerate(has)
        ]
        self.seg_table.copy_(torch.tensor(rows, dtype=torch.float32))
        self._seg_key = key


# ----------------------------------------------------------------------------
# optimizers
# ----------------------------------------------------------------------------
class _FusedOptimizer(torch.optim.Optimizer):
    """Base: flat storage per group, grad gathering, state_dict round trip."""

    _state_keys: tuple[str, ...] = ()  # flat-buffer-backed per-param state entries
    _has_step = False

    def __init__(self, params, defaults):
        self._flat: list[_FlatGroup] = []
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._flat.append(_FlatGroup(self.param_groups[-1]["params"]))

    def _group_state_keys(self, group: dict) -> tuple[str, ...]:
        return self._state_keys

    # -- checkpoints ---------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group, fg in zip(self.param_groups, self._flat):
            keys = self._group_state_keys(group)
            for i, p in enumerate(fg.params):
                st = self.state.get(p)
                loaded = dict(st) if st else {}
                new_state: dict[str, Any] = {}
                for k in keys:
                    view = fg.param_view(fg.buffer(k), i)
                    val = loaded.get(k)
                    if val is None:
                        view.zero_()
                    else:
                        view.copy_(val)
                        new_state[k] = view
                if self._has_step:
                    step = loaded.get("step")
                    fg.steps[i] = int(float(step)) if step is not None else 0
                    if step is not None:
                        new_state["step"] = torch.tensor(float(fg.steps[i]), dtype=torch.float32)
                for k, v in loaded.items():  # keep foreign entries untouched
                    if k not in new_state and k not in keys and k != "step":
                        new_state[k] = v
                if new_state:
                    self.state[p] = new_state
                elif p in self.state:
                    del self.state[p]
            fg._seg_key = None

    # -- step ----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, fg in zip(self.param_groups, self._flat):
            fg.sync_params()
            has = fg.gather_grads()
            if not any(has) or fg.n_blocks == 0:
                continue
            self._step_group(group, fg, has)
        return loss

    def _step_group(self, group: dict, fg: _FlatGroup, has: list[bool]) -> None:
        raise NotImplementedError


class SGD(_FusedOptimizer):
    """torch.optim.SGD semantics (momentum, dampening, nesterov, L2 weight decay), fused."""

    def __init__(self, params, lr=1e-3, momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults)

    def _group_state_keys(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _step_group(self, group, fg, has):
        lr = float(group["lr"])
        momentum = float(group["momentum"])
        dampening = float(group["dampening"])
        wd = float(group["weight_decay"])
        nesterov = bool(group["nesterov"])
        has_mom = momentum != 0.0
        values = None
        buf_scale, grad_scale = momentum, 1.0 - dampening
        mom = fg.buffer("momentum_buffer") if has_mom else fg.flat_param
        if has_mom:
            per = []
            for i, p in enumerate(fg.params):
                started = self.state[p].get("momentum_buffer") is not None if p in self.state else False
                per.append((momentum, 1.0 - dampening) if started else (0.0, 1.0))
            used = {per[i] for i in range(len(per)) if has[i]}
            if len(used) == 1:
                buf_scale, grad_scale = used.pop()
            else:
                values = per
            for i, p in enumerate(fg.params):
                if has[i] and self.state[p].get("momentum_buffer") is None:
                    self.state[p]["momentum_buffer"] = fg.param_view(mom, i)
        fg.set_segments(has, values)
        launch(
            _sgd_kernel, (fg.n_blocks,),
            fg.flat_param, fg.flat_grad, mom, fg.blk_table, fg.seg_table,
            lr, wd, momentum, float(buf_scale), float(grad_scale),
            HAS_WD=wd != 0.0, HAS_MOMENTUM=has_mom, NESTEROV=nesterov, PER_SEG=values is not None,
            BLOCK=fg.block, num_warps=4,
        )


class Adam(_FusedOptimizer):
    """torch.optim.Adam semantics (weight decay as L2 added to the gradient), fused."""

    _state_keys = ("exp_avg", "exp_avg_sq")
    _has_step = True
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid betas: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _step_group(self, group, fg, has):
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        wd = float(group["weight_decay"])
        m = fg.buffer("exp_avg")
        v = fg.buffer("exp_avg_sq")
        per = []
        for i, p in enumerate(fg.params):
            if has[i]:
                st = self.state[p]
                if "exp_avg" not in st:  # lazy state init, like torch
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    st["exp_avg"] = fg.param_view(m, i)
                    st["exp_avg_sq"] = fg.param_view(v, i)
                fg.steps[i] += 1
                st["step"].fill_(float(fg.steps[i]))
            t = fg.steps[i]
            if t > 0:
                per.append((lr / (1.0 - beta1 ** t), math.sqrt(1.0 - beta2 ** t)))
            else:
                per.append((0.0, 1.0))
        used = {per[i] for i in range(len(per)) if has[i]}
        values = None
        if len(used) == 1:
            step_size, bc2_sqrt = used.pop()
        else:
            step_size, bc2_sqrt = 0.0, 1.0
            values = per
        fg.set_segments(has, values)
        launch(
            _adam_kernel, (fg.n_blocks,),
            fg.flat_param, fg.flat_grad, m, v, fg.blk_table, fg.seg_table,
            wd, 1.0 - lr * wd, 1.0 - beta1, beta2, 1.0 - beta2, eps, float(step_size), float(bc2_sqrt),
            HAS_WD=wd != 0.0, DECOUPLED=self._decoupled, PER_SEG=values is not None,
            BLOCK=fg.block, num_warps=4,
        )


class AdamW(Adam):
    """torch.optim.AdamW semantics (decoupled weight decay: p *= 1 - lr * wd), fused."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
