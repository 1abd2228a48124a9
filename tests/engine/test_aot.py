"""Tier 2 of the design: every kernel variant compiled for sm_80 and sm_90
without a GPU, with registers, spills and matrix instructions read off the SASS.

CI compiles every variant of a whole training step of `digits` and the GEMM
variants (conv, linear: forward, dgrad, wgrad) of every example network in
bf16. The union over every example in every precision (~400 variants, ~10 min
on 2 cores) runs with `pytest -m aot_full`.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import engine
from engine.inspect import compile_all, record_network
from engine.inspect_cli import network_step

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.cnn"))
TARGETS = ("sm_80", "sm_90")
GEMM_KERNELS = ("_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel", "_linear_fwd_kernel", "_linear_dgrad_kernel", "_linear_wgrad_kernel")
# Known: the linear GEMMs still spill a little at their GPU tiles (backward up to
# ~200 B, forward with a saved pre-activation 48 B on sm_80); tracked in the
# issue notes. Every conv kernel must not spill.
MAY_SPILL = ("_linear_fwd_kernel", "_linear_dgrad_kernel", "_linear_wgrad_kernel")


def _variants(paths, precisions, training_modes=(True, False), only=None):
    seen, out = set(), []
    for path in paths:
        for prec in precisions:
            model = engine.compile(path, backend="triton", precision=prec)
            for training in training_modes:
                for spec in record_network(network_step(model, 64, training)):
                    if only and spec.name not in only:
                        continue
                    key = (spec.name, spec.signature, spec.constexprs, spec.num_warps, spec.num_stages)
                    if key not in seen:
                        seen.add(key)
                        out.append(spec)
    return out


def _assert_all_compile(reports):
    failed = [f"{r.name} [{r.tag}] {r.target}: {r.error}" for r in reports if not r.ok]
    assert not failed, "kernels that do not compile for the GPU:\n" + "\n".join(failed)


def test_digits_training_step_compiles_for_sm80_and_sm90():
    specs = _variants([p for p in EXAMPLES if p.stem == "digits"], ("fp32",))
    names = {s.name for s in specs}
    # forward, backward, loss and optimizer kernels are all in the step
    for expected in ("_conv_fwd_kernel", "_conv_wgrad_kernel", "_sgd_kernel"):
        assert expected in names, names
    reports = compile_all(specs, TARGETS)
    _assert_all_compile(reports)
    assert all(r.regs > 0 for r in reports)


def test_gemm_kernels_of_every_example_use_tensor_cores_and_do_not_spill():
    # training step only: the inference GEMMs are the same kernels with fewer flags
    specs = _variants(EXAMPLES, ("bf16",), training_modes=(True,), only=GEMM_KERNELS)
    assert {s.name for s in specs} >= {"_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel", "_linear_fwd_kernel"}
    reports = compile_all(specs, TARGETS)
    _assert_all_compile(reports)
    no_mma = [f"{r.name} [{r.tag}] {r.target}" for r in reports if r.mma_count == 0]
    spills = [f"{r.name} [{r.tag}] {r.target}: {r.spills} B" for r in reports if r.spills and r.name not in MAY_SPILL]
    assert not no_mma, "GEMM kernels without matrix instructions:\n" + "\n".join(no_mma)
    assert not spills, "GEMM kernels that spill:\n" + "\n".join(spills)
    hopper = [r for r in reports if r.target == "sm_90"]
    assert any(r.mma.get("HGMMA") for r in hopper), "no wgmma (HGMMA) on sm_90 at all"


@pytest.mark.aot_full
def test_every_example_every_precision_compiles():
    specs = _variants(EXAMPLES, ("fp32", "tf32", "fp16", "bf16"))
    _assert_all_compile(compile_all(specs, TARGETS))
