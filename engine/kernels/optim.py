"""Fused multi-tensor optimizers: one Triton launch per step per parameter group.

Storage is engine.kernels.params.FlatGroup: every parameter of a group is
re-pointed into one flat fp32 buffer (values kept), the optimizer state
(momentum, exp_avg, exp_avg_sq) lives in flat buffers of the same layout, and
gradients are read where autograd left them through a table of addresses (or
from the flat gradient slot a layer wrote them into): no gather copies. One
kernel runs over a block table: each program owns one block of one parameter,
so a program never straddles two parameters and can look up that parameter's
values. After the update the kernel also writes the parameter's packed
low-precision copies (params.Packing) that layers asked for, so no step
repacks or casts a weight.

Parameters whose `.grad` is None are skipped exactly as in torch.optim: no
update, no weight decay, no state change (a per-segment has-grad flag).

Hyperparameters are runtime kernel scalars, never constexprs, so schedules
never recompile. Two ways to get the learning rate:
- eager (default): read from `group["lr"]` at every step, with the step-dependent
  values (bias corrections, momentum's first-step scales) computed on the host,
  so `torch.optim.lr_scheduler` works; parameters at different step counts get
  them per segment from a small table (`PER_SEG`);
- device (`attach_clock`, what the training step uses): the kernel reads
  `lr = lr_table[STEP - 1]` and Adam's step count `t = STEP - offset` from the
  step clock (engine.kernels.clock), so a step captured in a CUDA graph replays
  with fresh values and the host computes nothing per step. The host's step
  counts (the `step` of Adam's state dict) are then advanced by `note_step()`,
  once per executed step, outside any capture.

`state[p]` holds torch-compatible entries (`momentum_buffer`; `step`, `exp_avg`,
`exp_avg_sq`) that are views into the flat buffers, so `state_dict()` saves them
and `load_state_dict()` copies loaded values back into the flat buffers.
Checkpoints interchange with torch.optim.SGD / Adam / AdamW.

Caveat: a parameter must stay a view of the flat buffer; if `p.data` is
replaced (e.g. `model.to(...)` after building the optimizer) the next step
detects it, copies the new value into the flat buffer and re-points the parameter.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from engine.kernels.launch import launch
from engine.kernels.params import MAX_PACKS, SEG_COLS, FlatGroup, capturing, load_grad, store_packed


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------
@triton.jit
def _sgd_kernel(
    param_ptr, gtab_ptr, mom_ptr, pk_ptr, blk_ptr, seg_ptr, int_ptr, lr_ptr, counters_ptr,
    lr, weight_decay, momentum, buf_scale, grad_scale, lr_len,
    HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, PER_SEG: tl.constexpr,
    DEVICE_LR: tl.constexpr, PACK: tl.constexpr, PACK_WIDE: tl.constexpr, SEG_COLS: tl.constexpr,
    MAX_PACKS: tl.constexpr,
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
        if DEVICE_LR:
            lr = tl.load(lr_ptr + tl.minimum(tl.load(counters_ptr + 1) - 1, lr_len - 1))  # by global step
        seg_start = tl.load(int_ptr + seg * SEG_COLS)  # int64
        offs = start + tl.arange(0, BLOCK)  # [BLOCK] flat indices
        mask = offs < end
        p = tl.load(param_ptr + offs, mask=mask, other=0.0)  # [BLOCK] fp32
        g = load_grad(gtab_ptr, seg, seg_start, offs, mask)  # [BLOCK] fp32
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
        p = p - lr * g
        tl.store(param_ptr + offs, p, mask=mask)
        if PACK:
            store_packed(p, pk_ptr, int_ptr + seg * SEG_COLS + 3, offs - seg_start, mask, MAX_PACKS, PACK_WIDE)


@triton.jit
def _adam_kernel(
    param_ptr, gtab_ptr, m_ptr, v_ptr, pk_ptr, blk_ptr, seg_ptr, int_ptr, lr_ptr, counters_ptr,
    weight_decay, decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, log_beta1, log_beta2,
    lr_len,
    HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, PER_SEG: tl.constexpr, DEVICE_LR: tl.constexpr,
    PACK: tl.constexpr, PACK_WIDE: tl.constexpr, SEG_COLS: tl.constexpr, MAX_PACKS: tl.constexpr, BLOCK: tl.constexpr,
):
    """torch.optim.Adam (L2 into the grad) or AdamW (DECOUPLED: p *= 1 - lr*wd) on one block.

    Eager: step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t) (host double math).
    DEVICE_LR: lr from the table and t = STEP - offset[seg], the same formulas in fp32.
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
        if DEVICE_LR:
            now = tl.load(counters_ptr + 1)  # int64 steps begun, this one included
            lr = tl.load(lr_ptr + tl.minimum(now - 1, lr_len - 1))  # past the table: its last rate
            t = (now - tl.load(int_ptr + seg * SEG_COLS + 2)).to(tl.float32)  # this parameter's step count
            step_size = lr / (1.0 - tl.exp(t * log_beta1))
            bc2_sqrt = tl.sqrt(1.0 - tl.exp(t * log_beta2))
            decay = 1.0 - lr * weight_decay
        seg_start = tl.load(int_ptr + seg * SEG_COLS)  # int64
        offs = start + tl.arange(0, BLOCK)  # [BLOCK] flat indices
        mask = offs < end
        p = tl.load(param_ptr + offs, mask=mask, other=0.0)  # [BLOCK] fp32
        g = load_grad(gtab_ptr, seg, seg_start, offs, mask)  # [BLOCK] fp32
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
        if PACK:
            store_packed(p, pk_ptr, int_ptr + seg * SEG_COLS + 3, offs - seg_start, mask, MAX_PACKS, PACK_WIDE)


