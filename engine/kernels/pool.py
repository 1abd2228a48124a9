"""Pooling kernels on NHWC activations, forward and backward.

Ops (all tensors NHWC contiguous, compute dtype fp32/fp16/bf16, fp32 math):

* max pool 2-D -- `max_pool2d(x, kernel_size, stride=None, padding=0)`.
  Dilation 1, floor mode, implicit -inf padding (`padding <= kernel // 2`, as
  PyTorch requires). The forward saves, per output element, the int32 *tap
  index* `i * KW + j` of the winning window position. Ties go to the first
  maximum in window scan order (row-major over taps), and a NaN wins over
  anything (the last NaN in scan order), which is exactly PyTorch's CPU rule,
  so gradients match `F.max_pool2d` bit-for-bit in where they are routed.
  The backward is a gather: each program owns input pixels and, for every tap
  `(i, j)`, looks at the one output window that would read this pixel through
  that tap, adding its upstream gradient if the saved tap equals `(i, j)`.
  Overlapping windows (k=3 s=2, k=3 s=1, ...) need nothing special; no atomics.
* average pool 2-D -- `avg_pool2d(x, kernel_size, stride=None, padding=0,
  count_include_pad=True)`. Floor mode; the divisor is PyTorch's (window
  clipped to the padded input when counting padding, to the real input when
  not). Backward is the same tap gather with `dy / divisor`.
* global average / max pool -- `global_avg_pool(x)`, `global_max_pool(x)`:
  `[N, H, W, C] -> [N, C]`. The reduction over H*W is split into chunks of
  rows when H*W is large: each (n, channel block, chunk) program writes an fp32
  partial (and for max the flat hw index of its first maximum), and a second
  kernel folds the partials in chunk order, so results are deterministic.
  `chunk=` (rows per split) overrides the automatic choice (one program per
  (n, channel block) under the interpreter, 4096 rows per chunk on a GPU).
  Max routes the gradient to the first maximal position (`F.adaptive_max_pool2d
  (x, 1)` does the same; `amax` would split it among ties). With NaNs the output
  is NaN and the gradient goes to the first NaN (PyTorch: the last one).

Host launchers (`*_forward`, `*_backward`) validate, allocate and launch through
`engine.kernels.launch.launch`; one `torch.autograd.Function` per op. Tiles are
[pixels, channels] (channels contiguous): fat ones under the interpreter, about
1024 elements on a GPU. Index math is int32 on a GPU unless a tensor has more
than 2**31 - 1 elements (`IDX64`), and always int64 under the interpreter,
which checks every int32 add/mul for overflow and is much slower with them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine import device as _device
from engine.kernels.launch import launch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------
# host helpers
# ----------------------------------------------------------------------------
def _pair(v, what: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    try:
        a, b = (int(t) for t in v)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an int or a pair of ints, got {v!r}") from None
    return a, b


def _check_act(x: torch.Tensor, name: str = "x", ndim: int = 4) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D ({'NHWC' if ndim == 4 else 'NC'}), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name} must be fp32, fp16 or bf16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (NHWC), got strides {x.stride()}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def _tiles(P: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) for a [pixels, channels] tile."""
    if _device.INTERPRETED:
        # Few, fat programs: the interpreter pays per program and per op.
        block_c = min(_np2(C), 512)
        block_p = min(max(1, 16384 // block_c), _np2(P))
        return block_p, block_c, 4
    block_c = min(_np2(C), 64)
    block_p = max(16, 1024 // block_c)
    return block_p, block_c, 4


def _idx64(*tensors: torch.Tensor) -> bool:
    """64-bit index math when offsets could overflow int32. Always under the interpreter: it checks
    every int32 add/mul for overflow (slow) but not int64 ones, so int64 is ~2x faster there."""
    return _device.INTERPRETED or any(t.numel() > _INT32_MAX for t in tensors)


def _pool_geometry(H, W, kernel_size, stride, padding):
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(stride if stride is not None else (kh, kw), "stride")
    ph, pw = _pair(padding, "padding")
    if kh < 1 or kw < 1 or sh < 1 or sw < 1:
        raise ValueError(f"kernel_size and stride must be positive, got {(kh, kw)} and {(sh, sw)}")
    if ph < 0 or pw < 0 or 2 * ph > kh or 2 * pw > kw:
        raise ValueError(f"padding must be between 0 and kernel_size // 2, got {(ph, pw)} for kernel {(kh, kw)}")
    if H + 2 * ph < kh or W + 2 * pw < kw:
        raise ValueError(f"input {H}x{W} (padding {(ph, pw)}) is smaller than the kernel {(kh, kw)}")
    oh = (H + 2 * ph - kh) // sh + 1
    ow = (W + 2 * pw - kw) // sw + 1
    return (kh, kw), (sh, sw), (ph, pw), (oh, ow)


# ----------------------------------------------------------------------------
# max / avg pool 2-D kernels
# ----------------------------------------------------------------------------
@triton.jit
def _pixel_tile(pid_p, pid_c, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr):
    if IDX64:
        pid_p = pid_p.to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] flat pixel (n, h, w)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] channel
    return offs_p, offs_c, offs_p < P, offs_c < C


@triton.jit
def _pixel_nhw(offs_p, H, W):
    """Flat NHWC pixel indices [BLOCK_P] -> (image, row, column), each [BLOCK_P]."""
    t = offs_p // W
    return t // H, t % H, offs_p % W


@triton.jit
def _max_pool_fwd_kernel(
    x_ptr, y_ptr, idx_ptr,  # x [N,H,W,C]; y, idx [N,OH,OW,C]
    P, C, H, W, OH, OW,  # P = N*OH*OW output pixels
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    offs_p, offs_c, mask_p, mask_c = _pixel_tile(tl.program_id(0), tl.program_id(1), P, C, BLOCK_P, BLOCK_C, IDX64)
    n, oh, ow = _pixel_nhw(offs_p, OH, OW)  # [BLOCK_P] each
    best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)  # [BLOCK_P, BLOCK_C] running max
    arg = tl.full([BLOCK_P, BLOCK_C], -1, tl.int32)  # [BLOCK_P, BLOCK_C] winning tap, -1 = none yet
    for i in tl.static_range(KH):
        ih = oh * SH - PH + i  # [BLOCK_P]
        vh = mask_p & (ih >= 0) & (ih < H)
        for j in tl.static_range(KW):
            iw = ow * SW - PW + j  # [BLOCK_P]
            v = vh & (iw >= 0) & (iw < W)  # [BLOCK_P] tap inside the real input
            base = ((n * H + ih) * W + iw) * C  # [BLOCK_P]
            m2 = v[:, None] & mask_c[None, :]  # [BLOCK_P, BLOCK_C]
            xv = tl.load(x_ptr + base[:, None] + offs_c[None, :], mask=m2, other=float("-inf")).to(tl.float32)
            # PyTorch's rule: the first valid tap, then strictly greater, and any NaN.
            take = m2 & ((xv > best) | (xv != xv) | (arg < 0))  # [BLOCK_P, BLOCK_C]
            best = tl.where(take, xv, best)
            arg = tl.where(take, i * KW + j, arg)
    out = (offs_p * C)[:, None] + offs_c[None, :]  # [BLOCK_P, BLOCK_C]
    m_out = mask_p[:, None] & mask_c[None, :]
    tl.store(y_ptr + out, best.to(y_ptr.dtype.element_ty), mask=m_out)
    tl.store(idx_ptr + out, arg, mask=m_out)


@triton.jit
def _max_pool_bwd_kernel(
    dy_ptr, idx_ptr, dx_ptr,  # dy, idx [N,OH,OW,C]; dx [N,H,W,C]
    P, C, H, W, OH, OW,  # P = N*H*W input pixels
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    offs_p, offs_c, mask_p, mask_c = _pixel_tile(tl.program_id(0), tl.program_id(1), P, C, BLOCK_P, BLOCK_C, IDX64)
    n, ih, iw = _pixel_nhw(offs_p, H, W)  # [BLOCK_P] each
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # [BLOCK_P, BLOCK_C] dx accumulator
    for i in tl.static_range(KH):
        th = ih + PH - i  # [BLOCK_P] oh * SH if tap i of window oh lands here
        oh = th // SH
        vh = mask_p & (th >= 0) & (th % SH == 0) & (oh < OH)
        for j in tl.static_range(KW):
            tw = iw + PW - j
            ow = tw // SW
            v = vh & (tw >= 0) & (tw % SW == 0) & (ow < OW)  # [BLOCK_P]
            off = (((n * OH + oh) * OW + ow) * C)[:, None] + offs_c[None, :]  # [BLOCK_P, BLOCK_C]
            m2 = v[:, None] & mask_c[None, :]
            won = tl.load(idx_ptr + off, mask=m2, other=-1) == i * KW + j  # [BLOCK_P, BLOCK_C]
            g = tl.load(dy_ptr + off, mask=m2 & won, other=0.0).to(tl.float32)
            acc += g
    out = (offs_p * C)[:, None] + offs_c[None, :]
    tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _avg_divisor(o, S: tl.constexpr, PAD: tl.constexpr, K: tl.constexpr, size, COUNT_PAD: tl.constexpr):
    """Extent along one dim of the window starting at o*S - PAD (PyTorch's rule)."""
    start = o * S - PAD
    if COUNT_PAD:
        return tl.minimum(start + K, size + PAD) - start
    else:
        return tl.minimum(start + K, size) - tl.maximum(start, 0)


@triton.jit
def _avg_pool_fwd_kernel(
    x_ptr, y_ptr,  # x [N,H,W,C]; y [N,OH,OW,C]
    P, C, H, W, OH, OW,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, COUNT_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    offs_p, offs_c, mask_p, mask_c = _pixel_tile(tl.program_id(0), tl.program_id(1), P, C, BLOCK_P, BLOCK_C, IDX64)
    n, oh, ow = _pixel_nhw(offs_p, OH, OW)  # [BLOCK_P] each
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # [BLOCK_P, BLOCK_C] window sum
    for i in tl.static_range(KH):
        ih = oh * SH - PH + i
        vh = mask_p & (ih >= 0) & (ih < H)
        for j in tl.static_range(KW):
            iw = ow * SW - PW + j
            v = vh & (iw >= 0) & (iw < W)
            base = ((n * H + ih) * W + iw) * C
            m2 = v[:, None] & mask_c[None, :]
            acc += tl.load(x_ptr + base[:, None] + offs_c[None, :], mask=m2, other=0.0).to(tl.float32)
    div = _avg_divisor(oh, SH, PH, KH, H, COUNT_PAD) * _avg_divisor(ow, SW, PW, KW, W, COUNT_PAD)  # [BLOCK_P]
    y = acc / div.to(tl.float32)[:, None]
    out = (offs_p * C)[:, None] + offs_c[None, :]
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _avg_pool_bwd_kernel(
    dy_ptr, dx_ptr,  # dy [N,OH,OW,C]; dx [N,H,W,C]
    P, C, H, W, OH, OW,  # P = N*H*W input pixels
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, COUNT_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    offs_p, offs_c, mask_p, mask_c = _pixel_tile(tl.program_id(0), tl.program_id(1), P, C, BLOCK_P, BLOCK_C, IDX64)
    n, ih, iw = _pixel_nhw(offs_p, H, W)  # [BLOCK_P] each
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # [BLOCK_P, BLOCK_C]
    for i in tl.static_range(KH):
        th = ih + PH - i
        oh = th // SH
        vh = mask_p & (th >= 0) & (th % SH == 0) & (oh < OH)
        # divisor of window (oh, ow) = dh * dw, PyTorch's rule (as _avg_divisor; inlined because
        # nested jit calls are slow under the interpreter)
        hs = oh * SH - PH
        if COUNT_PAD:
            dh = tl.minimum(hs + KH, H + PH) - hs  # [BLOCK_P]
        else:
            dh = tl.minimum(hs + KH, H) - tl.maximum(hs, 0)
        for j in tl.static_range(KW):
            tw = iw + PW - j
            ow = tw // SW
            v = vh & (tw >= 0) & (tw % SW == 0) & (ow < OW)
            ws = ow * SW - PW
            if COUNT_PAD:
                dw = tl.minimum(ws + KW, W + PW) - ws
            else:
                dw = tl.minimum(ws + KW, W) - tl.maximum(ws, 0)
            div = (dh * dw).to(tl.float32)  # [BLOCK_P]
            div = tl.where(v, div, 1.0)
            off = (((n * OH + oh) * OW + ow) * C)[:, None] + offs_c[None, :]
            m2 = v[:, None] & mask_c[None, :]
            acc += tl.load(dy_ptr + off, mask=m2, other=0.0).to(tl.float32) / div[:, None]
    out = (offs_p * C)[:, None] + offs_c[None, :]
    tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


# ----------------------------------------------------------------------------
# max / avg pool 2-D launchers
# ----------------------------------------------------------------------------
def max_pool2d_forward(x: torch.Tensor, kernel_size, stride=None, padding=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Max pool NHWC `x` -> (y [N,OH,OW,C] in x.dtype, idx [N,OH,OW,C] int32 winning tap i*KW+j)."""
    _check_act(x)
    N, H, W, C = x.shape
    (kh, kw), (sh, sw), (ph, pw), (OH, OW) = _pool_geometry(H, W, kernel_size, stride, padding)
    y = torch.empty((N, OH, OW, C), device=x.device, dtype=x.dtype)
    idx = torch.empty((N, OH, OW, C), device=x.device, dtype=torch.int32)
    P = N * OH * OW
    bp, bc, nw = _tiles(P, C)
    grid = (triton.cdiv(P, bp), triton.cdiv(C, bc))
    launch(_max_pool_fwd_kernel, grid, x, y, idx, P, C, H, W, OH, OW,
           KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw,
           BLOCK_P=bp, BLOCK_C=bc, IDX64=_idx64(x, y), num_warps=nw)
    return y, idx


def max_pool2d_backward(dy: torch.Tensor, idx: torch.Tensor, x_shape, kernel_size, stride=None, padding=0) -> torch.Tensor:
    """dx [N,H,W,C] (dy's dtype) from dy and the forward's tap indices, by gather (no atomics)."""
    N, H, W, C = (int(s) for s in x_shape)
    (kh, kw), (sh, sw), (ph, pw), (OH, OW) = _pool_geometry(H, W, kernel_size, stride, padding)
    dy = dy.contiguous()
    _check_act(dy, "dy")
    if tuple(dy.shape) != (N, OH, OW, C) or tuple(idx.shape) != (N, OH, OW, C):
        raise ValueError(f"dy {tuple(dy.shape)} / idx {tuple(idx.shape)} do not match the output shape {(N, OH, OW, C)}")
    if idx.dtype != torch.int32 or not idx.is_contiguous() or idx.device != dy.device:
        raise ValueError("idx must be a contiguous int32 tensor on dy's device")
    dx = torch.empty((N, H, W, C), device=dy.device, dtype=dy.dtype)
    P = N * H * W
    bp, bc, nw = _tiles(P, C)
    grid = (triton.cdiv(P, bp), triton.cdiv(C, bc))
    launch(_max_pool_bwd_kernel, grid, dy, idx, dx, P, C, H, W, OH, OW,
           KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw,
           BLOCK_P=bp, BLOCK_C=bc, IDX64=_idx64(dx, dy), num_warps=nw)
    return dx


def avg_pool2d_forward(x: torch.Tensor, kernel_size, stride=None, padding=0, count_include_pad: bool = True) -> torch.Tensor:
    """Average pool NHWC `x` -> y [N,OH,OW,C] in x.dtype (floor mode, PyTorch's divisor)."""
    _check_act(x)
    N, H, W, C = x.shape
    (kh, kw), (sh, sw), (ph, pw), (OH, OW) = _pool_geometry(H, W, kernel_size, stride, padding)
    y = torch.empty((N, OH, OW, C), device=x.device, dtype=x.dtype)
    P = N * OH * OW
    bp, bc, nw = _tiles(P, C)
    grid = (triton.cdiv(P, bp), triton.cdiv(C, bc))
    launch(_avg_pool_fwd_kernel, grid, x, y, P, C, H, W, OH, OW,
           KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, COUNT_PAD=bool(count_include_pad),
           BLOCK_P=bp, BLOCK_C=bc, IDX64=_idx64(x, y), num_warps=nw)
    return y


def avg_pool2d_backward(dy: torch.Tensor, x_shape, kernel_size, stride=None, padding=0, count_include_pad: bool = True) -> torch.Tensor:
    """dx [N,H,W,C] (dy's dtype) of avg pool, by gather."""
    N, H, W, C = (int(s) for s in x_shape)
    (kh, kw), (sh, sw), (ph, pw), (OH, OW) = _pool_geometry(H, W, kernel_size, stride, padding)
    dy = dy.contiguous()
    _check_act(dy, "dy")
    if tuple(dy.shape) != (N, OH, OW, C):
        raise ValueError(f"dy {tuple(dy.shape)} does not match the output shape {(N, OH, OW, C)}")
    dx = torch.empty((N, H, W, C), device=dy.device, dtype=dy.dtype)
    P = N * H * W
    bp, bc, nw = _tiles(P, C)
    grid = (triton.cdiv(P, bp), triton.cdiv(C, bc))
    launch(_avg_pool_bwd_kernel, grid, dy, dx, P, C, H, W, OH, OW,
           KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, COUNT_PAD=bool(count_include_pad),
           BLOCK_P=bp, BLOCK_C=bc, IDX64=_idx64(dx, dy), num_warps=nw)
    return dx


class MaxPool2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride=None, padding=0):
        y, idx = max_pool2d_forward(x, kernel_size, stride, padding)
        ctx.save_for_backward(idx)
        ctx.geom = (tuple(x.shape), kernel_size, stride, padding)
        return y

    @staticmethod
    def backward(ctx, dy):
        (idx,) = ctx.saved_tensors
        x_shape, k, s, p = ctx.geom
        return max_pool2d_backward(dy, idx, x_shape, k, s, p), None, None, None


class AvgPool2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride=None, padding=0, count_include_pad=True):
        ctx.geom = (tuple(x.shape), kernel_size, stride, padding, count_include_pad)
        return avg_pool2d_forward(x, kernel_size, stride, padding, count_include_pad)

    @staticmethod
    def backward(ctx, dy):
        x_shape, k, s, p, cip = ctx.geom
        return avg_pool2d_backward(dy, x_shape, k, s, p, cip), None, None, None, None


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0) -> torch.Tensor:
    """Differentiable NHWC max pool (matches `F.max_pool2d` on the NCHW view)."""
    return MaxPool2dFn.apply(x, kernel_size, stride, padding)


def avg_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, count_include_pad: bool = True) -> torch.Tensor:
    """Differentiable NHWC average pool (matches `F.avg_pool2d` on the NCHW view)."""
    return AvgPool2dFn.apply(x, kernel_size, stride, padding, count_include_pad)


# ----------------------------------------------------------------------------
# global pools: [N, H, W, C] -> [N, C]
# ----------------------------------------------------------------------------
@triton.jit
def _global_pool_partial_kernel(
    x_ptr,  # [N, HW, C]
    out_ptr, out_idx_ptr,  # DIRECT: y [N, C] (+ idx int32 [N, C]); else fp32 partials [SPLIT, N, C] (+ int32)
    N, HW, C, hw_f,  # hw_f = float(HW)
    ITERS: tl.constexpr,  # row blocks per split: a split covers CHUNK = ITERS * BLOCK_HW rows
    IS_MAX: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_N: tl.constexpr,  # images per program (many under the interpreter, which pays per program)
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    # (loop trip counts are constexpr: Triton 3.6's interpreter cannot take a runtime
    # scalar as a range() bound with NumPy >= 2.3)
    CHUNK: tl.constexpr = ITERS * BLOCK_HW
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    s = tl.program_id(2)
    if IDX64:
        pid_n = pid_n.to(tl.int64)
        s = s.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] image
    mask_n = offs_n < N
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = offs_c < C
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    x_img = x_ptr + (offs_n * HW * C)[:, None, None]  # [BLOCK_N, 1, 1] image bases
    BIG: tl.constexpr = 2147483647
    if IS_MAX:
        best = tl.full([BLOCK_N, BLOCK_C], float("-inf"), tl.float32)  # [BLOCK_N, BLOCK_C] running max
        bidx = tl.full([BLOCK_N, BLOCK_C], BIG, tl.int32)  # [BLOCK_N, BLOCK_C] flat hw of the first max
        bnan = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.int32)  # [BLOCK_N, BLOCK_C] 1 once a NaN was seen
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_HW, BLOCK_C], dtype=tl.float32)  # partial sums
    for it in range(ITERS):
        rows = start + it * BLOCK_HW + tl.arange(0, BLOCK_HW)  # [BLOCK_HW] flat hw
        m3 = mask_n[:, None, None] & (rows < end)[None, :, None] & mask_c[None, None, :]  # [BLOCK_N, BLOCK_HW, BLOCK_C]
        ptrs = x_img + (rows * C)[None, :, None] + offs_c[None, None, :]
        if IS_MAX:
            v = tl.load(ptrs, mask=m3, other=float("-inf")).to(tl.float32)  # [BLOCK_N, BLOCK_HW, BLOCK_C]
            isn = m3 & (v != v)
            vv = tl.where(isn, float("-inf"), v)
            bm = tl.max(vv, axis=1)  # [BLOCK_N, BLOCK_C] block max (NaN ignored)
            rows3 = rows[None, :, None].to(tl.int32) + tl.zeros([BLOCK_N, BLOCK_HW, BLOCK_C], dtype=tl.int32)
            first_max = tl.min(tl.where(m3 & (v == bm[:, None, :]), rows3, BIG), axis=1)  # [BLOCK_N, BLOCK_C]
            first_nan = tl.min(tl.where(isn, rows3, BIG), axis=1)  # [BLOCK_N, BLOCK_C]
            has_nan = first_nan < BIG
            cand = tl.where(has_nan, first_nan, first_max)
            take = (bnan == 0) & (has_nan | (bm > best) | ((bm == best) & (cand < bidx)))
            best = tl.where(take, tl.where(has_nan, float("nan"), bm), best)
            bidx = tl.where(take, cand, bidx)
            bnan = tl.where(has_nan, 1, bnan)
        else:
            acc += tl.load(ptrs, mask=m3, other=0.0).to(tl.float32)
    if IS_MAX:
        val = best
    else:
        val = tl.sum(acc, axis=1)  # [BLOCK_N, BLOCK_C]
    m2 = mask_n[:, None] & mask_c[None, :]  # [BLOCK_N, BLOCK_C]
    if DIRECT:
        out_offs = offs_n[:, None] * C + offs_c[None, :]  # [BLOCK_N, BLOCK_C] into [N, C]
        if not IS_MAX:
            val = val / hw_f
        tl.store(out_ptr + out_offs, val.to(out_ptr.dtype.element_ty), mask=m2)
    else:
        out_offs = (s * N + offs_n)[:, None] * C + offs_c[None, :]  # into [SPLIT, N, C]
        tl.store(out_ptr + out_offs, val, mask=m2)
    if IS_MAX:
        tl.store(out_idx_ptr + out_offs, bidx, mask=m2)


