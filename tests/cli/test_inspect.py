"""The launch recorder and the ahead-of-time sm_80/sm_90 compile check (engine.perf.aot).

Toy kernels are defined here at module level (the compile workers re-import this
module by name). They run on the CPU through `launch` under the interpreter,
are checked against torch, then compiled for sm_80 and sm_90 with Triton's
real compiler and the ptxas shipped in its wheel (no GPU needed).
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import triton
import triton.language as tl

import engine.device
from engine.perf import aot as fi
from engine.kernels.activations import apply_act
from engine.kernels.launch import _make_spec, is_dry_run, launch, recording

DEV = engine.device.DEVICE


# ----------------------------------------------------------------------------- toy kernels


@triton.jit
def _toy_gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     ALLOW_TF32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    rk = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N] fp32 accumulator
    for k0 in range(0, K, BLOCK_K):
        ka = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + ka[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (ka[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
        b = tl.load(b_ptr + ka[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(ka[:, None] < K) & (rn[None, :] < N), other=0.0)  # [BLOCK_K, BLOCK_N]
        if ALLOW_TF32:
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _toy_ew_kernel(x_ptr, bias_ptr, out_ptr, n, alpha, negate,
                   HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr = 128):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)  # [BLOCK] fp32
    y = x * alpha
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = apply_act(y, ACT, 0.0)
    y = tl.where(negate, -y, y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _toy_bad_kernel(x_ptr, BLOCK: tl.constexpr):
    # tl.arange needs a power-of-two range: BLOCK=100 fails to compile.
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.zeros((BLOCK,), dtype=tl.float32))


GEMM_TILES = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)


def toy_gemm(a: torch.Tensor, b: torch.Tensor, allow_tf32: bool) -> torch.Tensor:
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(M, GEMM_TILES["BLOCK_M"]), triton.cdiv(N, GEMM_TILES["BLOCK_N"]))
    launch(_toy_gemm_kernel, grid, a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
           c.stride(0), c.stride(1), ALLOW_TF32=allow_tf32, num_warps=4, num_stages=3, **GEMM_TILES)
    return c


def toy_ew(x, bias, alpha=2.0, negate=False, act=1, block=None):
    """Launcher in the fusenet style: big tiles under the interpreter, GPU tiles otherwise."""
    if block is None:
        block = 1024 if engine.device.INTERPRETED else 256
    out = torch.empty_like(x)
    n = x.numel()
    launch(_toy_ew_kernel, (triton.cdiv(n, block),), x, bias, out, n, alpha, negate,
           HAS_BIAS=bias is not None, ACT=act, BLOCK=block)
    return out


def _spec(specs, name, **constexprs):
    found = [s for s in specs if s.name == name and all(dict(s.constexprs).get(k) == v for k, v in constexprs.items())]
    assert len(found) == 1, (name, constexprs, specs)
    return found[0]


# ----------------------------------------------------------------------------- recording


def test_record_gemm_interpreted_and_correct():
    a16 = torch.randn(80, 48, dtype=torch.float16, device=DEV)
    b16 = torch.randn(48, 72, dtype=torch.float16, device=DEV)
    a32, b32 = a16.float(), b16.float()
    with recording() as specs:
        c16 = toy_gemm(a16, b16, allow_tf32=False)
        c32 = toy_gemm(a32, b32, allow_tf32=True)
        toy_gemm(a16, b16, allow_tf32=False)  # identical launch: deduplicated
    ref = a32.double() @ b32.double()
    torch.testing.assert_close(c16.double(), ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(c32.double(), ref, atol=2e-2, rtol=5e-3)
    assert [s.name for s in specs] == ["_toy_gemm_kernel", "_toy_gemm_kernel"]
    s16 = _spec(specs, "_toy_gemm_kernel", ALLOW_TF32=False)
    sig = dict(s16.signature)
    assert sig["a_ptr"] == "*fp16" and sig["b_ptr"] == "*fp16" and sig["c_ptr"] == "*fp32"
    assert sig["M"] == sig["N"] == sig["K"] == "i32"
    # unit strides are specialised to constexpr 1, as Triton's JIT does on a GPU
    consts = dict(s16.constexprs)
    assert consts["stride_ak"] == 1 and consts["stride_bn"] == 1 and consts["stride_cn"] == 1
    assert consts["BLOCK_M"] == 64 and consts["BLOCK_N"] == 64 and consts["BLOCK_K"] == 32
    assert "stride_ak" not in sig
    assert (s16.num_warps, s16.num_stages) == (4, 3)
    # 48 and 64-byte aligned CPU tensors are divisible by 16; 80 is, 72 is not
    assert {"a_ptr", "b_ptr", "c_ptr", "M", "K"} <= set(s16.divisible) and "N" not in s16.divisible
    s32 = _spec(specs, "_toy_gemm_kernel", ALLOW_TF32=True)
    assert dict(s32.signature)["a_ptr"] == "*fp32"


# The toy kernel takes a Python bool as a runtime argument (the `u1` case of the
# recorder); Triton 3.6's interpreter cannot run that (fixed in 3.7). No fusenet
# kernel takes one: the kernel tests pass on 3.6.
BOOL_ARG_IN_INTERPRETER = pytest.mark.skipif(
    engine.device.INTERPRETED and engine.device._version(triton.__version__) < (3, 7),
    reason="Triton < 3.7's interpreter rejects a bool runtime argument, which this toy kernel takes")


@BOOL_ARG_IN_INTERPRETER
def test_record_elementwise_none_defaults_bool_and_dtypes():
    x = torch.randn(300, device=DEV)
    bias = torch.randn(300, device=DEV)
    block = 1024 if engine.device.INTERPRETED else 256
    with recording() as specs:
        y1 = toy_ew(x, None, alpha=2.0, act=1)  # relu(2x)
        y2 = toy_ew(x, bias, alpha=0.5, negate=True, act=0)  # -(x/2 + bias)
        y3 = toy_ew(x.half(), None, alpha=1.0, act=1)
        launch(_toy_ew_kernel, (1,), x, None, torch.empty_like(x), 300, 2.0, False, HAS_BIAS=False, ACT=1,
               BLOCK=block)  # same as the first launch, BLOCK given: dedup
    torch.testing.assert_close(y1, torch.relu(2 * x))
    torch.testing.assert_close(y2, -(0.5 * x + bias))
    torch.testing.assert_close(y3, torch.relu(x.half()), atol=1e-3, rtol=1e-3)
    assert len(specs) == 3, specs
    s1 = _spec([s for s in specs if dict(s.signature)["x_ptr"] == "*fp32"], "_toy_ew_kernel", HAS_BIAS=False,
               ACT=1, BLOCK=block)
    c1 = dict(s1.constexprs)
    assert "bias_ptr" in c1 and c1["bias_ptr"] is None  # None pointer -> constexpr
    assert dict(s1.signature) == {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "alpha": "fp32",
                                  "negate": "u1"}
    s2 = _spec(specs, "_toy_ew_kernel", HAS_BIAS=True)
    assert dict(s2.signature)["bias_ptr"] == "*fp32"
    s3 = [s for s in specs if dict(s.signature).get("x_ptr") == "*fp16"]
    assert len(s3) == 1


def test_record_defaults_big_ints_and_all_dtypes_without_running():
    with recording(dry_run=True) as specs:
        assert is_dry_run()
        # BLOCK left at its default; n > 2**31; n == 1 is specialised
        launch(_toy_ew_kernel, (1,), torch.empty(8), None, torch.empty(8), 2**33, 1.5, True, HAS_BIAS=False, ACT=0)
        launch(_toy_ew_kernel, (1,), torch.empty(8), None, torch.empty(8), 1, 1.5, True, HAS_BIAS=False, ACT=0)
        for dt in (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int8, torch.uint8, torch.bool,
                   torch.int64, torch.float64):
            t = torch.zeros(4, dtype=dt)
            launch(_toy_ew_kernel, (1,), t, None, t, 7, 1.0, False, HAS_BIAS=False, ACT=0)
    assert not is_dry_run()
    big = specs[0]
    assert dict(big.constexprs)["BLOCK"] == 128  # default applied
    assert dict(big.signature)["n"] == "i64"
    assert "n" in big.divisible
    one = specs[1]
    assert dict(one.constexprs)["n"] == 1 and "n" not in dict(one.signature)
    ptr_types = [dict(s.signature)["x_ptr"] for s in specs[2:]]
    assert ptr_types == ["*fp32", "*fp16", "*bf16", "*i32", "*i8", "*u8", "*u1", "*i64", "*fp64"]


@BOOL_ARG_IN_INTERPRETER
def test_dry_run_does_not_execute_and_nests():
    x = torch.randn(64, device=DEV)
    out = torch.full((64,), 7.0, device=DEV)
    with recording() as outer:
        with recording(dry_run=True) as inner:
            launch(_toy_ew_kernel, (1,), x, None, out, 64, 1.0, False, HAS_BIAS=False, ACT=0)
        assert len(inner) == 1
        assert torch.all(out == 7.0)  # untouched: the kernel did not run
        launch(_toy_ew_kernel, (1,), x, None, out, 64, 1.0, False, HAS_BIAS=False, ACT=0)  # runs again
    torch.testing.assert_close(out, x)
    assert len(outer) == 1  # the inner record is passed up and deduplicated


def test_gpu_tiles_context():
    before = engine.device.INTERPRETED
    with fi.gpu_tiles():
        assert not engine.device.INTERPRETED
    assert engine.device.INTERPRETED == before


def test_recorder_matches_tritons_own_binder():
    """Our recorded types/constexprs equal what Triton's JIT binder computes for a JITFunction."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    for kernel, args, kwargs in [
        (_toy_ew_kernel, (torch.empty(8), None, torch.empty(8)[1:], 2**40, 0.5, True), dict(HAS_BIAS=False, ACT=2)),
        (_toy_ew_kernel, (torch.empty(8, dtype=torch.bfloat16), torch.empty(8), torch.empty(8), 1, 1.0, False),
         dict(HAS_BIAS=True, ACT=0, BLOCK=64)),
        (_toy_gemm_kernel, (torch.empty(4, dtype=torch.float16), torch.empty(4, dtype=torch.float16),
                            torch.empty(4), 64, 33, 48, 48, 1, 33, 1, 2**31, 1),
         dict(ALLOW_TF32=True, **GEMM_TILES)),
    ]:
        jf = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
        binder = create_function_from_signature(jf.signature, jf.params, BaseBackend)
        bound, specialization, _ = binder(*args, **kwargs)
        want_sig = {p.name: ty for p, (ty, _) in zip(jf.params, specialization) if ty != "constexpr"}
        want_const = {p.name: bound[p.name] for p, (ty, _) in zip(jf.params, specialization) if ty == "constexpr"}
        want_div = {p.name for p, (ty, attr) in zip(jf.params, specialization)
                    if ty != "constexpr" and isinstance(attr, str) and "D" in attr}
        for k in (kernel, jf):  # the interpreter's InterpretedFunction and a real JITFunction
            spec = _make_spec(k, args, kwargs)
            assert dict(spec.signature) == want_sig
            assert dict(spec.constexprs) == want_const
            assert set(spec.divisible) == want_div
            assert spec.name == kernel.fn.__name__


