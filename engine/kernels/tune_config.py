"""Tile configs of the GEMM kernels and the candidates worth timing for a shape.

A `Config` is a tile config in the GEMM view `[M, K] x [K, N]` of a kernel
(block_m, block_n, block_k, num_warps, num_stages, split); each launcher maps
it onto its kernel's constexprs. `gemm_candidates` lists the configs that fit
a device's shared memory, `split_variants` the split-K counts around a
heuristic's, `epilogue_key` the launch flags that belong in a tuning key.
Pure functions: timing and choosing live in engine.kernels.autotune, the
on-disk cache in engine.kernels.tune_cache.

Public API: Config, epilogue_key, gemm_smem_bytes, gemm_candidates,
split_variants, smem_limit, DEFAULT_SMEM_LIMIT, MAX_CANDIDATES.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from engine.kernels.common import next_pow2

DEFAULT_SMEM_LIMIT = 227 * 1024  # an H100's opt-in shared memory per block, when the device does not say
MAX_CANDIDATES = 24

# --------------------------------------------------------------------------- #
# Configs
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Config:
    """A tile config in the GEMM view [M, K] x [K, N] of a kernel.

    block_m / block_n tile the output, block_k is the reduction chunk; each
    launcher maps them onto its kernel's constexpr names. num_warps / num_stages
    None: the launcher passes none (Triton's defaults). split: the split-K count
    of a wgrad (None: the launcher's heuristic for these tiles).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int | None = None
    num_stages: int | None = None
    split: int | None = None

    def meta(self) -> dict:
        """The launch options (num_warps, num_stages) this config sets."""
        out = {}
        if self.num_warps is not None:
            out["num_warps"] = self.num_warps
        if self.num_stages is not None:
            out["num_stages"] = self.num_stages
        return out

    def with_split(self, split: int | None) -> Config:
        return replace(self, split=split)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Any) -> Config:
        """Parse a cached config; ValueError if it is not one."""
        if not isinstance(data, dict):
            raise ValueError(f"config is {type(data).__name__}, not an object")
        names = {"block_m", "block_n", "block_k", "num_warps", "num_stages", "split"}
        extra = set(data) - names
        if extra:
            raise ValueError(f"config has unknown fields {sorted(extra)}")
        for name, value in data.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config field {name} is {value!r}, not a positive integer")
        try:
            return cls(**data)
        except TypeError as e:  # a required block size is missing
            raise ValueError(f"config {data}: {e}") from None

    def __str__(self) -> str:
        text = f"{self.block_m}x{self.block_n}x{self.block_k}"
        if self.num_warps is not None:
            text += f" w{self.num_warps}"
        if self.num_stages is not None:
            text += f" s{self.num_stages}"
        if self.split is not None:
            text += f" split{self.split}"
        return text


def epilogue_key(flags: dict) -> str:
    """Launch flags that change a kernel's register use, as a short key part.

    {"HAS_BIAS": True, "ACT": 3, "STATS": False} -> "has_bias+act3"; none -> "none".
    """
    parts = []
    for name, value in flags.items():
        if value is True:
            parts.append(name.lower())
        elif isinstance(value, int) and not isinstance(value, bool) and value:
            parts.append(f"{name.lower()}{value}")
    return "+".join(parts) or "none"


# --------------------------------------------------------------------------- #
# Candidates
# --------------------------------------------------------------------------- #
def gemm_smem_bytes(block_m: int, block_n: int, block_k: int, stages: int, a_bytes: int, b_bytes: int) -> int:
    """Shared memory a pipelined GEMM tile needs: `stages` buffers of the A and B tiles."""
    return stages * (block_m * block_k * a_bytes + block_k * block_n * b_bytes)


def gemm_candidates(M: int, N: int, K: int, dtype: torch.dtype, smem_limit: int,
                    default: Config | None = None, *, b_dtype: torch.dtype | None = None) -> list[Config]:
    """The tile configs worth timing for an [M, K] x [K, N] GEMM; a pure function.

    BLOCK_M 64/128 (128 only when M reaches it), BLOCK_N 32..256 up to
    next_pow2(N) (16 for N <= 16), BLOCK_K 32/64 up to next_pow2(K) (16 for
    K <= 16); warps by tile area (4 up to 64x64, 8 from 128x128, both between);
    the deepest of 4 (BLOCK_K 32) or 3 (BLOCK_K 64) stages that fits
    `smem_limit`, down to 2, else the tile is dropped. `default` comes first,
    always (it is what runs today). At most MAX_CANDIDATES configs.
    b_dtype: the B operand's dtype in memory when it differs (linear loads fp32
    weights and casts them in registers).
    """
    a_bytes = torch.empty((), dtype=dtype).element_size()
    b_bytes = torch.empty((), dtype=b_dtype).element_size() if b_dtype is not None else a_bytes
    bm_opts = [b for b in (64, 128) if b <= max(64, next_pow2(M))]
    bn_opts = [b for b in (32, 64, 128, 256) if b <= next_pow2(N)] or [max(16, next_pow2(N))]
    bk_opts = [b for b in (32, 64) if b <= next_pow2(K)] or [max(16, next_pow2(K))]
    out: list[Config] = [default] if default is not None else []
    for bm in bm_opts:
        for bn in bn_opts:
            for bk in bk_opts:
                area = bm * bn
                warps = (4,) if area <= 64 * 64 else (8,) if area >= 128 * 128 else (4, 8)
                stages = 4 if bk <= 32 else 3
                while stages > 2 and gemm_smem_bytes(bm, bn, bk, stages, a_bytes, b_bytes) > smem_limit:
                    stages -= 1
                if gemm_smem_bytes(bm, bn, bk, stages, a_bytes, b_bytes) > smem_limit:
                    continue  # does not fit even double-buffered
                for w in warps:
                    cfg = Config(bm, bn, bk, num_warps=w, num_stages=stages)
                    if cfg not in out:
                        out.append(cfg)
    return out[:MAX_CANDIDATES]


# --------------------------------------------------------------------------- #
# Convolutions: the heuristic and candidates of the tap x chunk implicit GEMMs
# --------------------------------------------------------------------------- #
def conv_chunk(C: int, taps: int = 1) -> int:
    """BLOCK_K (the channel chunk) for C channels per tap: the least zero padding of C, then the
    larger; fewer than 16 channels (a padded RGB stem's 8): several taps per chunk, up to 64."""
    if C < 16:
        return min(64, max(16, next_pow2(C * taps)))
    return min((64, 32, 16), key=lambda b: (-(-C // b) * b, -b))


# Conv forward / dgrad tiles (BLOCK_M, BLOCK_N, warps) and what they cost per thread on sm_90,
# read from the SASS of the forward's main loop (engine.perf.sass, `fusenet inspect --perf`) at
# BLOCK_K 64: instructions per loop trip, and instructions outside the loop (the epilogue with
# batch-norm statistics, mostly). The heuristic prices each tile with them.
# 128x256 is left out: its accumulator (128 registers a thread at 8 warps) spills on sm_80
# (164-252 bytes in forward and dgrad), where the same launches must compile clean.
CONV_TILES = {
    (128, 128, 8): (102, 1960),
    (128, 64, 4): (140, 1700),
    (64, 256, 8): (102, 1770),
    (64, 128, 4): (113, 1850),
    (128, 32, 4): (138, 1450),
    (256, 32, 4): (261, 2180),
    (64, 64, 4): (102, 1080),
    (64, 32, 4): (109, 910),
}
SMS = 132  # an H100 SXM's SMs: the heuristic sizes grids in waves of them
ISSUE_PER_CLOCK, TENSOR_MACS_PER_CLOCK, SMEM_BYTES_PER_CLOCK = 4, 2048, 128  # per SM (engine.perf.sass)


# Narrow tiles (BLOCK_N 64, issue-bound at BLOCK_K 64) take 128-channel chunks when the channels
# divide into them: the per-trip cost outside the loads (barriers, wgmma descriptors, the tap and
# mask arithmetic) is paid half as often. Read from the sm_90 SASS: a 128-channel trip costs
# ~1.75x a 64-channel one (128x64 dgrad 161 -> 277 instructions, 0.63 -> 0.54 issue/tensor;
# 64x64 forward 123 -> 198, 0.96 -> 0.77); sm_80 compiles them without spills (250 registers at
# 128x64). Wider tiles are tensor-bound already, and their 128-channel stages would not fit.
WIDE_CHUNK_TILES = {(128, 64, 4), (64, 64, 4)}
WIDE_CHUNK = 128


def _loop_scale(bk: int) -> float:
    """A trip's instructions at chunk `bk` over those at 64 (CONV_TILES is read at 64)."""
    return 0.55 + 0.45 * bk / 64 if bk <= 64 else 1.75 * bk / WIDE_CHUNK


def conv_chunks(C: int, taps: int, tile: tuple[int, int, int]) -> list[int]:
    """The chunks (BLOCK_K) a conv tile may take: conv_chunk's, and WIDE_CHUNK for the narrow
    tiles of WIDE_CHUNK_TILES when C is a multiple of it."""
    out = [conv_chunk(C, taps)]
    if tile in WIDE_CHUNK_TILES and C >= 16 and C % WIDE_CHUNK == 0:
        out.append(WIDE_CHUNK)
    return out


def conv_tile_cycles(M: int, N: int, C: int, taps: int, bm: int, bn: int, warps: int, bk: int | None = None) -> float:
    """Estimated SM clocks of a conv forward / dgrad on one GPU with (bm, bn, warps) tiles and
    chunk `bk` (default conv_chunk's): waves of programs x each program's max(issue, tensor,
    shared-memory) clocks per trip (each 64-row wgmma reads the B tile again), plus its epilogue."""
    bk = bk or conv_chunk(C, taps)
    loop, rest = CONV_TILES[(bm, bn, warps)]
    loop *= _loop_scale(bk)
    trips = -(-taps * C // bk) if C < 16 else taps * -(-C // bk)
    smem = (bm * bk + bm // 64 * bk * bn) * 2
    per_trip = max(bm * bn * bk / TENSOR_MACS_PER_CLOCK, loop * warps / ISSUE_PER_CLOCK, smem / SMEM_BYTES_PER_CLOCK)
    waves = -(-(-(-M // bm) * -(-N // bn)) // SMS)
    return waves * (trips * per_trip + rest * warps / ISSUE_PER_CLOCK)


def conv_heuristic(M: int, N: int, C: int, taps: int) -> Config:
    """The untuned GPU tile config of a conv forward / dgrad: the CONV_TILES tile and chunk
    (conv_chunks) with the fewest estimated clocks (conv_tile_cycles); within 5% of the
    cheapest, the larger tile, then the wider, then the longer chunk; 4 stages where they fit in
    160 KB."""
    nmax = max(32, next_pow2(N))
    opts = [(t, bk) for t in CONV_TILES if t[1] <= nmax for bk in conv_chunks(C, taps, t)]
    cost = {o: conv_tile_cycles(M, N, C, taps, *o[0], bk=o[1]) for o in opts}
    best = min(cost.values())
    # within 5% of the cheapest, the largest tile: it rereads its operands least (L2, HBM); then
    # the wider one (issue #11: a wider wgmma issues fewer instructions per multiply-add; the
    # pooled 256->256 @7x7 forward read 0.62 issue/tensor at 128x64x128, 0.53 at 64x128x64,
    # whose estimate is within 2%); then the longer chunk: fewer instructions per multiply-add
    (bm, bn, warps), bk = max((o for o in opts if cost[o] <= 1.05 * best),
                              key=lambda o: (o[0][0] * o[0][1], o[0][1], o[1], -cost[o]))
    stages = 4 if gemm_smem_bytes(bm, bn, bk, 4, 2, 2) <= 160 * 1024 else 3
    return Config(bm, bn, bk, num_warps=warps, num_stages=stages)


def conv_candidates(M: int, N: int, C: int, taps: int, dtype: torch.dtype, smem_limit: int,
                    default: Config | None = None) -> list[Config]:
    """Tile configs worth timing for a conv forward / dgrad: every CONV_TILES tile up to N's width
    with BLOCK_K 64 / 32 (up to C) and its conv_chunks, at the deepest of 4 or 3 stages that fits;
    `default` first."""
    a_bytes = torch.empty((), dtype=dtype).element_size()
    out: list[Config] = [default] if default is not None else []
    nmax = max(32, next_pow2(N))
    for tile in CONV_TILES:
        bm, bn, warps = tile
        if bn > nmax:
            continue
        bks = sorted({*conv_chunks(C, taps, tile), min(64, max(16, next_pow2(C)))}, reverse=True)
        for bk in bks:
            for stages in (4, 3):
                if gemm_smem_bytes(bm, bn, bk, stages, a_bytes, a_bytes) <= smem_limit:
                    cfg = Config(bm, bn, bk, num_warps=warps, num_stages=stages)
                    if cfg not in out:
                        out.append(cfg)
                    break
    return out[:MAX_CANDIDATES]


def wgrad_heuristic(C: int, N: int, P: int, taps: int, elem_bytes: int = 2, fused_dz: bool = False) -> Config:
    """The untuned GPU tile config of a conv wgrad (GEMM view: block_m channels of one tap,
    block_n output channels, block_k the pixel chunk). Read from the sm_90 SASS: each
    pixel of a trip costs ~10-25 instructions per thread whatever the tile, paid once
    per BLOCK_N output channels, so BLOCK_N is as wide as Cout allows, and the narrower
    the tile the longer its pixel chunk, to spread the per-trip overhead (barriers, wgmma
    descriptors, box stepping) over more multiply-adds: 64x64 tiles take 256 pixels
    (64->64 @15x15: 1.05 issue/tensor at 128, 0.66 at 256; 24->64 @31x31: 1.00 -> 0.82),
    128-wide take 128 (128x128: 0.64 -> 0.48; 64x128: 0.77 -> 0.54), 256-wide keep 64
    (0.39; 64x256x128 would need 240 KB of shared memory at 3 stages). All compile without spills
    on sm_80 (at most 218 registers), pixel boxes or flat. Not at 256 pixels: 16-wide tiles, and
    `fused_dz` (dz = act'(z) * dy (* scale), or a pooled dy expanded, is a tile in registers):
    lenet5's 64x16x256 with a fused ReLU needed 255 registers on sm_80 and spilled 1,096 B; both
    keep the chunks they had (128 pixels, 64 from 128 wide).
    fp32 operands (`elem_bytes` 4, no HGMMA) take 64-pixel chunks: at 128 the pixel-box
    variant needs 255 registers and spills 376 B on sm_90 (digits, 64x16 tiles)."""
    bm = 128 if C >= 128 else 64
    bn = min(max(16, next_pow2(N)), 256)
    if elem_bytes >= 4:
        bp = 64
    elif fused_dz or bn < 32:
        bp = 128 if bn < 128 else 64  # as before issue #11
    else:
        bp = 256 if bn <= 64 else 128 if bn <= 128 else 64  # 64x256x128: 240 KB at 3 stages
    warps = 8 if bm * bn >= 128 * 128 else 4
    stages = 4 if gemm_smem_bytes(bm, bn, bp, 4, elem_bytes, elem_bytes) <= 160 * 1024 else 3
    return Config(bm, bn, bp, num_warps=warps, num_stages=stages)


def wgrad_candidates(C: int, N: int, P: int, dtype: torch.dtype, smem_limit: int,
                     default: Config | None = None) -> list[Config]:
    """Tile configs worth timing for a conv wgrad; `default` first."""
    a_bytes = torch.empty((), dtype=dtype).element_size()
    out: list[Config] = [default] if default is not None else []
    for bm in (128, 64):
        if bm > max(64, next_pow2(C)):
            continue
        for bn in (128, 64, 256, 32):
            if bn > max(16, next_pow2(N)):
                continue
            for bp in (64, 128, 256, 32):
                warps = 8 if bm * bn >= 128 * 128 else 4
                for stages in (4, 3, 2):
                    if gemm_smem_bytes(bm, bn, bp, stages, a_bytes, a_bytes) <= smem_limit:
                        cfg = Config(bm, bn, bp, num_warps=warps, num_stages=stages)
                        if cfg not in out:
                            out.append(cfg)
                        break
    return out[:MAX_CANDIDATES]


def split_variants(split: int, max_split: int) -> list[int]:
    """Split-K counts worth timing around a heuristic's `split`: half, same, double (within 1..max_split)."""
    values = {max(1, split // 2), split, min(max_split, split * 2)}
    return sorted(v for v in values if 1 <= v <= max(1, max_split))


_smem_limits: dict[int, int] = {}


def smem_limit(device: torch.device) -> int:
    """Shared memory one program may use on `device` (opt-in maximum), DEFAULT_SMEM_LIMIT if unknown."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return DEFAULT_SMEM_LIMIT
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _smem_limits:
        props = torch.cuda.get_device_properties(index)
        _smem_limits[index] = int(getattr(props, "shared_memory_per_block_optin", 0) or DEFAULT_SMEM_LIMIT)
    return _smem_limits[index]


__all__ = ["Config", "epilogue_key", "gemm_smem_bytes", "gemm_candidates", "split_variants", "smem_limit",
           "conv_chunk", "conv_chunks", "conv_heuristic", "conv_candidates", "conv_tile_cycles", "CONV_TILES", "wgrad_heuristic",
           "wgrad_candidates",
           "DEFAULT_SMEM_LIMIT", "MAX_CANDIDATES"]
