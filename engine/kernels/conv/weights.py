"""The packed weight layouts of the convolution kernels: one function each, the
only places that know them (a later change lets the optimizer write these
copies directly instead of the launchers repacking PyTorch's layout per call).

PyTorch's parameter: w [Cout, Cin/G, KH, KW] fp32 (G = groups).

- forward:  B [KH*KW*Cs, Cout] in the compute dtype, row (r*KW + s)*Cs + ci,
            column co. Cs >= Cin/G is the input's stored channel count per
            group: rows Cin/G <= ci < Cs are zero, so channels the input
            carries as padding (engine.kernels.layout) add nothing.
- dgrad:    B [KH*KW*Cout, Cin/G] in the compute dtype, row (r*KW + s)*Cout + co,
            column ci: the transposed taps, read by tap like the forward.
- depthwise (Cin/G == 1): [KH*KW, Cout], row r*KW + s, for the direct kernels.

The GEMM kernels read a packed weight through a TMA descriptor
(`weight_descriptor`) where Hopper's tensor memory accelerator can: rows of a
multiple of 16 bytes (`use_tma`). The descriptor's block is the kernel's
[BLOCK_K, BLOCK_N] B tile; reads past its edges return zeros.

Public API: pack_weight_for_forward, pack_weight_for_dgrad, pack_weight_depthwise,
use_tma, weight_descriptor, TMA.
"""
from __future__ import annotations

import os

import torch

# Weight operands through TMA descriptors (FUSENET_CONV_TMA=0 turns them off, to compare).
TMA = os.environ.get("FUSENET_CONV_TMA", "1") != "0"
# ... for B tiles at least this wide. Measured on sm_90 (conv fwd 64->256 @15x15, BLOCK_K 64): with
# cp.async for the A tile, TMA for B adds its own barrier traffic to the loop (104 -> 117
# instructions at 128x128, 8 warps) but frees the B pointer registers: at 128x256 the loop
# stays 112 -> 117 and the 96-byte spill goes away.
TMA_MIN_N = 256


def pack_weight_for_forward(w: torch.Tensor, dtype: torch.dtype, stored_channels: int | None = None) -> torch.Tensor:
    """[Cout, Cin_g, KH, KW] -> [KH*KW*Cs, Cout] `dtype` (Cs = stored_channels or Cin_g; zero rows beyond Cin_g)."""
    Cout, Cin_g, KH, KW = w.shape
    cs = Cin_g if stored_channels is None else int(stored_channels)
    if cs < Cin_g:
        raise ValueError(f"stored_channels {cs} < the weight's {Cin_g} input channels")
    packed = w.detach().to(dtype).permute(2, 3, 1, 0)  # [KH, KW, Cin_g, Cout]
    if cs != Cin_g:
        full = torch.zeros((KH, KW, cs, Cout), device=w.device, dtype=dtype)
        full[:, :, :Cin_g] = packed
        packed = full
    return packed.reshape(KH * KW * cs, Cout).contiguous()


def pack_weight_for_dgrad(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[Cout, Cin_g, KH, KW] -> [KH*KW*Cout, Cin_g] `dtype`."""
    Cout, Cin_g, KH, KW = w.shape
    return w.detach().to(dtype).permute(2, 3, 0, 1).reshape(KH * KW * Cout, Cin_g).contiguous()


def pack_weight_depthwise(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[Cout, 1, KH, KW] -> [KH*KW, Cout] `dtype`."""
    Cout, _, KH, KW = w.shape
    return w.detach().to(dtype).permute(2, 3, 0, 1).reshape(KH * KW, Cout).contiguous()


def use_tma(packed: torch.Tensor, align: int, block_n: int) -> bool:
    """Whether the kernel reads `packed` [R, C] through a TMA descriptor with B tiles
    `block_n` wide: rows of a multiple of 16 bytes (align > 1) and block_n >= TMA_MIN_N."""
    return TMA and align > 1 and block_n >= TMA_MIN_N and packed.dim() == 2 and packed.is_contiguous()


def weight_descriptor(packed: torch.Tensor, block_k: int, block_n: int):
    """A TMA descriptor of a packed weight [R, C] with block [block_k, block_n] (zeros out of bounds)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(packed, [block_k, block_n])


__all__ = ["pack_weight_for_forward", "pack_weight_for_dgrad", "pack_weight_depthwise", "use_tma",
           "weight_descriptor", "TMA"]
