"""Resampling kernels on NHWC activations: integer upsampling and blurpool.

Upsample by an integer factor F (`upsample(x, factor, mode)`), `[N,H,W,C] ->
[N,H*F,W*F,C]`, matching `F.interpolate(x, scale_factor=F, mode=mode)` on the
NCHW view:

* `"nearest"`: `y[oh, ow] = x[oh // F, ow // F]`. The backward is a gather:
  `dx[ih, iw] = sum_{a, b < F} dy[ih*F + a, iw*F + b]`.
* `"bilinear"` (align_corners=False): per dim, source coordinate
  `src = max((o + 0.5) / F - 0.5, 0) = max(2o + 1 - F, 0) / (2F)`, computed in
  exact integer arithmetic: `i0 = floor(src)`, `lam = src - i0`, `i1 = min(i0 + 1,
  size - 1)`; `y = sum (1-lam_h or lam_h) * (1-lam_w or lam_w) * x[...]`. The
  backward is separable (rows, then columns, through an fp32 `[N, H, W*F, C]`
  intermediate), each half a 1-D gather: input coordinate `x` can only be read
  by the `2F + 1` output coordinates starting at `F*x - (F+1)//2`; for each,
  the exact forward weight is recomputed (`(1-lam)[i0 == x] + lam[i1 == x]`),
  which covers the clamp at 0 and the clamp at the last row (where `i0 == i1`
  and both weights land on the same pixel).

Blurpool (`blurpool(x, filt=3, stride=2)`, Zhang 2019, "Making convolutional
networks shift-invariant again"), exactly:

    a      = [C(filt-1, k) for k in range(filt)]            # binomial row
    w2d    = outer(a, a) / sum(a)**2                         # [filt, filt]
    l, r   = (filt - 1) // 2, filt // 2                      # pad before / after
    xp     = F.pad(x_nchw, (l, r, l, r), mode="reflect")     # both H and W
    y_nchw = F.conv2d(xp, w2d.expand(C, 1, filt, filt), stride=stride, groups=C)

so `OH = (H - 1) // stride + 1` (same for W); reflect padding needs `l, r < H, W`.
The forward gathers `filt x filt` reflected taps (separable weights from a tiny
fp32 tensor holding the 1-D normalised binomial row). The backward is separable
(rows, then columns, through an fp32 `[N, H, OW, C]` intermediate), each half a
1-D gather that undoes the reflection: along a dim an input coordinate `x` is
read at padded coordinate `x + l` (direct, taps 0..filt-1), at `-x + l` (left
mirror image, only for x >= 1 and taps < l) and at `2(size-1) - x + l` (right
mirror image, only for x <= size-2 and taps > l), i.e. `2*filt - 1` candidate
(output coordinate, tap) pairs, each masked unless `padded - tap` is a
multiple of the stride inside the output.

Filter sizes 1..7; filter 1 is plain strided subsampling.
"""
from __future__ import annotations

from math import comb

import torch
import triton
import triton.language as tl

from engine.kernels.common import check_grad, check_nhwc, idx64, pixel_grid, pixel_nhw, pixel_tile
from engine.kernels.launch import launch

MODES = {"nearest": 0, "bilinear": 1}


# ----------------------------------------------------------------------------
# host helpers
# ----------------------------------------------------------------------------


def _mode_code(mode: str) -> int:
    try:
        return MODES[mode]
    except KeyError:
        raise ValueError(f"unknown upsample mode {mode!r}; known: {sorted(MODES)}") from None


def _factor(factor) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"upsample factor must be a positive int, got {factor!r}")
    return factor


def blur_weights(filt: int) -> list[float]:
    """The normalised 1-D binomial row; blurpool's 2-D filter is its outer product."""
    if isinstance(filt, bool) or not isinstance(filt, int) or not 1 <= filt <= 7:
        raise ValueError(f"blurpool filter size must be an int in 1..7, got {filt!r}")
    a = [comb(filt - 1, k) for k in range(filt)]
    s = float(sum(a))
    return [v / s for v in a]


