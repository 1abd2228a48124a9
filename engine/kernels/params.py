"""Where the fused optimizer keeps a parameter group, and what layers read from it.

`FlatGroup` is one optimizer param group laid out flat, in parameter order:
- `flat_param` fp32: the master weights. Every parameter is re-pointed into it
  (`p.data = view`, values kept), so `state_dict()` keys, shapes and values are
  PyTorch's and weights move between backends unchanged.
- gradients are read where autograd left them: `grad_table` (int64 [n]) holds each
  parameter's gradient address and the kernel loads through it, so the optimizer
  gathers nothing. A layer that claims its parameter's slot in `flat_grad`
  (`claim_grad_slot` in the forward, `slot_view` in the backward) writes its
  weight gradient straight into the flat buffer; then the address never changes
  and the table is uploaded once. Gradients in another dtype or layout are
  copied into the slot (the only gather left).
- packed copies: a layer that wants a weight in another layout and dtype (a
  bf16 `[kh, kw, in, out]` conv operand, a bf16 linear weight) asks with
  `request_packed(p, Packing(perm, dtype))` before the optimizer is built; the
  optimizer kernel then writes that copy next to the fp32 master at every step
  (one flat buffer per group), and `packed(p, packing)` hands it to the layer, so
  no step repacks or casts a weight. Each copy starts 128-byte aligned (vector
  loads, TMA descriptors). A copy goes stale only when `p` is changed
  in place outside the optimizer (`load_state_dict`, init): `packed` sees it in
  `p._version` and refreshes it with one copy.
- tables the kernel reads per block / per parameter (block table, has-grad and
  per-parameter values, an int64 row per parameter: start, size, step offset,
  packed-copy layouts). They are uploaded only when they change, from pinned
  memory and without a sync; during a CUDA-graph capture uploads are queued and
  `flush_uploads()` does them after the capture, before the first replay; a
  captured step gets tables of its own (`tables_for_capture`), which nothing
  uploads to afterwards. `load_grad` and `store_packed` are the kernel side of
  this layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine import device

MAX_PACKS = 2  # packed copies per parameter (e.g. a conv's forward and dgrad operand layouts)
PACK_ALIGN = 128  # bytes: where each packed copy starts in the packed buffer
SEG_COLS = 4 + 8 * MAX_PACKS  # int64 row: start, numel, step offset, n packs, then per pack base, d1..d3, s0..s3

_pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # uploads queued during a CUDA-graph capture


@dataclass(frozen=True)
class Packing:
    """A copy `p.permute(perm).contiguous().to(dtype)` the optimizer keeps next to p (rank <= 4)."""

    perm: tuple[int, ...]
    dtype: torch.dtype


def request_packed(p: torch.Tensor, packing: Packing) -> None:
    """Ask the optimizer built after this call to keep `packing` of `p` up to date."""
    if sorted(packing.perm) != list(range(p.dim())) or p.dim() > 4:
        raise ValueError(f"packing {packing.perm} is not a permutation of a rank-{p.dim()} (<= 4) parameter")
    wanted = getattr(p, "_fusenet_packings", [])
    if packing not in wanted:
        p._fusenet_packings = [*wanted, packing]


def packed(p: torch.Tensor, packing: Packing) -> torch.Tensor | None:
    """The optimizer-maintained `packing` of p (refreshed first if p changed in place), or None."""
    home = getattr(p, "_fusenet_flat", None)
    return None if home is None else home[0].packed_view(home[1], packing)


def claim_grad_slot(p: torch.Tensor) -> tuple | None:
    """In a forward: the right to write p's gradient into its flat slot in the backward, once per
    optimizer step (a parameter used twice in one graph must not have two writers)."""
    home = getattr(p, "_fusenet_flat", None)
    if home is None or not (torch.is_grad_enabled() and p.requires_grad):
        return None
    group, i = home
    if i in group.claimed or not group.owns(i):
        return None
    group.claimed.add(i)
    return home


def slot_view(claim: tuple | None) -> torch.Tensor | None:
    """In the backward: a fresh view of the claimed slot to write the gradient into, or None
    (no claim, or p.grad already holds a gradient that this one must be added to)."""
    if claim is None:
        return None
    group, i = claim
    if group.params[i].grad is not None:
        return None
    return group.param_view(group.flat_grad, i)


def slot_region(claims: list, sizes: list[int]) -> torch.Tensor | None:
    """One flat fp32 `[sum(sizes)]` region over the claimed slots of parameters stored back to
    back (a weight and its bias), for a kernel that writes their gradients in one piece; None
    unless every slot is free and they are adjacent."""
    if len(claims) != len(sizes):
        raise ValueError(f"slot_region: {len(claims)} claims but {len(sizes)} sizes")
    views = [slot_view(c) for c in claims]
    if not views or any(v is None or v.numel() != n for v, n in zip(views, sizes)):
        return None
    for a, b, n in zip(views, views[1:], sizes):
        if a.untyped_storage()._cdata != b.untyped_storage()._cdata or b.storage_offset() != a.storage_offset() + n:
            return None
    return views[0].view(-1).as_strided((sum(sizes),), (1,))


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return device.DEVICE.type == "cuda" and torch.cuda.is_current_stream_capturing()


def upload(dst: torch.Tensor, values, dtype: torch.dtype) -> None:
    """dst <- values (host numbers): pinned and asynchronous on CUDA, queued while a graph is captured."""
    src = torch.tensor(values, dtype=dtype).reshape(dst.shape)
    if dst.device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():  # no host allocation, no copy inside a capture
            _pending.append((dst, src))
            return
        src = src.pin_memory()
    dst.copy_(src, non_blocking=True)


def discard_uploads() -> None:
    """Forget the uploads queued by a capture that failed."""
    _pending.clear()


def flush_uploads() -> None:
    """Do the uploads queued during a CUDA-graph capture (call after the capture, before replaying)."""
    while _pending:
        dst, src = _pending.pop(0)
        dst.copy_(src.pin_memory(), non_blocking=True)


# ----------------------------------------------------------------------------
# the device side of the layout (the optimizer kernels' helpers)
# ----------------------------------------------------------------------------
@triton.jit
def load_grad(gtab_ptr, seg, seg_start, offs, mask):
    """[BLOCK] fp32 gradient of parameter `seg`, read through its address in the grad table."""
    gp = tl.load(gtab_ptr + seg).to(tl.pointer_type(tl.float32))  # int64 address -> fp32 pointer
    return tl.load(gp + (offs - seg_start), mask=mask, other=0.0)


@triton.jit
def _to_packed_dtype(p, pk_ptr):
    """p ([BLOCK] fp32) in the packed buffer's dtype, rounded to nearest even as torch's cast
    does. bf16 is rounded by hand: Triton's interpreter truncates, and a copy the host
    refreshes (torch) must equal the one the kernel writes, or a resumed run would drift."""
    if pk_ptr.dtype.element_ty == tl.bfloat16:
        bits = p.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF  # [BLOCK] fp32 bit patterns
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # [BLOCK] top 16 bits, rounded
        r = tl.where(p != p, 0x7FC0, r & 0xFFFF)  # a NaN stays a NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return p.to(pk_ptr.dtype.element_ty)


@triton.jit
def store_packed(p, pk_ptr, row_ptr, i, mask, MAX_PACKS: tl.constexpr, WIDE: tl.constexpr):
    """Write p ([BLOCK] fp32 values at flat indices i of one parameter) into its packed copies:
    row_ptr -> (n packs, then per pack base, d1, d2, d3, s0..s3); the destination of i is
    base + sum_k coord_k(i) * s_k (a permuted layout), in the packed buffer's dtype. WIDE: a packed
    parameter has 2**31 elements or more; else the coordinates are 32-bit division (a 64-bit one
    is a called subroutine, about 4x the instructions)."""
    n = tl.load(row_ptr)
    v = _to_packed_dtype(p, pk_ptr)  # [BLOCK] packed dtype
    if not WIDE:
        i = i.to(tl.int32)
    for k in tl.static_range(MAX_PACKS):
        if k < n:
            r = row_ptr + 1 + k * 8
            d1, d2, d3 = tl.load(r + 1).to(i.dtype), tl.load(r + 2).to(i.dtype), tl.load(r + 3).to(i.dtype)
            rest = i // d3
            i2, rest = rest % d2, rest // d2
            dst = tl.load(r) + (i % d3) * tl.load(r + 7) + i2 * tl.load(r + 6) + (rest % d1) * tl.load(r + 5) \
                + (rest // d1) * tl.load(r + 4)  # [BLOCK] int64
            tl.store(pk_ptr + dst, v, mask=mask)



def _block_size() -> int:
    return 1 << 16 if device.INTERPRETED else 2048


def _pack_row(shape: tuple[int, ...], perm: tuple[int, ...], base: int) -> list[int]:
    """(base, d1, d2, d3, s0, s1, s2, s3): p's shape padded to 4-D and each p dim's stride in the packed copy."""
    q_shape = [shape[j] for j in perm]
    q_strides = [math.prod(q_shape[j + 1:]) for j in range(len(q_shape))]
    strides = [0] * len(shape)
    for j, k in enumerate(perm):
        strides[k] = q_strides[j]
    pad = 4 - len(shape)
    dims, strides = [1] * pad + list(shape), [0] * pad + strides
    return [base, dims[1], dims[2], dims[3], *strides]


class FlatGroup:
    """One param group's flat buffers and the tables its optimizer kernel reads (module docstring)."""

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
        self.params, self.device = list(params), dev
        self.shapes = [tuple(p.shape) for p in params]
        self.numels = [p.numel() for p in params]
        self.offsets = [sum(self.numels[:i]) for i in range(len(params))]
        self.total = sum(self.numels)
        self.flat_param = torch.empty((max(self.total, 1),), device=dev, dtype=torch.float32)
        self.flat_grad = torch.zeros((max(self.total, 1),), device=dev, dtype=torch.float32)
        with torch.no_grad():
            for i, p in enumerate(params):
                view = self.param_view(self.flat_param, i)
                view.copy_(p.detach())
                p.data = view
                p._fusenet_flat = (self, i)
        self.bufs: dict[str, torch.Tensor] = {}
        self.steps = [0] * len(params)  # host step counts (Adam)
        self.claimed: set[int] = set()  # slots a forward claimed since the last step
        self.last_has = [False] * len(params)  # the has-grad flags of the last step
        self.block = _block_size()
        rows = [(a + b0, a + n, i) for i, (a, n) in enumerate(zip(self.offsets, self.numels))
                for b0 in range(0, n, self.block)]
        self.n_blocks = len(rows)
        self.blk_table = torch.tensor(rows or [(0, 0, 0)], dtype=torch.int64).to(dev)  # [blocks, 3]
        self.seg_table = torch.zeros((len(params), 3), device=dev, dtype=torch.float32)  # has, v1, v2
        self.grad_table = torch.zeros((len(params),), device=dev, dtype=torch.int64)  # gradient addresses
        self._seg_key, self._grad_key = None, None
        self._setup_packs()

    # -- layout ----------------------------------------------------------------
    def param_view(self, buf: torch.Tensor, i: int) -> torch.Tensor:
        a, n = self.offsets[i], self.numels[i]
        return buf[a:a + n].view(self.shapes[i])

    def owns(self, i: int) -> bool:
        """Whether parameter i still is its view of flat_param (not re-assigned since the last step)."""
        p = self.params[i]
        return (p.untyped_storage()._cdata == self.flat_param.untyped_storage()._cdata
                and p.storage_offset() == self.offsets[i] and p.is_contiguous())

    def buffer(self, name: str) -> torch.Tensor:
        if name not in self.bufs:
            if capturing():
                raise RuntimeError(f"optimizer state '{name}' must exist before a CUDA graph is captured "
                                   "(run a step eagerly first)")
            self.bufs[name] = torch.zeros((max(self.total, 1),), device=self.device, dtype=torch.float32)
        return self.bufs[name]

    def _setup_packs(self) -> None:
        """The packed-copy buffer and the int64 per-parameter rows the kernel reads."""
        self.packings = [list(getattr(p, "_fusenet_packings", []))[:MAX_PACKS] for p in self.params]
        dtypes = {k.dtype for ks in self.packings for k in ks}
        if len(dtypes) > 1:
            raise ValueError(f"packed copies of one parameter group must share a dtype, got {sorted(map(str, dtypes))}")
        self.pack_dtype = dtypes.pop() if dtypes else None
        self.pack_base: dict[tuple[int, Packing], int] = {}
        # every copy starts PACK_ALIGN bytes aligned: kernels read them with 16-byte vector loads
        # and TMA descriptors, which need an aligned base (Triton specializes aligned pointers)
        unit = PACK_ALIGN // torch.empty((), dtype=self.pack_dtype).element_size() if self.pack_dtype else 1
        rows, used = [], 0
        for i, ks in enumerate(self.packings):
            row = [self.offsets[i], self.numels[i], 0, len(ks)]
            for k in ks:
                self.pack_base[(i, k)] = used
                row += _pack_row(self.shapes[i], k.perm, used)
                used += -(-self.numels[i] // unit) * unit
            rows.append(row + [0] * (SEG_COLS - len(row)))
        self.int_rows = rows
        self.pack_wide = any(self.numels[i] >= 2 ** 31 for i, ks in enumerate(self.packings) if ks)
        self.int_table = torch.tensor(rows, dtype=torch.int64).to(self.device)  # [n, SEG_COLS]
        self.packed_buf = (torch.empty((max(used, 1),), device=self.device, dtype=self.pack_dtype)
                           if self.pack_dtype is not None else None)
        self.pack_versions: dict[tuple[int, Packing], int] = {}
        for i, k in self.pack_base:
            self._refresh(i, k)

    def _packed(self, i: int, k: Packing) -> torch.Tensor:
        base, shape = self.pack_base[(i, k)], self.shapes[i]
        return self.packed_buf[base:base + self.numels[i]].view([shape[j] for j in k.perm])

    def _refresh(self, i: int, k: Packing) -> None:
        with torch.no_grad():
            self._packed(i, k).copy_(self.params[i].detach().permute(k.perm))
        self.pack_versions[(i, k)] = self.params[i]._version

    def packed_view(self, i: int, k: Packing) -> torch.Tensor | None:
        if (i, k) not in self.pack_base or not self.owns(i):
            return None
        if self.params[i]._version != self.pack_versions[(i, k)]:
            self._refresh(i, k)
        return self._packed(i, k)

    def refresh_packed(self) -> None:
        """Refresh every packed copy whose parameter changed in place (what `packed` does lazily;
        a replayed CUDA graph cannot, so the step calls this before replaying)."""
        for i, k in self.pack_base:
            if self.owns(i) and self.params[i]._version != self.pack_versions[(i, k)]:
                self._refresh(i, k)

    # -- per step --------------------------------------------------------------
    def tables_for_capture(self) -> None:
        """Inside a CUDA-graph capture: give this graph tables of its own (allocated now, filled by
        the uploads queued for after the capture), so what it reads at every replay cannot be
        changed by a later eager step or another graph (the bench captures one per input slot)."""
        self.grad_table, self._grad_key = torch.empty_like(self.grad_table), None
        self.seg_table, self._seg_key = torch.empty_like(self.seg_table), None
        self.int_table = torch.empty_like(self.int_table)
        upload(self.int_table, self.int_rows, torch.int64)

    def sync_params(self) -> None:
        """Re-point parameters whose .data was replaced since the last step."""
        for i, p in enumerate(self.params):
            if self.owns(i) and tuple(p.shape) == self.shapes[i]:
                continue
            if tuple(p.shape) != self.shapes[i]:
                raise ValueError(f"parameter {i} changed shape from {self.shapes[i]} to {tuple(p.shape)}")
            if p.dtype != torch.float32 or p.device != self.device:
                raise ValueError(f"parameter {i} moved to {p.dtype} on {p.device}; rebuild the optimizer")
            view = self.param_view(self.flat_param, i)
            with torch.no_grad():
                view.copy_(p.detach())
            p.data = view
            for k in self.packings[i]:
                self._refresh(i, k)

    def point_at_grads(self) -> list[bool]:
        """Point the grad table at every available gradient (copying only those in another dtype or
        layout into their slot); returns the has-grad flags."""
        has, ptrs = [], []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                has.append(False)
                ptrs.append(0)
                continue
            if g.is_sparse:
                raise ValueError("fused optimizers do not support sparse gradients")
            if g.dtype != torch.float32 or not g.is_contiguous() or g.device != self.device:
                slot = self.param_view(self.flat_grad, i)
                slot.copy_(g)
                g = slot
            has.append(True)
            ptrs.append(g.data_ptr())
        key = tuple(ptrs)
        if key != self._grad_key:
            upload(self.grad_table, ptrs, torch.int64)
            self._grad_key = key
        return has

    def indirect_bytes(self) -> int:
        """Bytes of the gradients the last step read through the address table (not kernel arguments)."""
        return sum(4 * n for h, n in zip(self.last_has, self.numels) if h)

    def set_segments(self, has: list[bool], values: list[tuple[float, float]] | None,
                     step_offsets: list[int] | None = None) -> None:
        """Upload the per-segment tables: has-grad flags, per-segment values and Adam step offsets, if changed."""
        key = (tuple(has), None if values is None else tuple(values))
        if key != self._seg_key:
            rows = [(1.0 if h else 0.0, *(values[i] if values is not None else (0.0, 0.0))) for i, h in enumerate(has)]
            upload(self.seg_table, rows, torch.float32)
            self._seg_key = key
        if step_offsets is not None and [r[2] for r in self.int_rows] != list(step_offsets):
            for row, off in zip(self.int_rows, step_offsets):
                row[2] = int(off)
            upload(self.int_table, self.int_rows, torch.int64)
