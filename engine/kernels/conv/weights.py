"""The packed weight layouts of the convolution kernels: one function each, the
only places that know them. Each is a permutation of PyTorch's parameter in the
compute dtype, so the fused optimizer keeps it next to the fp32 master
(engine.kernels.params: `request_packed` with the `Packing` below, asked for by
the runtime, engine.runtime.fused) and no training step repacks or casts a
weight; without such a copy (inference, no fused optimizer, a call before the
optimizer exists) the launchers pack per call, into the same layout.

PyTorch's parameter: w [Cout, Cin/G, KH, KW] fp32 (G = groups).

- forward:  B [KH*KW*Cin/G, Cout] in the compute dtype, row (r*KW + s)*Cin/G + ci,
            column co (FORWARD_PERM). An input that stores Cs > Cin/G channels
            per group (zero channels appended for 16-byte pixel rows,
            engine.kernels.layout) is read against it by masking the weight rows
            of channels ci >= Cin/G (the forward kernel's W_PAD).
- dgrad:    B [KH*KW*Cout, Cin/G] in the compute dtype, row (r*KW + s)*Cout + co,
            column ci: the transposed taps, read by tap like the forward (DGRAD_PERM).
- depthwise (Cin/G == 1): [KH*KW, Cout], row r*KW + s: the forward layout with
            one channel, for the direct kernels, forward and dgrad.
- wgrad:    written in PyTorch's layout, straight into the parameter's slot of
            the optimizer's flat gradient buffer when the forward claimed it.

The GEMM kernels read a packed weight through a TMA descriptor
(`weight_descriptor`) where Hopper's tensor memory accelerator can: rows of a
multiple of 16 bytes and a 16-byte aligned base (`use_tma`; the optimizer's
packed copies start 128-byte aligned). The descriptor's block is the kernel's
[BLOCK_K, BLOCK_N] B tile; reads past its edges return zeros.

Public API: FORWARD_PERM, DGRAD_PERM, forward_packing, dgrad_packing,
forward_weight, dgrad_weight, depthwise_weight, pack_weight_for_forward,
pack_weight_for_dgrad, pack_weight_depthwise, use_tma, weight_descriptor, TMA.
"""
from __future__ import annotations

import os

import torch

from engine.kernels.params import Packing, packed

# Weight operands through TMA descriptors (FUSENET_CONV_TMA=0 turns them off, to compare).
TMA = os.environ.get("FUSENET_CONV_TMA", "1") != "0"
# ... for B tiles at least this wide. Measured on sm_90 (conv fwd 64->256 @15x15, BLOCK_K 64): with
# cp.async for the A tile, TMA for B adds its own barrier traffic to the loop (104 -> 117
# instructions at 128x128, 8 warps) but frees the B pointer registers: at 128x256 the loop
# stays 112 -> 117 and the 96-byte spill goes away.
TMA_MIN_N = 256


FORWARD_PERM = (2, 3, 1, 0)  # [Cout, Cin_g, KH, KW] -> [KH, KW, Cin_g, Cout]
DGRAD_PERM = (2, 3, 0, 1)  # [Cout, Cin_g, KH, KW] -> [KH, KW, Cout, Cin_g]


def forward_packing(dtype: torch.dtype) -> Packing:
    """The optimizer-kept copy the forward (and a depthwise conv's dgrad) reads."""
    return Packing(FORWARD_PERM, dtype)


def dgrad_packing(dtype: torch.dtype) -> Packing:
    """The optimizer-kept copy a (non-depthwise) dgrad reads."""
    return Packing(DGRAD_PERM, dtype)


def pack_weight_for_forward(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[Cout, Cin_g, KH, KW] -> [KH*KW*Cin_g, Cout] `dtype` (a copy)."""
    Cout, Cin_g, KH, KW = w.shape
    return w.detach().to(dtype).permute(*FORWARD_PERM).reshape(KH * KW * Cin_g, Cout).contiguous()


def pack_weight_for_dgrad(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[Cout, Cin_g, KH, KW] -> [KH*KW*Cout, Cin_g] `dtype` (a copy)."""
    Cout, Cin_g, KH, KW = w.shape
    return w.detach().to(dtype).permute(*DGRAD_PERM).reshape(KH * KW * Cout, Cin_g).contiguous()


def pack_weight_depthwise(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[Cout, 1, KH, KW] -> [KH*KW, Cout] `dtype` (a copy)."""
    Cout, _, KH, KW = w.shape
    return w.detach().to(dtype).permute(*FORWARD_PERM).reshape(KH * KW, Cout).contiguous()


def _kept(w: torch.Tensor, packing: Packing, rows: int, cols: int) -> torch.Tensor | None:
    """The optimizer's copy of w in `packing`, viewed [rows, cols], or None."""
    pk = packed(w, packing)
    return None if pk is None else pk.view(rows, cols)


def forward_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The forward's B [KH*KW*Cin_g, Cout] `dtype`: the optimizer's copy, else packed now."""
    Cout, Cin_g, KH, KW = w.shape
    kept = _kept(w, forward_packing(dtype), KH * KW * Cin_g, Cout)
    return kept if kept is not None else pack_weight_for_forward(w, dtype)


def dgrad_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dgrad's B [KH*KW*Cout, Cin_g] `dtype`: the optimizer's copy, else packed now."""
    Cout, Cin_g, KH, KW = w.shape
    kept = _kept(w, dgrad_packing(dtype), KH * KW * Cout, Cin_g)
    return kept if kept is not None else pack_weight_for_dgrad(w, dtype)


def depthwise_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The depthwise kernels' [KH*KW, Cout] `dtype` (the forward packing, one channel)."""
    Cout, _, KH, KW = w.shape
    kept = _kept(w, forward_packing(dtype), KH * KW, Cout)
    return kept if kept is not None else pack_weight_depthwise(w, dtype)


def use_tma(packed: torch.Tensor, align: int, block_n: int) -> bool:
    """Whether the kernel reads `packed` [R, C] through a TMA descriptor with B tiles
    `block_n` wide: rows of a multiple of 16 bytes (align > 1), a 16-byte aligned base and
    block_n >= TMA_MIN_N."""
    return (TMA and align > 1 and block_n >= TMA_MIN_N and packed.dim() == 2 and packed.is_contiguous()
            and (packed.device.type == "meta" or packed.data_ptr() % 16 == 0))


def weight_descriptor(packed: torch.Tensor, block_k: int, block_n: int):
    """A TMA descriptor of a packed weight [R, C] with block [block_k, block_n] (zeros out of bounds)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(packed, [block_k, block_n])


__all__ = ["FORWARD_PERM", "DGRAD_PERM", "forward_packing", "dgrad_packing", "forward_weight", "dgrad_weight",
           "depthwise_weight", "pack_weight_for_forward", "pack_weight_for_dgrad", "pack_weight_depthwise", "use_tma",
           "weight_descriptor", "TMA"]