@triton.jit
def _global_pool_combine_kernel(
    part_ptr, part_idx_ptr,  # fp32 [SPLIT, NC] partials (+ int32 [SPLIT, NC] first-max indices)
    y_ptr, idx_ptr,  # y [N, C]; idx int32 [N, C] (max only)
    NC, hw_f,
    SPLIT: tl.constexpr, IS_MAX: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat (n, c)
    mask = offs < NC
    BIG: tl.constexpr = 2147483647
    best = tl.full([BLOCK], float("-inf"), tl.float32)  # [BLOCK]
    bidx = tl.full([BLOCK], BIG, tl.int32)
    bnan = tl.zeros([BLOCK], dtype=tl.int32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT):  # fixed order: deterministic
        v = tl.load(part_ptr + s * NC + offs, mask=mask, other=0.0)
        if IS_MAX:
            vi = tl.load(part_idx_ptr + s * NC + offs, mask=mask, other=BIG)
            has_nan = v != v
            take = (bnan == 0) & (has_nan | (v > best) | ((v == best) & (vi < bidx)))
            best = tl.where(take, v, best)
            bidx = tl.where(take, vi, bidx)
            bnan = tl.where(has_nan, 1, bnan)
        else:
            acc += v
    if IS_MAX:
        tl.store(y_ptr + offs, best.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(idx_ptr + offs, bidx, mask=mask)
    else:
        tl.store(y_ptr + offs, (acc / hw_f).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _global_pool_bwd_kernel(
    dy_ptr, idx_ptr, dx_ptr,  # dy [N, C]; idx int32 [N, C] (max only); dx [N, HW, C]
    P, HW, C, hw_f,  # P = N*HW input pixels
    IS_MAX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    offs_p, offs_c, mask_p, mask_c = _pixel_tile(tl.program_id(0), tl.program_id(1), P, C, BLOCK_P, BLOCK_C, IDX64)
    hw = offs_p % HW  # [BLOCK_P]
    n = offs_p // HW
    m2 = mask_p[:, None] & mask_c[None, :]  # [BLOCK_P, BLOCK_C]
    nc = (n * C)[:, None] + offs_c[None, :]  # [BLOCK_P, BLOCK_C]
    g = tl.load(dy_ptr + nc, mask=m2, other=0.0).to(tl.float32)
    if IS_MAX:
        a = tl.load(idx_ptr + nc, mask=m2, other=-1)
        g = tl.where(a == hw[:, None], g, 0.0)
    else:
        g = g / hw_f
    out = (offs_p * C)[:, None] + offs_c[None, :]
    tl.store(dx_ptr + out, g.to(dx_ptr.dtype.element_ty), mask=m2)


def _prev_pow2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _global_pool_forward(x: torch.Tensor, is_max: bool, chunk: int | None):
    _check_act(x)
    N, H, W, C = x.shape
    HW = H * W
    if HW >= _INT32_MAX:
        raise ValueError(f"H*W = {HW} is too large for int32 indices")
    if _device.INTERPRETED:
        block_c = min(_np2(C), 512)
        block_hw = min(max(1, 16384 // block_c), _np2(HW))
        # several images per program: the interpreter's cost is per program (one
        # per image took ~3 ms each on a 64x4x4x32 batch)
        block_n = min(_np2(N), max(1, (1 << 16) // (block_hw * block_c)))
        default_chunk = 1 << 20
    else:
        block_c = min(_np2(C), 64)
        block_hw = max(8, 2048 // block_c)
        block_n = 1
        default_chunk = 4096
    chunk = default_chunk if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    block_hw = min(block_hw, _prev_pow2(chunk))
    chunk = triton.cdiv(min(chunk, HW), block_hw) * block_hw  # rows per split, a multiple of BLOCK_HW
    split = triton.cdiv(HW, chunk)
    y = torch.empty((N, C), device=x.device, dtype=x.dtype)
    idx = torch.empty((N, C), device=x.device, dtype=torch.int32) if is_max else None
    grid = (triton.cdiv(N, block_n), triton.cdiv(C, block_c), split)
    common = dict(IS_MAX=is_max, BLOCK_N=block_n, BLOCK_HW=block_hw, BLOCK_C=block_c, IDX64=_idx64(x), num_warps=4)
    if split == 1:
        launch(_global_pool_partial_kernel, grid, x, y, idx if is_max else y, N, HW, C, float(HW),
               ITERS=chunk // block_hw, DIRECT=True, **common)
        return y, idx
    part = torch.empty((split, N, C), device=x.device, dtype=torch.float32)
    part_idx = torch.empty((split, N, C), device=x.device, dtype=torch.int32) if is_max else part
    launch(_global_pool_partial_kernel, grid, x, part, part_idx, N, HW, C, float(HW),
           ITERS=chunk // block_hw, DIRECT=False, **common)
    NC = N * C
    block = min(_np2(NC), 16384) if _device.INTERPRETED else 256
    launch(_global_pool_combine_kernel, (triton.cdiv(NC, block),), part, part_idx, y, idx if is_max else y,
           NC, float(HW), SPLIT=split, IS_MAX=is_max, BLOCK=block, num_warps=4)
    return y, idx


def _global_pool_backward(dy: torch.Tensor, idx, x_shape, is_max: bool) -> torch.Tensor:
    N, H, W, C = (int(s) for s in x_shape)
    dy = dy.contiguous()
    _check_act(dy, "dy", ndim=2)
    if tuple(dy.shape) != (N, C):
        raise ValueError(f"dy {tuple(dy.shape)} does not match the output shape {(N, C)}")
    if is_max and (idx is None or tuple(idx.shape) != (N, C) or idx.dtype != torch.int32 or not idx.is_contiguous()):
        raise ValueError("idx must be a contiguous int32 [N, C] tensor from global_max_pool_forward")
    dx = torch.empty((N, H, W, C), device=dy.device, dtype=dy.dtype)
    P = N * H * W
    bp, bc, nw = _tiles(P, C)
    grid = (triton.cdiv(P, bp), triton.cdiv(C, bc))
    launch(_global_pool_bwd_kernel, grid, dy, idx if is_max else dy, dx, P, H * W, C, float(H * W),
           IS_MAX=is_max, BLOCK_P=bp, BLOCK_C=bc, IDX64=_idx64(dx), num_warps=nw)
    return dx


def global_avg_pool_forward(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Mean over H, W of NHWC `x` -> [N, C] in x.dtype. `chunk`: rows per split (None = auto)."""
    return _global_pool_forward(x, False, chunk)[0]


def global_avg_pool_backward(dy: torch.Tensor, x_shape) -> torch.Tensor:
    """dx [N,H,W,C] = dy[n, c] / (H*W) broadcast."""
    return _global_pool_backward(dy, None, x_shape, False)


def global_max_pool_forward(x: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over H, W of NHWC `x` -> (y [N, C] in x.dtype, idx [N, C] int32 flat h*W+w of the first max)."""
    return _global_pool_forward(x, True, chunk)


def global_max_pool_backward(dy: torch.Tensor, idx: torch.Tensor, x_shape) -> torch.Tensor:
    """dx [N,H,W,C]: dy[n, c] at the saved argmax position, zero elsewhere."""
    return _global_pool_backward(dy, idx, x_shape, True)


class GlobalAvgPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, chunk=None):
        ctx.x_shape = tuple(x.shape)
        return global_avg_pool_forward(x, chunk)

    @staticmethod
    def backward(ctx, dy):
        return global_avg_pool_backward(dy, ctx.x_shape), None


class GlobalMaxPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, chunk=None):
        y, idx = global_max_pool_forward(x, chunk)
        ctx.save_for_backward(idx)
        ctx.x_shape = tuple(x.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        (idx,) = ctx.saved_tensors
        return global_max_pool_backward(dy, idx, ctx.x_shape), None


def global_avg_pool(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Differentiable [N,H,W,C] -> [N,C] mean (matches `F.adaptive_avg_pool2d(x, 1)`)."""
    return GlobalAvgPoolFn.apply(x, chunk)


def global_max_pool(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Differentiable [N,H,W,C] -> [N,C] max (matches `F.adaptive_max_pool2d(x, 1)`)."""
    return GlobalMaxPoolFn.apply(x, chunk)
