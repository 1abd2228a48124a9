"""Fully connected layer: fused GEMM + bias + activation, forward and backward.

Layouts: x `[N, F]` (activation dtype fp32/fp16/bf16), w `[O, F]` fp32 (PyTorch's
layout), bias `[O]` fp32, y `[N, O]` in x's dtype. Accumulation is fp32 always;
for 16-bit activations the weight tile is cast to the activation dtype before
`tl.dot` (the usual mixed-precision GEMM), for fp32 activations the dot is fp32
(`ieee`) or tf32 when `allow_tf32`. Under a fused optimizer that keeps it
(`weight_packing`, engine.kernels.params), the GEMMs read the weight's 16-bit
copy the optimizer writes at every step instead of the fp32 master: half the
weight bytes, no cast per step.

Backward (dz = act'(z) * dy, computed on the fly from dy and the saved
pre-activation z in every kernel that reads dy):
  * dgrad  dx = dz @ w                       one kernel, tiles over [N, F]
  * wgrad  dw = dz^T @ x, dbias = sum_n dz   split-K over N: each split writes
    fp32 partials `[SPLIT, O*F + O]` (dbias in the tail, written by the column-0
    tiles of the same pass); the last split of each tile to finish (an int32
    ticket, reduction.last_to_arrive) adds the tile's SPLIT partials in a fixed
    order, in the same launch. The float sums never depend on arrival order, so
    results are bit-identical run to run. The sums land in the weight's and
    bias's slots of the optimizer's flat gradient buffer when the forward
    claimed them (engine.kernels.params.claim_grad_slot).

Dropout in the forward epilogue takes an int seed or a ClockSeed (drawn on the
device from the step clock; engine.kernels.dropout).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine import device
from engine.kernels import autotune
from engine.kernels.activations import act_code, act_grad, apply_act
from engine.kernels.common import FLOAT_DTYPES, dot, next_pow2, precision, upcast
from engine.kernels.dropout import check_seed, dropout_backward, dropout_mask_scale, resolve_seed, seed_args
from engine.kernels.launch import launch
from engine.kernels.params import Packing, claim_grad_slot, packed, slot_region
from engine.kernels.reduction import last_to_arrive, sum_slices, ticket_counters
from engine.kernels.tune_config import Config, epilogue_key, gemm_candidates, smem_limit, split_variants


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------
@triton.jit
def _linear_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr,
    N, F, O,
    stride_xn, stride_xf, stride_wo, stride_wf, stride_yn, stride_zn,
    slope, drop_p, seed, clock_ptr, used_ptr, site,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    DROPOUT: tl.constexpr, SEED_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of x / y
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K] input features
    m_mask = offs_m < N
    n_mask = offs_n < O
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N] fp32 accumulator
    for k0 in range(0, F, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < F
        a = tl.load(x_ptr + offs_m[:, None] * stride_xn + kk[None, :] * stride_xf,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K] x dtype
        b = tl.load(w_ptr + offs_n[None, :] * stride_wo + kk[:, None] * stride_wf,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N] w dtype (w^T tile)
        b = b.to(a.dtype)
        acc = dot(a, b, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0)  # [BLOCK_N] fp32
        acc = acc + bias[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SAVE_PRE:
        tl.store(z_ptr + offs_m[:, None] * stride_zn + offs_n[None, :],
                 acc.to(z_ptr.dtype.element_ty), mask=out_mask)
    y = apply_act(acc, ACT, slope)  # [BLOCK_M, BLOCK_N] fp32
    if DROPOUT:
        # engine.kernels.dropout's mask: offsets are flat indices of the contiguous
        # [N, O] output, so its backward regenerates the same mask
        s = resolve_seed(seed, clock_ptr, used_ptr, site, (pid_m == 0) & (pid_n == 0), SEED_MODE)
        y = dropout_mask_scale(y, s, (offs_m[:, None] * O + offs_n[None, :]).to(tl.int32), drop_p)
    tl.store(y_ptr + offs_m[:, None] * stride_yn + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _linear_dgrad_kernel(
    dy_ptr, z_ptr, w_ptr, dx_ptr,
    N, F, O,
    stride_dyn, stride_dyo, stride_zn, stride_wo, stride_wf, stride_dxn,
    slope,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[N, F] = (act'(z) * dy)[N, O] @ w[O, F]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows (batch)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] input features
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K] output features (reduction)
    m_mask = offs_m < N
    n_mask = offs_n < F
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N] fp32 accumulator
    for k0 in range(0, O, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < O
        ld_mask = m_mask[:, None] & k_mask[None, :]
        dz = tl.load(dy_ptr + offs_m[:, None] * stride_dyn + kk[None, :] * stride_dyo,
                     mask=ld_mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K] fp32
        if ACT != 0:
            z = tl.load(z_ptr + offs_m[:, None] * stride_zn + kk[None, :], mask=ld_mask, other=0.0).to(tl.float32)
            dz = act_grad(dz, z, ACT, slope)
        a = dz.to(dx_ptr.dtype.element_ty)  # [BLOCK_M, BLOCK_K] compute dtype
        b = tl.load(w_ptr + kk[:, None] * stride_wo + offs_n[None, :] * stride_wf,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N] w dtype
        b = b.to(a.dtype)
        acc = dot(a, b, acc, PRECISION, UPCAST)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxn + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _linear_wgrad_kernel(
    dy_ptr, z_ptr, x_ptr,
    part_ptr,  # [SPLIT, O*F (+ O)] fp32 partials (the output itself when SPLIT = 1)
    out_ptr,  # [O*F (+ O)] fp32 out: dw then dbias (if TAIL)
    ctr_ptr,  # [tiles] int32 ticket counters, 0 between launches (if TAIL)
    N, F, O,
    stride_dyn, stride_dyo, stride_zn, stride_xn, stride_xf,
    rows_per_split, split_stride,
    slope,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    TAIL: tl.constexpr, TAIL_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """partial[s, :O*F] = dz[n in split s]^T @ x[n in split s]; partial[s, O*F:] = sum_n dz. Grid (O tiles,
    F tiles, SPLIT). TAIL: the last split of a tile to finish adds the tile's SPLIT partials (split order) into
    out, TAIL_M rows at a time (a small register tile after the GEMM's)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] output features (rows of dw)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] input features (cols of dw)
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K] batch rows (reduction)
    m_mask = offs_m < O
    n_mask = offs_n < F
    n_start = pid_s * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N] fp32 dw partial
    dbias = tl.zeros((BLOCK_M,), dtype=tl.float32)  # [BLOCK_M] fp32 dbias partial
    for k0 in range(n_start, n_end, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < n_end
        ld_mask = m_mask[:, None] & k_mask[None, :]
        dz = tl.load(dy_ptr + kk[None, :] * stride_dyn + offs_m[:, None] * stride_dyo,
                     mask=ld_mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K] fp32 (dz^T tile)
        if ACT != 0:
            z = tl.load(z_ptr + kk[None, :] * stride_zn + offs_m[:, None], mask=ld_mask, other=0.0).to(tl.float32)
            dz = act_grad(dz, z, ACT, slope)
        if HAS_BIAS:
            dbias += tl.sum(dz, axis=1)
        b = tl.load(x_ptr + kk[:, None] * stride_xn + offs_n[None, :] * stride_xf,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N] x dtype
        a = dz.to(b.dtype)
        acc = dot(a, b, acc, PRECISION, UPCAST)
    base = part_ptr + pid_s * split_stride
    tl.store(base + offs_m[:, None] * F + offs_n[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])
    if HAS_BIAS:
        if pid_n == 0:
            tl.store(base + O * F + offs_m, dbias, mask=m_mask)
    if TAIL:
        S = tl.num_programs(2)
        if last_to_arrive(ctr_ptr + pid_m * tl.num_programs(1) + pid_n, S):
            for r0 in range(0, BLOCK_M, TAIL_M):
                rows = pid_m * BLOCK_M + r0 + tl.arange(0, TAIL_M)  # [TAIL_M] rows of dw
                offs = rows[:, None] * F + offs_n[None, :]  # [TAIL_M, BLOCK_N]
                mask = (rows < O)[:, None] & n_mask[None, :]
                tl.store(out_ptr + offs, sum_slices(part_ptr, offs, mask, S, split_stride), mask=mask)
            if HAS_BIAS:
                if pid_n == 0:
                    tl.store(out_ptr + O * F + offs_m,
                             sum_slices(part_ptr, O * F + offs_m, m_mask, S, split_stride), mask=m_mask)


# ----------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------
def _gemm_tiles(m: int, n: int, k: int, dtype: torch.dtype, max_n: int = 128) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for an [m, k] @ [k, n] GEMM."""
    if device.INTERPRETED:
        # Few, large programs: interpreter cost is per program and per loop iteration.
        return next_pow2(m, 16, 256), next_pow2(n, 16, 256), next_pow2(k, 16, 512), 4
    # 64 x 64 tiles, 8 warps, BLOCK_K 32 (fp32) or 16 (fp16/bf16): the configuration
    # with no register spills for forward, dgrad and wgrad, fp32 and bf16, with
    # and without an activation, on sm_80 and sm_90 (measured with engine.perf.aot;
    # 64 x 128 with 4 warps spilled up to 3.7 KB).
    bm = next_pow2(m, 16, 64)
    bn = next_pow2(n, 16, min(max_n, 64))
    bk = 32 if dtype == torch.float32 else 16
    return bm, bn, bk, 8


def _dot_flags(dtype: torch.dtype, allow_tf32: bool) -> dict:
    """PRECISION (tf32 for fp32 operands only) and UPCAST (bf16 under the interpreter) constexprs of `dot`."""
    return dict(PRECISION=precision(bool(allow_tf32) and dtype == torch.float32), UPCAST=upcast(dtype))


def _check_x_w(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"linear: x must be 2-D [N, F], got shape {tuple(x.shape)}")
    if w.dim() != 2:
        raise ValueError(f"linear: w must be 2-D [O, F], got shape {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: x has {x.shape[1]} features but w expects {w.shape[1]} ({tuple(w.shape)})")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"linear: x dtype must be fp32/fp16/bf16, got {x.dtype}")
    if w.dtype not in (torch.float32, x.dtype):
        raise ValueError(f"linear: w must be fp32 (or x's dtype: a packed copy), got {w.dtype}")
    if w.device != x.device:
        raise ValueError(f"linear: x on {x.device} but w on {w.device}")
    if bias is not None:
        if bias.shape != (w.shape[0],):
            raise ValueError(f"linear: bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != torch.float32 or bias.device != x.device:
            raise ValueError(f"linear: bias must be fp32 on {x.device}, got {bias.dtype} on {bias.device}")


def linear_forward(x, w, bias=None, *, act="none", slope=0.01, save_pre=False, allow_tf32=False,
                   dropout_p=0.0, dropout_seed=0):
    """y = dropout(act(x @ w^T + bias)). Returns y, or (y, z) with z the pre-activation if save_pre.

    dropout_p > 0: training-mode dropout with engine.kernels.dropout's mask for dropout_seed
    (an int or a ClockSeed).

    x `[N, F]` fp32/fp16/bf16, w `[O, F]` fp32 (or in x's dtype), bias `[O]` fp32 or None.
    y (and z) are `[N, O]` in x's dtype.
    """
    _check_x_w(x, w, bias)
    code = act_code(act)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"linear: dropout_p must be in [0, 1), got {dropout_p}")
    check_seed(dropout_seed)
    N, F = x.shape
    O = w.shape[0]
    y = torch.empty((N, O), device=x.device, dtype=x.dtype)
    z = torch.empty((N, O), device=x.device, dtype=x.dtype) if save_pre else None
    if N > 0 and O > 0:
        flags = dict(HAS_BIAS=bias is not None, ACT=code, SAVE_PRE=bool(save_pre), DROPOUT=dropout_p > 0)
        *seed, seed_mode = seed_args(dropout_seed) if dropout_p > 0 else (0, None, None, 0, 0)

        def run(cfg: Config) -> None:
            """Launch with tile config `cfg` (writes y and z afresh)."""
            launch(
                _linear_fwd_kernel, (triton.cdiv(N, cfg.block_m), triton.cdiv(O, cfg.block_n)),
                x, w, bias, y, z,
                N, F, O,
                x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), O,
                float(slope), float(dropout_p), *seed,
                **flags, SEED_MODE=seed_mode, **_dot_flags(x.dtype, allow_tf32),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **cfg.meta(),
            )

        bm, bn, bk, warps = _gemm_tiles(N, O, F, x.dtype)
        run(_pick("linear_fwd", dict(M=N, N=O, K=F, epilogue=epilogue_key(flags), tf32=bool(allow_tf32)),
                  x, Config(bm, bn, bk, num_warps=warps), run))
    return (y, z) if save_pre else y


def _check_dy(dy: torch.Tensor, n: int, o: int, z: torch.Tensor | None, act: str) -> None:
    if dy.shape != (n, o):
        raise ValueError(f"linear backward: dy must have shape ({n}, {o}), got {tuple(dy.shape)}")
    if dy.dtype not in FLOAT_DTYPES:
        raise ValueError(f"linear backward: dy dtype must be fp32/fp16/bf16, got {dy.dtype}")
    if act_code(act) != 0:
        if z is None or z.shape != (n, o) or not z.is_contiguous():
            raise ValueError("linear backward: a contiguous pre-activation z [N, O] is needed for act != 'none'")


def linear_dgrad(dy, w, z=None, *, act="none", slope=0.01, allow_tf32=False, out_dtype=None):
    """dx `[N, F]` = (act'(z) * dy) @ w, in `out_dtype` (default dy's dtype)."""
    N, O = dy.shape
    F = w.shape[1]
    _check_dy(dy, N, w.shape[0], z, act)
    out_dtype = out_dtype or dy.dtype
    dx = torch.empty((N, F), device=dy.device, dtype=out_dtype)
    if N > 0 and F > 0:
        if O == 0:
            dx.zero_()
            return dx

        def run(cfg: Config) -> None:
            """Launch with tile config `cfg` (writes dx afresh)."""
            launch(
                _linear_dgrad_kernel, (triton.cdiv(N, cfg.block_m), triton.cdiv(F, cfg.block_n)),
                dy, z, w, dx,
                N, F, O,
                dy.stride(0), dy.stride(1), O, w.stride(0), w.stride(1), F,
                float(slope),
                ACT=act_code(act), **_dot_flags(out_dtype, allow_tf32),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **cfg.meta(),
            )

        # act'(z) * dy on the A operand goes through registers: with an activation,
        # 64-wide N tiles cut the spills (engine.perf.aot, sm_80/sm_90: 644 B -> 24 B).
        bm, bn, bk, warps = _gemm_tiles(N, F, O, out_dtype, max_n=64 if act_code(act) != 0 else 128)
        shape = dict(M=N, N=F, K=O, epilogue=epilogue_key(dict(ACT=act_code(act))), tf32=bool(allow_tf32))
        run(_pick("linear_dgrad", shape, dx, Config(bm, bn, bk, num_warps=warps), run))
    return dx


def _split_plan(N: int, O: int, F: int, bm: int, bn: int, bk: int, split: int | None = None) -> tuple[int, int]:
    """(SPLIT, rows_per_split) for split-K over the batch dimension; `split` asks for a count (clamped)."""
    k_blocks = triton.cdiv(max(N, 1), bk)
    if split is None and device.INTERPRETED:
        split = k_blocks  # one big K block per split: few loop iterations per program
    elif split is None:
        tiles = triton.cdiv(O, bm) * triton.cdiv(F, bn)
        target = 264  # ~2 waves of programs on a large GPU
        split = max(1, min(k_blocks, target // max(tiles, 1), 64))
    blocks_per_split = triton.cdiv(k_blocks, max(1, min(split, k_blocks)))
    split = triton.cdiv(k_blocks, blocks_per_split)  # drop empty splits
    return split, blocks_per_split * bk


def _pick(kernel: str, shape: dict, t: torch.Tensor, default: Config, run, candidates=None):
    """autotune.pick for a linear GEMM [shape M, K] x [K, shape N] on t's device and dtype."""
    def weight_candidates():
        # the fp32 weight tile is loaded as fp32 and cast in registers
        return gemm_candidates(shape["M"], shape["N"], shape["K"], t.dtype, smem_limit(t.device),
                               default, b_dtype=torch.float32)

    return autotune.pick(kernel, shape, dtype=t.dtype, device=t.device, default=default, run=run,
                         candidates=candidates or weight_candidates)


def linear_wgrad(dy, x, z=None, *, has_bias=True, act="none", slope=0.01, allow_tf32=False, out=None):
    """Returns (dw `[O, F]` fp32, dbias `[O]` fp32 or None) for dz = act'(z) * dy.

    `out`: a contiguous fp32 `[O*F (+ O)]` tensor to write dw (then dbias) into, e.g.
    the parameters' slots in the optimizer's flat gradient buffer; dw and dbias are its views."""
    N, F = x.shape
    O = dy.shape[1]
    _check_dy(dy, N, O, z, act)
    if dy.dtype != x.dtype:
        raise ValueError(f"linear wgrad: dy dtype {dy.dtype} != x dtype {x.dtype}")
    L = O * F + (O if has_bias else 0)
    if N == 0 or L == 0:
        flat = torch.zeros((L,), device=x.device, dtype=torch.float32)
        return flat[: O * F].view(O, F), (flat[O * F:] if has_bias else None)

    # GEMM view [O, N] x [N, F]: the batch N is the reduction, split into SPLIT fp32 partials
    def run(cfg: Config):
        """(dw, db) with tile config `cfg`; partials are allocated per config and written, not added."""
        split, rows = _split_plan(N, O, F, cfg.block_m, cfg.block_n, cfg.block_k, cfg.split)
        # [SPLIT, O*F (+ O)]; a single split is the result itself
        part = out.view(1, L) if split == 1 and out is not None else torch.empty((split, L), device=x.device,
                                                                                 dtype=torch.float32)
        if F == 0:
            part.zero_()  # only dbias matters; keep the kernel path simple
        flat = part.view(L) if split == 1 else (out if out is not None else torch.empty((L,), device=x.device,
                                                                                           dtype=torch.float32))
        grid = (triton.cdiv(O, cfg.block_m), triton.cdiv(max(F, 1), cfg.block_n), split)
        launch(
            _linear_wgrad_kernel, grid,
            dy, z, x, part, flat, ticket_counters(x.device, grid[0] * grid[1]) if split > 1 else None,
            N, F, O,
            dy.stride(0), dy.stride(1), O, x.stride(0), x.stride(1),
            rows, L,
            float(slope),
            HAS_BIAS=bool(has_bias), ACT=act_code(act), **_dot_flags(x.dtype, allow_tf32),
            TAIL=split > 1, TAIL_M=max(1, min(cfg.block_m, 2048 // cfg.block_n)) if split > 1 else 0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **cfg.meta(),
        )
        return flat[: O * F].view(O, F), (flat[O * F:] if has_bias else None)

    bm, bn, bk, warps = _gemm_tiles(O, F, N, x.dtype)
    default = Config(bm, bn, bk, num_warps=warps)

    def candidates() -> list[Config]:
        # a, b are dz (cast from fp32 registers) and x: both in x's dtype
        tiles = gemm_candidates(O, F, N, x.dtype, smem_limit(x.device), default)
        split = _split_plan(N, O, F, bm, bn, bk)[0]  # the heuristic's, for the default tiles
        return tiles + [default.with_split(s) for s in split_variants(split, triton.cdiv(N, bk)) if s != split]

    shape = dict(M=O, N=F, K=N, epilogue=epilogue_key(dict(HAS_BIAS=bool(has_bias), ACT=act_code(act))),
                 tf32=bool(allow_tf32))
    return run(_pick("linear_wgrad", shape, x, default, run, candidates))


# ----------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------
def weight_packing(dtype: torch.dtype) -> Packing | None:
    """The copy of a linear weight the GEMMs read for `dtype` activations: the same [O, F]
    layout in that dtype (None for fp32, which reads the master itself)."""
    return None if dtype == torch.float32 else Packing((0, 1), dtype)


class LinearFunction(torch.autograd.Function):
    """y = act(x @ w^T + bias) with the fused kernels above, forward and backward."""

    @staticmethod
    def forward(ctx, x, w, bias, act="none", slope=0.01, allow_tf32=False, dropout_p=0.0, dropout_seed=0,
                slots=(None, None)):
        need_pre = act_code(act) != 0
        drop = dict(dropout_p=dropout_p, dropout_seed=dropout_seed)
        packing = weight_packing(x.dtype)
        wk = (packed(w, packing) if packing is not None else None)
        wk = w if wk is None else wk  # the weight the GEMMs read: the optimizer's packed copy if it keeps one
        if need_pre:
            y, z = linear_forward(x, wk, bias, act=act, slope=slope, save_pre=True, allow_tf32=allow_tf32, **drop)
        else:
            y, z = linear_forward(x, wk, bias, act=act, slope=slope, allow_tf32=allow_tf32, **drop), None
        ctx.dropout = (dropout_p, dropout_seed)
        ctx.save_for_backward(x, w, z)
        # the optimizer's packed copy is a view of a buffer shared by every packed weight (so a
        # version check on it would trip over its neighbours); nothing but the optimizer, after
        # the backward, writes it
        ctx.wk = wk if wk is not w else None
        ctx.slots = slots  # the flat-gradient slots `linear` claimed for w and bias (grad mode is off in here)
        ctx.act, ctx.slope, ctx.allow_tf32, ctx.has_bias = act, slope, allow_tf32, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, z = ctx.saved_tensors
        wk = w if ctx.wk is None else ctx.wk
        dx = dw = db = None
        kw = dict(act=ctx.act, slope=ctx.slope, allow_tf32=ctx.allow_tf32)
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        if ctx.dropout[0] > 0:  # the forward's mask, regenerated from its seed
            dy = dropout_backward(dy.contiguous(), *ctx.dropout)
        if ctx.needs_input_grad[0]:
            dx = linear_dgrad(dy, wk, z, out_dtype=x.dtype, **kw)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            O, F = wk.shape
            whole = ctx.needs_input_grad[1] and (not ctx.has_bias or ctx.needs_input_grad[2])
            sizes = [O * F, O][:1 + ctx.has_bias]
            out = slot_region(list(ctx.slots[:len(sizes)]), sizes) if whole else None  # the flat slots
            dw, db = linear_wgrad(dy, x, z, has_bias=ctx.has_bias, out=out, **kw)
            if not ctx.needs_input_grad[1]:
                dw = None
            if not (ctx.has_bias and ctx.needs_input_grad[2]):
                db = None
        return dx, dw, db, None, None, None, None, None, None


def linear(x, w, bias=None, *, act="none", slope=0.01, allow_tf32=False, dropout_p=0.0, dropout_seed=0):
    """Differentiable fused linear layer: dropout(act(x @ w^T + bias)), x `[N, F]`, w `[O, F]`.
    `dropout_seed`: an int or a ClockSeed."""
    check_seed(dropout_seed)
    slots = (claim_grad_slot(w), claim_grad_slot(bias) if bias is not None else None)
    return LinearFunction.apply(x, w, bias, act, float(slope), bool(allow_tf32), float(dropout_p), dropout_seed,
                                slots)