# ----------------------------------------------------------------------------
# optimizers
# ----------------------------------------------------------------------------
class _FusedOptimizer(torch.optim.Optimizer):
    """Base: flat storage per group, device schedule, state_dict round trip."""

    _state_keys: tuple[str, ...] = ()  # flat-buffer-backed per-param state entries
    _has_step = False

    def __init__(self, params, defaults):
        self._flat: list[FlatGroup] = []
        self._device: tuple | None = None  # (counters, lr_table) once attach_clock was called
        self._host_step = 0  # device mode: the global step index of the next step
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._flat.append(FlatGroup(self.param_groups[-1]["params"]))

    def _group_state_keys(self, group: dict) -> tuple[str, ...]:
        return self._state_keys

    # -- device schedule -------------------------------------------------------
    def attach_clock(self, counters: torch.Tensor, lr_table: torch.Tensor, step: int) -> None:
        """Read the learning rate (`lr_table[STEP - 1]`, fp32 by global step; its last entry past
        its end) and the step count from the step clock's `counters` (engine.kernels.clock) from
        now on; `step` is the clock's STEP now. `group["lr"]` is then ignored."""
        if lr_table.dtype != torch.float32 or lr_table.dim() != 1:
            raise ValueError("lr_table must be a 1-D fp32 tensor (one learning rate per global step)")
        self._device, self._host_step = (counters, lr_table), int(step)

    def _lr_len(self) -> int:
        return self._device[1].numel() if self._device is not None else 0

    def note_step(self) -> None:
        """Device mode: advance the host's step counts for one executed step (eager or replayed)."""
        self._host_step += 1
        for fg in self._flat:
            for i, h in enumerate(fg.last_has):
                fg.steps[i] += int(h)

    def refresh_packed(self) -> None:
        """Refresh packed copies of parameters changed in place (before replaying a captured step)."""
        for fg in self._flat:
            fg.refresh_packed()

    def _kernel_common(self, fg: FlatGroup) -> tuple[tuple, dict]:
        """(pointer args after the state buffers, constexprs) shared by both kernels (whose last
        scalar is the length of the learning-rate table)."""
        counters, lr_table = self._device if self._device is not None else (None, None)
        ptrs = (fg.packed_buf, fg.blk_table, fg.seg_table, fg.int_table, lr_table, counters)
        # packed copies: each element's destination in two permuted layouts is int64 index math;
        # at 16 elements a thread (4 warps) the SGD kernel spilled 216 B on sm_90, 8 warps halve it
        pack = fg.packed_buf is not None
        meta = dict(DEVICE_LR=self._device is not None, PACK=pack, PACK_WIDE=pack and fg.pack_wide, SEG_COLS=SEG_COLS,
                    MAX_PACKS=MAX_PACKS, BLOCK=fg.block, num_warps=8 if pack else 4)
        return ptrs, meta

    # -- checkpoints ---------------------------------------------------------
    def state_dict(self) -> dict:
        if self._has_step:  # device mode counts on the host lazily: bring the saved `step`s up to date
            for fg in self._flat:
                for i, p in enumerate(fg.params):
                    st = self.state.get(p)
                    if st and "step" in st:
                        st["step"].fill_(float(fg.steps[i]))
        return super().state_dict()

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
        in_capture = capturing()
        for group, fg in zip(self.param_groups, self._flat):
            if in_capture:
                fg.tables_for_capture()
            fg.sync_params()
            has = fg.point_at_grads()
            fg.last_has, fg.claimed = has, set()
            if not any(has) or fg.n_blocks == 0:
                continue
            self._step_group(group, fg, has)
        return loss

    def _step_group(self, group: dict, fg: FlatGroup, has: list[bool]) -> None:
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
        momentum, dampening = float(group["momentum"]), float(group["dampening"])
        wd = float(group["weight_decay"])
        has_mom = momentum != 0.0
        values = None
        buf_scale, grad_scale = momentum, 1.0 - dampening
        mom = fg.buffer("momentum_buffer") if has_mom else fg.flat_param
        if has_mom:
            started = [p in self.state and self.state[p].get("momentum_buffer") is not None for p in fg.params]
            per = [(momentum, 1.0 - dampening) if s else (0.0, 1.0) for s in started]
            used = {per[i] for i in range(len(per)) if has[i]}
            if len(used) == 1:
                buf_scale, grad_scale = used.pop()
            else:
                values = per
            for i, p in enumerate(fg.params):
                if has[i] and not started[i]:
                    self.state[p]["momentum_buffer"] = fg.param_view(mom, i)
        fg.set_segments(has, values)
        ptrs, meta = self._kernel_common(fg)
        launch(
            _sgd_kernel, (fg.n_blocks,),
            fg.flat_param, fg.grad_table, mom, *ptrs,
            float(group["lr"]), wd, momentum, float(buf_scale), float(grad_scale), self._lr_len(),
            HAS_WD=wd != 0.0, HAS_MOMENTUM=has_mom, NESTEROV=bool(group["nesterov"]), PER_SEG=values is not None,
            **meta,
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
        wd = float(group["weight_decay"])
        m, v = fg.buffer("exp_avg"), fg.buffer("exp_avg_sq")
        eager = self._device is None
        per = []
        for i, p in enumerate(fg.params):
            if has[i]:
                st = self.state[p]
                if "exp_avg" not in st:  # lazy state init, like torch
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    st["exp_avg"] = fg.param_view(m, i)
                    st["exp_avg_sq"] = fg.param_view(v, i)
                if eager:
                    fg.steps[i] += 1
                    st["step"].fill_(float(fg.steps[i]))
            t = fg.steps[i]
            per.append((lr / (1.0 - beta1 ** t), math.sqrt(1.0 - beta2 ** t)) if t > 0 else (0.0, 1.0))
        values = None
        step_size, bc2_sqrt = 0.0, 1.0
        if eager:
            used = {per[i] for i in range(len(per)) if has[i]}
            if len(used) == 1:
                step_size, bc2_sqrt = used.pop()
            else:
                values = per
        # device mode: t = STEP - offset with STEP = host step + 1 during this step's update
        offsets = None if eager else [self._host_step - s for s in fg.steps]
        fg.set_segments(has, values, offsets)
        ptrs, meta = self._kernel_common(fg)
        log_b = [math.log(b) if b > 0 else float("-inf") for b in (beta1, beta2)]
        launch(
            _adam_kernel, (fg.n_blocks,),
            fg.flat_param, fg.grad_table, m, v, *ptrs,
            wd, 1.0 - lr * wd, 1.0 - beta1, beta2, 1.0 - beta2, float(group["eps"]), float(step_size),
            float(bc2_sqrt), *log_b, self._lr_len(),
            HAS_WD=wd != 0.0, DECOUPLED=self._decoupled, PER_SEG=values is not None, **meta,
        )


class AdamW(Adam):
    """torch.optim.AdamW semantics (decoupled weight decay: p *= 1 - lr * wd), fused."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
