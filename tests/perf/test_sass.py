"""The SASS main-loop reader (engine.perf.sass): pure text analysis, fed known listings.

The real excerpt (tests/perf/data/conv_dgrad_sm90_loop.sass) is a conv dgrad
main loop compiled for sm_90 with Triton 3.9: 119 instructions a trip, four
m64n128k16 wgmmas per warpgroup, activation tiles by 16-byte cp.async and the
weight tile by TMA, and an out-of-line barrier retry loop that jumps back into
the main loop (a back edge by address that is not a loop around the MMAs).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.perf.sass import (FAST_LOADS, MainLoop, find_loops, load_kind, main_loop, mma_macs_per_warp,
                              mma_smem_bytes_per_warp, parse_sass)

DATA = Path(__file__).with_name("data") / "conv_dgrad_sm90_loop.sass"


def test_real_conv_dgrad_loop():
    ml = main_loop(DATA.read_text())
    assert ml is not None and ml.loops == 1
    assert ml.instructions == 119
    assert ml.mma == 4 and ml.mma_opcode == "HGMMA.64x128x16.F32.BF16"
    assert ml.macs_per_warp == 4 * 64 * 128 * 16 / 4  # a warpgroup's wgmma, shared by its 4 warps
    assert ml.loads == {"async16": 2, "TMA": 1} and ml.load_kind == "async16" and ml.fast_loads
    assert ml.hopper_mma
    # issue/tensor = 119 instructions x 8 warps / 4 per clock over 8 warps x 131072 MACs / 2048 per clock
    assert ml.issue_tensor_ratio() == pytest.approx(119 * 512 / 131072)
    # shared memory: per wgmma B (16 x 128) and A (64 x 16), bf16, a quarter per warp
    assert ml.smem_per_warp == 4 * (16 * 128 + 64 * 16) * 2 / 4
    assert ml.tensor_clocks(8) == pytest.approx(max(8 * 131072 / 2048, 8 * 6144 / 128))
    assert MainLoop.from_dict(ml.as_dict()) == ml


def test_retry_block_is_its_own_loop_not_the_main_one():
    instrs = parse_sass(DATA.read_text())
    spans = [(lp.start, lp.end, len(lp.body)) for lp in find_loops(instrs)]
    # the main loop, and the TMA barrier's 2-instruction spin; the branch from the spin block
    # back into the middle of the main loop (0x2690 -> 0x1770) is not a back edge
    assert spans == [(0x1610, 0x1d70, 119), (0x2670, 0x2680, 2)]


HAND = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.U16 R2, desc[UR4][R4.64] ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64], P0 ;
        /*0030*/              @!PT HMMA.16816.F32.BF16 R8, R12, R14, R8 ;
        /*0040*/                   HMMA.16816.F32.BF16 R8, R12, R14, R8 ;
        /*0050*/                   LDGSTS.E.64 [R3], desc[UR4][R6.64] ;
        /*0060*/              @P1  BRA 0x10 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
        /*0090*/                   NOP;
"""


def test_hand_listing_hmma_and_load_kinds():
    instrs = parse_sass(HAND)
    assert [i.base for i in instrs][-2:] == ["BRA", "EXIT"]  # trailing self-branch and NOP dropped
    ml = main_loop(HAND)
    assert ml.loops == 1 and ml.instructions == 6  # 0x10 .. 0x60
    assert ml.mma == 2 and ml.macs_per_warp == 2 * 16 * 8 * 16  # mma.sync: per warp
    assert ml.loads == {"scalar": 1, "async16": 1, "async<16": 1}
    assert ml.load_kind == "scalar" and not ml.fast_loads and not ml.hopper_mma
    assert ml.issue_tensor_ratio("sm_80") == pytest.approx(6 * 1024 / (4 * 4096))
    assert set(FAST_LOADS) == {"TMA", "async16"}


def test_nvdisasm_labels_nesting_and_no_loop():
    text = """
        /*0000*/ MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/ IADD3 R2, R2, 0x1, RZ ;
.L_x_1:
        /*0020*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/ @P0 BRA `(.L_x_1) ;
        /*0040*/ @P1 BRA `(.L_x_0) ;
        /*0050*/ EXIT ;
    """
    loops = find_loops(parse_sass(text))
    assert [(lp.start, lp.end) for lp in loops] == [(0x10, 0x40), (0x20, 0x30)]
    ml = main_loop(text)
    assert ml.instructions == 2 and ml.loops == 1  # the innermost loop holding the MMA
    # straight-line code with an MMA: the whole kernel is one trip
    flat = main_loop("/*0000*/ HGMMA.64x32x16.F32.BF16 R24, R40, gdesc[UR4], R24 ;\n/*0010*/ EXIT ;")
    assert flat.loops == 0 and flat.instructions == 2 and flat.mma == 1
    assert main_loop("/*0000*/ MOV R1, R2 ;\n/*0010*/ EXIT ;") is None


def test_instruction_helpers():
    (rs,) = parse_sass("/*0000*/ HGMMA.64x32x16.F32.BF16 R24, R40, gdesc[UR4].tnspB, R24 ;")
    (ss,) = parse_sass("/*0000*/ HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4].tnspB, R24 ;")
    assert mma_macs_per_warp(rs) == 64 * 32 * 16 // 4
    assert mma_smem_bytes_per_warp(rs) == 16 * 32 * 2 / 4  # A from registers: only B is read
    assert mma_smem_bytes_per_warp(ss) == (16 * 32 + 64 * 16) * 2 / 4
    (tma,) = parse_sass("/*0000*/ @UP0 UTMALDG.2D [UR4], [UR8] ;")
    assert tma.predicate == "@UP0" and load_kind(tma) == "TMA"
    (ldg,) = parse_sass("/*0000*/ LDG.E.128 R4, desc[UR4][R2.64] ;")
    assert load_kind(ldg) == "sync16"
