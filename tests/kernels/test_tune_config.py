"""engine/kernels/tune_config.py: tile configs, candidate pruning by shape and
shared memory, split-count variants, epilogue keys (pure functions)."""
from __future__ import annotations

import pytest
import torch

from engine.kernels import tune_config
from engine.kernels.tune_config import Config


def test_candidates_large_gemm():
    default = Config(128, 64, 32, num_warps=4, num_stages=3)
    cands = tune_config.gemm_candidates(65536, 256, 2304, torch.bfloat16, 227 * 1024, default)
    assert cands[0] == default and len(cands) == len(set(cands))
    assert 16 <= len(cands) <= tune_config.MAX_CANDIDATES
    assert {c.block_m for c in cands} == {64, 128}
    assert {c.block_n for c in cands} == {32, 64, 128, 256}
    assert {c.block_k for c in cands} == {32, 64}
    assert {c.num_warps for c in cands} == {4, 8} and all(2 <= c.num_stages <= 4 for c in cands)
    for c in cands[1:]:
        assert tune_config.gemm_smem_bytes(c.block_m, c.block_n, c.block_k, c.num_stages, 2, 2) <= 227 * 1024


def test_candidates_pruned_by_shared_memory():
    limit = 48 * 1024
    default = Config(64, 64, 32, num_warps=8)
    big = tune_config.gemm_candidates(65536, 256, 2304, torch.float32, 227 * 1024)
    small = tune_config.gemm_candidates(65536, 256, 2304, torch.float32, limit, default)
    assert small[0] == default  # always included, fits or not
    assert len(small) < len(big)
    for c in small[1:]:
        assert tune_config.gemm_smem_bytes(c.block_m, c.block_n, c.block_k, c.num_stages, 4, 4) <= limit
    assert not any(c.block_m == 128 and c.block_n == 256 for c in small)
    # fp32 128x256x64 only fits an H100 double-buffered
    fat = [c for c in big if (c.block_m, c.block_n, c.block_k) == (128, 256, 64)]
    assert fat and all(c.num_stages == 2 for c in fat)
    # linear's fp32 weight operand counts 4 bytes even for 16-bit activations
    half = tune_config.gemm_candidates(65536, 256, 2304, torch.float16, limit)
    mixed = tune_config.gemm_candidates(65536, 256, 2304, torch.float16, limit, b_dtype=torch.float32)
    assert len(mixed) <= len(half)


def test_candidates_small_dims():
    default = Config(16, 16, 16, num_warps=8)
    cands = tune_config.gemm_candidates(10, 10, 9, torch.float32, 227 * 1024, default)
    assert cands[0] == default
    assert {(c.block_m, c.block_n, c.block_k) for c in cands[1:]} == {(64, 16, 16)}
    cands = tune_config.gemm_candidates(100, 48, 27, torch.float32, 227 * 1024)
    assert {c.block_n for c in cands} == {32, 64}  # not above next_pow2(48) = 64
    assert {c.block_k for c in cands} == {32} and {c.block_m for c in cands} == {64, 128}


def test_split_variants():
    assert tune_config.split_variants(8, 100) == [4, 8, 16]
    assert tune_config.split_variants(1, 100) == [1, 2]
    assert tune_config.split_variants(5, 6) == [2, 5, 6]
    assert tune_config.split_variants(1, 1) == [1]


def test_epilogue_key_and_config_text():
    assert tune_config.epilogue_key(dict(HAS_BIAS=True, ACT=3, STATS=False, DROPOUT=False)) == "has_bias+act3"
    assert tune_config.epilogue_key(dict(ACT=0)) == "none"
    assert str(Config(64, 32, 16, num_warps=4, num_stages=2, split=3)) == "64x32x16 w4 s2 split3"
    assert Config(64, 32, 16).meta() == {}
    with pytest.raises(ValueError):
        Config.from_json({"block_m": 64, "block_n": 32})
    with pytest.raises(ValueError):
        Config.from_json({"block_m": 64, "block_n": 32, "block_k": 16, "colour": 1})


def test_conv_heuristic_wide_chunks_for_narrow_tiles():
    # 64-wide tiles take 128-channel chunks when the channels divide into them (issue #11: the
    # per-trip overhead is paid half as often); otherwise the channel chunk as before
    for M, N, C in ((1024 * 225, 64, 256), (1024 * 9, 256, 256), (512 * 1024, 64, 128)):
        cfg = tune_config.conv_heuristic(M, N, C, 9)
        if cfg.block_n == 64:
            assert cfg.block_k == 128, (M, N, C, cfg)
    assert tune_config.conv_heuristic(1024 * 225, 64, 64, 9).block_k == 64  # 64 channels: one chunk per tap
    assert tune_config.conv_heuristic(1024 * 961, 64, 24, 9).block_k == 32
    assert tune_config.conv_heuristic(1024 * 49, 256, 256, 9).block_k == 64  # wide tiles keep 64
    assert tune_config.conv_chunks(256, 9, (128, 128, 8)) == [64]
    assert tune_config.conv_chunks(8, 4, (64, 64, 4)) == [32]  # the stem: several taps a chunk
    cands = tune_config.conv_candidates(1024 * 225, 64, 256, 9, torch.bfloat16, 227 * 1024)
    assert {c.block_k for c in cands if c.block_n == 64} == {128, 64}


def test_conv_heuristic_prefers_the_wider_tile_at_equal_area():
    # issue #11: among near-equal estimates of one area, 64x128 over 128x64 (a 64x128 wgmma issues
    # fewer instructions per multiply-add than two 64x64 ones). Pinned from the sm_90 SASS: the
    # pooled 256->256 @7x7 forward (36,864 pre-pool pixels at batch 1024) 128x64x128 0.62 ->
    # 64x128x64 0.53 issue/tensor; resnet9's 64->128 @32x32 forward 128x64x64 0.59 -> 0.46
    cfg = tune_config.conv_heuristic(1024 * 36, 256, 256, 9)
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages) == (64, 128, 64, 4, 4)
    cfg = tune_config.conv_heuristic(512 * 1024, 128, 64, 9)
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps) == (64, 128, 64, 4)
    # a 64-wide output keeps the 128-row tile (the only one of its area that fits N)
    assert tune_config.conv_heuristic(1024 * 225, 64, 64, 9).block_m == 128


def test_wgrad_heuristic_pixel_chunks_by_width():
    bf16 = [tune_config.wgrad_heuristic(C, N, 1 << 20, 9) for C, N in ((8, 24), (24, 64), (64, 64), (64, 128),
                                                                           (128, 128), (64, 256), (256, 512))]
    assert [(c.block_m, c.block_n, c.block_k) for c in bf16] == [
        (64, 32, 256), (64, 64, 256), (64, 64, 256), (64, 128, 128), (128, 128, 128), (64, 256, 64),
        (128, 256, 64)]
    assert tune_config.wgrad_heuristic(64, 64, 1 << 20, 9, elem_bytes=4).block_k == 64  # fp32: no HGMMA
    for c in bf16:  # every pipeline fits an H100's shared memory
        assert tune_config.gemm_smem_bytes(c.block_m, c.block_n, c.block_k, c.num_stages, 2, 2) <= 227 * 1024
    # a dz computed in registers (fused activation gradient) and 16-wide tiles keep the shorter chunks
    assert tune_config.wgrad_heuristic(64, 64, 1 << 20, 9, fused_dz=True).block_k == 128
    assert tune_config.wgrad_heuristic(64, 128, 1 << 20, 9, fused_dz=True).block_k == 64
    assert tune_config.wgrad_heuristic(8, 6, 1 << 20, 25).block_k == 128