_WEIGHT_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def _blur_weight_tensor(filt: int, device: torch.device) -> torch.Tensor:
    key = (filt, str(device))
    w = _WEIGHT_CACHE.get(key)
    if w is None:
        w = torch.tensor(blur_weights(filt), dtype=torch.float32, device=device)
        _WEIGHT_CACHE[key] = w
    return w


# ----------------------------------------------------------------------------
# kernels
# Note: helper @triton.jit calls are costly under the interpreter (it re-patches the
# language on each call), so per-tap index math is written inline in the loops.
# ----------------------------------------------------------------------------
@triton.jit
def _bilinear_src(o, FACTOR: tl.constexpr, size):
    """Source (i0, i1, lam) of output coordinate `o` (align_corners=False), exact."""
    num = tl.maximum(2 * o + 1 - FACTOR, 0)  # src * 2F, clamped at 0
    i0 = num // (2 * FACTOR)
    lam = (num - i0 * (2 * FACTOR)).to(tl.float32) / (2 * FACTOR)
    i1 = tl.minimum(i0 + 1, size - 1)
    return i0, i1, lam


@triton.jit
def _upsample_fwd_kernel(
    x_ptr, y_ptr,  # x [N,H,W,C]; y [N,OH,OW,C]
    P, C, H, W, OH, OW,  # P = N*OH*OW output pixels
    FACTOR: tl.constexpr, MODE: tl.constexpr,  # MODE 0 nearest, 1 bilinear
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    offs_p, offs_c, mask_p, mask_c = pixel_tile(tl.program_id(0), tl.program_id(1), P, C, BLOCK_P, BLOCK_C, IDX64)
    n, oh, ow = pixel_nhw(offs_p, OH, OW)  # [BLOCK_P] each
    m2 = mask_p[:, None] & mask_c[None, :]  # [BLOCK_P, BLOCK_C]
    cc = offs_c[None, :]
    if MODE == 0:
        src = ((n * H + oh // FACTOR) * W + ow // FACTOR) * C  # [BLOCK_P]
        y = tl.load(x_ptr + src[:, None] + cc, mask=m2, other=0.0).to(tl.float32)
    else:
        h0, h1, lh = _bilinear_src(oh, FACTOR, H)  # [BLOCK_P] each
        w0, w1, lw = _bilinear_src(ow, FACTOR, W)
        r0 = (n * H + h0) * W
        r1 = (n * H + h1) * W
        x00 = tl.load(x_ptr + ((r0 + w0) * C)[:, None] + cc, mask=m2, other=0.0).to(tl.float32)  # [BLOCK_P, BLOCK_C]
        x01 = tl.load(x_ptr + ((r0 + w1) * C)[:, None] + cc, mask=m2, other=0.0).to(tl.float32)
        x10 = tl.load(x_ptr + ((r1 + w0) * C)[:, None] + cc, mask=m2, other=0.0).to(tl.float32)
        x11 = tl.load(x_ptr + ((r1 + w1) * C)[:, None] + cc, mask=m2, other=0.0).to(tl.float32)
        lh2 = lh[:, None]
        lw2 = lw[:, None]
        y = (1.0 - lh2) * ((1.0 - lw2) * x00 + lw2 * x01) + lh2 * ((1.0 - lw2) * x10 + lw2 * x11)
    out = (offs_p * C)[:, None] + cc
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _upsample_nearest_bwd_kernel(
    dy_ptr, dx_ptr,  # dy [N,OH,OW,C]; dx [N,H,W,C]
    P, C, H, W, OH, OW,  # P = N*H*W input pixels
    FACTOR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    offs_p, offs_c, mask_p, mask_c = pixel_tile(tl.program_id(0), tl.program_id(1), P, C, BLOCK_P, BLOCK_C, IDX64)
    n, ih, iw = pixel_nhw(offs_p, H, W)  # [BLOCK_P] each
    m2 = mask_p[:, None] & mask_c[None, :]  # [BLOCK_P, BLOCK_C]
    cc = offs_c[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # [BLOCK_P, BLOCK_C] dx accumulator
    for a in tl.static_range(FACTOR):
        row = (n * OH + ih * FACTOR + a) * OW  # [BLOCK_P]
        for b in tl.static_range(FACTOR):
            off = ((row + iw * FACTOR + b) * C)[:, None] + cc
            acc += tl.load(dy_ptr + off, mask=m2, other=0.0).to(tl.float32)
    out = (offs_p * C)[:, None] + cc
    tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _transposed_1d_kernel(
    src_ptr, w_ptr, dst_ptr,  # src [OUTER, OUT_SIZE, INNER, C] gradient; w fp32 [FILT] (blur); dst [OUTER, SIZE, INNER, C]
    P, C, SIZE, OUT_SIZE, INNER,  # P = OUTER*SIZE*INNER destination pixels
    KIND: tl.constexpr,  # 0: bilinear upsample by FACTOR, 1: blurpool (FILT, L, STRIDE)
    FACTOR: tl.constexpr, FILT: tl.constexpr, L: tl.constexpr, STRIDE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    """One separable half of a backward: dst[x] = sum_o weight(o, x) * src[o] along one dim, as a gather."""
    offs_p, offs_c, mask_p, mask_c = pixel_tile(tl.program_id(0), tl.program_id(1), P, C, BLOCK_P, BLOCK_C, IDX64)
    inner = offs_p % INNER  # [BLOCK_P]
    t = offs_p // INNER
    x = t % SIZE  # [BLOCK_P] coordinate along the resampled dim
    outer = t // SIZE
    m2 = mask_p[:, None] & mask_c[None, :]  # [BLOCK_P, BLOCK_C]
    cc = offs_c[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # [BLOCK_P, BLOCK_C]
    if KIND == 0:
        # bilinear: the 2F+1 output coordinates from F*x - (F+1)//2 are the only ones whose
        # source interval reaches x; recompute each one's exact forward weight for x.
        for d in tl.static_range(2 * FACTOR + 1):
            o = x * FACTOR - (FACTOR + 1) // 2 + d  # [BLOCK_P]
            num = tl.maximum(2 * o + 1 - FACTOR, 0)  # source * 2F, clamped at 0
            i0 = num // (2 * FACTOR)
            lam = (num - i0 * (2 * FACTOR)).to(tl.float32) / (2 * FACTOR)
            i1 = tl.minimum(i0 + 1, SIZE - 1)
            w = tl.where(i0 == x, 1.0 - lam, 0.0) + tl.where(i1 == x, lam, 0.0)  # [BLOCK_P]
            ok = (o >= 0) & (o < OUT_SIZE) & (w != 0.0)
            off = (((outer * OUT_SIZE + o) * INNER + inner) * C)[:, None] + cc
            acc += w[:, None] * tl.load(src_ptr + off, mask=m2 & ok[:, None], other=0.0).to(tl.float32)
    else:
        # blurpool: output o reads padded coordinate o*STRIDE + tap, i.e. unpadded r = o*STRIDE + tap - L,
        # reflected into [0, SIZE). Slots 0..FILT-1: r = x (tap a); FILT..FILT+L-1: r = -x (left mirror,
        # taps 0..L-1, x >= 1); the rest: r = 2(SIZE-1) - x (right mirror, taps L+1..FILT-1, x <= SIZE-2).
        # A border pixel mirrors onto itself, which the direct slots already count.
        for a in tl.static_range(2 * FILT - 1):
            if a < FILT:
                tap = a
                tt = x + (L - tap)  # [BLOCK_P] = o * STRIDE when this (o, tap) reads x
                ok = x >= 0
            elif a < FILT + L:
                tap = a - FILT
                tt = (L - tap) - x
                ok = x >= 1
            else:
                tap = a - FILT + 1
                tt = (2 * SIZE - 2 + L - tap) - x
                ok = x <= SIZE - 2
            o = tt // STRIDE
            ok = ok & (tt >= 0) & (tt % STRIDE == 0) & (o < OUT_SIZE)
            off = (((outer * OUT_SIZE + o) * INNER + inner) * C)[:, None] + cc
            acc += tl.load(w_ptr + tap) * tl.load(src_ptr + off, mask=m2 & ok[:, None], other=0.0).to(tl.float32)
    out = (offs_p * C)[:, None] + cc
    tl.store(dst_ptr + out, acc.to(dst_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _blurpool_fwd_kernel(
    x_ptr, w_ptr, y_ptr,  # x [N,H,W,C]; w fp32 [FILT] normalised 1-D row; y [N,OH,OW,C]
    P, C, H, W, OH, OW,  # P = N*OH*OW output pixels
    FILT: tl.constexpr, L: tl.constexpr, STRIDE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    offs_p, offs_c, mask_p, mask_c = pixel_tile(tl.program_id(0), tl.program_id(1), P, C, BLOCK_P, BLOCK_C, IDX64)
    n, oh, ow = pixel_nhw(offs_p, OH, OW)  # [BLOCK_P] each
    m2 = mask_p[:, None] & mask_c[None, :]  # [BLOCK_P, BLOCK_C]
    cc = offs_c[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # [BLOCK_P, BLOCK_C]
    for i in range(FILT):  # runtime loop, inner taps unrolled
        ih = oh * STRIDE + i - L  # [BLOCK_P] unpadded row, then reflected (pad < H)
        ih = tl.where(ih < 0, -ih, ih)
        ih = tl.where(ih > H - 1, 2 * (H - 1) - ih, ih)
        wi = tl.load(w_ptr + i)
        row = (n * H + ih) * W
        for j in tl.static_range(FILT):
            iw = ow * STRIDE + (j - L)
            iw = tl.where(iw < 0, -iw, iw)
            iw = tl.where(iw > W - 1, 2 * (W - 1) - iw, iw)
            wij = wi * tl.load(w_ptr + j)
            acc += wij * tl.load(x_ptr + ((row + iw) * C)[:, None] + cc, mask=m2, other=0.0).to(tl.float32)
    out = (offs_p * C)[:, None] + cc
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=m2)


def _separable_backward(dy, w, x_shape, OH, OW, kind, factor=1, filt=1, left=0, stride=1):
    """Rows first (dy [N,OH,OW,C] -> fp32 tmp [N,H,OW,C]), then columns (-> dx [N,H,W,C])."""
    N, H, W, C = x_shape
    tmp = torch.empty((N, H, OW, C), device=dy.device, dtype=torch.float32)
    dx = torch.empty((N, H, W, C), device=dy.device, dtype=dy.dtype)
    for src, dst, size, out_size, inner in ((dy, tmp, H, OH, OW), (tmp, dx, W, OW, 1)):
        P = dst.numel() // C
        grid, tiles = pixel_grid(P, C)
        launch(_transposed_1d_kernel, grid, src, w, dst, P, C, size, out_size, inner,
               KIND=kind, FACTOR=factor, FILT=filt, L=left, STRIDE=stride, IDX64=idx64(src, dst), **tiles)
    return dx


# ----------------------------------------------------------------------------
# upsample launchers
# ----------------------------------------------------------------------------
def upsample_forward(x: torch.Tensor, factor: int, mode: str = "nearest") -> torch.Tensor:
    """Upsample NHWC `x` by integer `factor` -> [N, H*F, W*F, C] in x.dtype."""
    check_nhwc(x)
    f = _factor(factor)
    code = _mode_code(mode)
    N, H, W, C = x.shape
    OH, OW = H * f, W * f
    y = torch.empty((N, OH, OW, C), device=x.device, dtype=x.dtype)
    grid, tiles = pixel_grid(N * OH * OW, C)
    launch(_upsample_fwd_kernel, grid, x, y, N * OH * OW, C, H, W, OH, OW,
           FACTOR=f, MODE=code, IDX64=idx64(x, y), **tiles)
    return y


def upsample_backward(dy: torch.Tensor, x_shape, factor: int, mode: str = "nearest") -> torch.Tensor:
    """dx [N,H,W,C] (dy's dtype) of `upsample_forward`, by gather (no atomics).

    Nearest: one kernel summing the F x F block. Bilinear: separable, two 1-D gathers
    through an fp32 [N, H, W*F, C] intermediate."""
    f = _factor(factor)
    code = _mode_code(mode)
    N, H, W, C = (int(s) for s in x_shape)
    OH, OW = H * f, W * f
    dy = check_grad(dy, (N, OH, OW, C))
    if code == 1:
        return _separable_backward(dy, dy, (N, H, W, C), OH, OW, kind=0, factor=f)
    dx = torch.empty((N, H, W, C), device=dy.device, dtype=dy.dtype)
    grid, tiles = pixel_grid(N * H * W, C)
    launch(_upsample_nearest_bwd_kernel, grid, dy, dx, N * H * W, C, H, W, OH, OW,
           FACTOR=f, IDX64=idx64(dx, dy), **tiles)
    return dx


class UpsampleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor, mode="nearest"):
        ctx.args = (tuple(x.shape), factor, mode)
        return upsample_forward(x, factor, mode)

    @staticmethod
    def backward(ctx, dy):
        x_shape, factor, mode = ctx.args
        return upsample_backward(dy, x_shape, factor, mode), None, None


def upsample(x: torch.Tensor, factor: int, mode: str = "nearest") -> torch.Tensor:
    """Differentiable NHWC upsample (matches `F.interpolate(scale_factor=factor, mode=mode)`,
    align_corners=False for bilinear)."""
    return UpsampleFn.apply(x, factor, mode)


# ----------------------------------------------------------------------------
# blurpool launchers
# ----------------------------------------------------------------------------
def _blur_geometry(H: int, W: int, filt: int, stride: int):
    blur_weights(filt)  # validates filt
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"blurpool stride must be a positive int, got {stride!r}")
    left, right = (filt - 1) // 2, filt // 2
    if max(left, right) >= min(H, W):
        raise ValueError(f"blurpool filter {filt} needs reflect padding {(left, right)} < input size {H}x{W}")
    return left, (H - 1) // stride + 1, (W - 1) // stride + 1


def blurpool_forward(x: torch.Tensor, filt: int = 3, stride: int = 2) -> torch.Tensor:
    """Blurpool NHWC `x` -> [N, (H-1)//stride+1, (W-1)//stride+1, C] in x.dtype (see module doc)."""
    check_nhwc(x)
    N, H, W, C = x.shape
    left, OH, OW = _blur_geometry(H, W, filt, stride)
    w = _blur_weight_tensor(filt, x.device)
    y = torch.empty((N, OH, OW, C), device=x.device, dtype=x.dtype)
    grid, tiles = pixel_grid(N * OH * OW, C)
    launch(_blurpool_fwd_kernel, grid, x, w, y, N * OH * OW, C, H, W, OH, OW,
           FILT=filt, L=left, STRIDE=stride, IDX64=idx64(x, y), **tiles)
    return y


def blurpool_backward(dy: torch.Tensor, x_shape, filt: int = 3, stride: int = 2) -> torch.Tensor:
    """dx [N,H,W,C] (dy's dtype) of `blurpool_forward`: separable gathers through the reflection
    (rows, then columns, via an fp32 [N, H, OW, C] intermediate)."""
    N, H, W, C = (int(s) for s in x_shape)
    left, OH, OW = _blur_geometry(H, W, filt, stride)
    dy = check_grad(dy, (N, OH, OW, C))
    w = _blur_weight_tensor(filt, dy.device)
    return _separable_backward(dy, w, (N, H, W, C), OH, OW, kind=1, filt=filt, left=left, stride=stride)


class BlurPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, filt=3, stride=2):
        ctx.args = (tuple(x.shape), filt, stride)
        return blurpool_forward(x, filt, stride)

    @staticmethod
    def backward(ctx, dy):
        x_shape, filt, stride = ctx.args
        return blurpool_backward(dy, x_shape, filt, stride), None, None


def blurpool(x: torch.Tensor, filt: int = 3, stride: int = 2) -> torch.Tensor:
    """Differentiable NHWC blurpool (reflect pad + binomial depthwise conv at `stride`)."""
    return BlurPoolFn.apply(x, filt, stride)