# ----------------------------------------------------------------------------- compiling


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Record the toy variants (GPU tiles, dry run) and compile them all once for sm_80 and sm_90."""
    old = os.environ.get("FUSENET_INSPECT_CACHE")
    os.environ["FUSENET_INSPECT_CACHE"] = str(tmp_path_factory.mktemp("inspect_cache"))
    fi.clear_cache()
    try:
        a16, b16 = torch.empty(128, 64, dtype=torch.float16), torch.empty(64, 128, dtype=torch.float16)
        x, bias = torch.empty(4096), torch.empty(4096)
        with fi.gpu_tiles(), recording(dry_run=True) as specs:
            toy_gemm(a16, b16, allow_tf32=False)
            toy_gemm(a16.float(), b16.float(), allow_tf32=True)
            toy_ew(x, None)
            toy_ew(x, bias, act=3)
            launch(_toy_bad_kernel, (1,), x, BLOCK=100)
        t0 = time.time()
        reports = fi.compile_all(specs, ("sm_80", "sm_90"), jobs=2)
        elapsed = time.time() - t0
        yield specs, reports, elapsed
    finally:
        fi.clear_cache()
        if old is None:
            os.environ.pop("FUSENET_INSPECT_CACHE", None)
        else:
            os.environ["FUSENET_INSPECT_CACHE"] = old


def _rep(reports, name, target, **constexprs):
    found = [r for r in reports if r.name == name and r.target == target
             and all(dict(r.spec.constexprs).get(k) == v for k, v in constexprs.items())]
    assert len(found) == 1, (name, target, constexprs)
    return found[0]


def test_compile_all_shape_and_errors(compiled):
    specs, reports, elapsed = compiled
    print(f"\ncompiled {len(reports)} variants in {elapsed:.1f}s")
    print(fi.format_report(reports))
    assert len(specs) == 5 and len(reports) == 10
    assert [r.target for r in reports[:2]] == ["sm_80", "sm_90"]
    bad = [r for r in reports if r.name == "_toy_bad_kernel"]
    assert len(bad) == 2 and all(r.error for r in bad)
    assert all(r.ok for r in reports if r.name != "_toy_bad_kernel"), [r.error for r in reports]
    with pytest.raises(RuntimeError, match="_toy_bad_kernel"):
        fi.compile_specialization(bad[0].spec, "sm_90")


@pytest.mark.parametrize("tf32", [False, True], ids=["fp16", "tf32"])
def test_gemm_uses_tensor_cores(compiled, tf32):
    _, reports, _ = compiled
    r80 = _rep(reports, "_toy_gemm_kernel", "sm_80", ALLOW_TF32=tf32)
    r90 = _rep(reports, "_toy_gemm_kernel", "sm_90", ALLOW_TF32=tf32)
    print(f"\nsm_80 MMA: {r80.mma}  sm_90 MMA: {r90.mma}")
    assert r80.mma.get("HMMA", 0) > 0, r80.mma  # mma.sync on Ampere
    assert r90.mma.get("HGMMA", 0) > 0, r90.mma  # wgmma on Hopper (64x64 tile, 4 warps)
    for r in (r80, r90):
        assert r.regs > 0
        assert r.spills == 0
        assert r.smem > 0
        assert r.instructions > r.mma_count > 0


def test_elementwise_has_no_mma(compiled):
    _, reports, _ = compiled
    for target in ("sm_80", "sm_90"):
        for has_bias in (False, True):
            r = _rep(reports, "_toy_ew_kernel", target, HAS_BIAS=has_bias)
            assert dict(r.spec.constexprs)["BLOCK"] == 256  # the GPU tile was recorded
            assert r.mma_count == 0 and not r.mma
            assert r.regs > 0 and r.spills == 0 and r.instructions > 0
            assert r.opcodes.get("LDG", 0) > 0 and r.opcodes.get("STG", 0) > 0


def test_caches(compiled):
    specs, reports, _ = compiled
    # in-process cache: same objects, no compile
    t0 = time.time()
    again = fi.compile_all(specs[:4], ("sm_80", "sm_90"))
    one = fi.compile_specialization(specs[0], "sm_80")
    assert time.time() - t0 < 1.0
    assert one is reports[0]
    assert [id(r) for r in again] == [id(r) for r in reports[:8]]
    # disk cache: survives clearing the in-process one
    assert len([f for f in os.listdir(os.environ["FUSENET_INSPECT_CACHE"]) if f.endswith(".json")]) == 8
    fi.clear_cache()
    t0 = time.time()
    disk = fi.compile_all(specs[:4], ("sm_80", "sm_90"))
    assert time.time() - t0 < 1.0
    assert all(r.cached for r in disk)
    assert [(r.regs, r.smem, r.mma, r.instructions) for r in disk] == \
        [(r.regs, r.smem, r.mma, r.instructions) for r in reports[:8]]


def test_inspect_network_records_gpu_tiles_dry(compiled):
    _, reports, _ = compiled
    x = torch.zeros(4096)
    outs = []

    def net():
        outs.append(toy_ew(x, None))

    t0 = time.time()
    reps = fi.inspect_network(net, targets=("sm_80", "sm_90"))
    assert time.time() - t0 < 1.0  # same variant as in the fixture: served from the cache
    assert [r.target for r in reps] == ["sm_80", "sm_90"]
    assert all(dict(r.spec.constexprs)["BLOCK"] == 256 for r in reps)
    ref = _rep(reports, "_toy_ew_kernel", "sm_80", HAS_BIAS=False)
    assert (reps[0].regs, reps[0].instructions, reps[0].opcodes) == (ref.regs, ref.instructions, ref.opcodes)
    assert engine.device.INTERPRETED  # restored


def test_format_report(compiled):
    _, reports, _ = compiled
    text = fi.format_report(reports)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["kernel", "variant", "target"]
    for name in ("_toy_gemm_kernel", "_toy_ew_kernel", "_toy_bad_kernel"):
        assert name in text
    assert "sm_80" in text and "sm_90" in text and "HGMMA:" in text and "HMMA:" in text
    assert "ERROR" in text and "ALLOW_TF32" in text and "BLOCK_M=64" in text
    assert len(lines) == 2 + len(reports) + 1
    # the variant tag lists the declared constexprs, not runtime args the JIT specialised (unit strides, None)
    assert "!HAS_BIAS ACT=1 BLOCK=256" in text and "stride_ak" not in text and "bias_ptr" not in text
    assert lines[-1].startswith("10 variants: 2 failed to compile, 0 spill, 4 use tensor cores")


def test_constexpr_tag():
    assert fi.constexpr_tag([("HAS_BIAS", True), ("HAS_RES", False), ("ACT", 1), ("b", None), ("s", 0.5)]) == \
        "HAS_BIAS !HAS_RES ACT=1 b=- s=0.5"
    assert fi.constexpr_tag([("tl", tl.float16)]) == "tl=fp16"


# ----------------------------------------------------------------------------- the compile worker


def test_worker_is_a_module_run_with_python_m():
    import pickle
    import subprocess
    import sys

    from engine.perf import aot_worker

    r = subprocess.run([sys.executable, "-m", "engine.perf.aot_worker"], input=pickle.dumps(
        {"sys_path": sys.path, "jobs": []}), capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b""
    # a job naming a kernel that is not a module-level @triton.jit is reported against that job
    job = {"module": "__main__", "qualname": "k", "params": [], "signature": {}, "constexprs": {},
           "divisible": [], "num_warps": 4, "num_stages": 3, "arch": 90}
    (status, message), = aot_worker.run_worker([job], timeout=120)
    assert status == "error" and "kernel is defined in __main__" in message


def test_sass_instruction_count():
    from engine.perf.aot_worker import count_instructions

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @!PT HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0020*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;
        /*0030*/                   EXIT ;
        /*0040*/                   BRA 0x40;
        /*0050*/                   NOP;
        /*0060*/                   NOP;
    """
    n, hist, mma = count_instructions(sass)
    assert n == 4 and hist == {"MOV": 1, "HMMA": 1, "HGMMA": 1, "EXIT": 1} and mma == {"HMMA": 1, "HGMMA": 1}
