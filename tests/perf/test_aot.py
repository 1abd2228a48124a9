"""Tier 2 of the design: kernels compiled for sm_80 and sm_90 without a GPU,
with registers, spills and matrix instructions read off the SASS.

CI compiles
- every variant of a whole training step of `digits`,
- the GEMM variants (conv, linear: forward, dgrad, wgrad) of every example in bf16,
- every @triton.jit kernel in engine/kernels (one variant each, fp32 and bf16),
  reached through the examples, a network using every other op, Adam/AdamW and
  an eval-mode backward; a kernel no test reaches fails the test.
The union of all variants of every example in every precision (~400, ~10 min on
2 cores) runs with `pytest -m aot_full`.
"""
from __future__ import annotations

from pathlib import Path

import importlib
import pkgutil

import pytest
import torch

import engine
import engine.kernels
from engine.kernels.activations import ACTIVATIONS
from engine.kernels.loss import cross_entropy
from engine.kernels.optim import Adam, AdamW
from engine.kernels.common import FOLD_ROWS
from engine.kernels.reduction import sum_partials
from engine.kernels.global_pool import global_avg_pool
from engine.perf.aot import compile_all, record_network
from engine.perf.step import network_step

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.cnn"))
TARGETS = ("sm_80", "sm_90")
GEMM_KERNELS = ("_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel", "_linear_fwd_kernel", "_linear_dgrad_kernel", "_linear_wgrad_kernel",
                "_conv_wgrad_folded_kernel")


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
    spills = [f"{r.name} [{r.tag}] {r.target}: {r.spills} B" for r in reports if r.spills]
    assert not no_mma, "GEMM kernels without matrix instructions:\n" + "\n".join(no_mma)
    assert not spills, "GEMM kernels that spill:\n" + "\n".join(spills)
    hopper = [r for r in reports if r.target == "sm_90"]
    assert any(r.mma.get("HGMMA") for r in hopper), "no wgmma (HGMMA) on sm_90 at all"


@pytest.mark.aot_full
def test_every_example_every_precision_compiles():
    specs = _variants(EXAMPLES, ("fp32", "tf32", "fp16", "bf16"))
    _assert_all_compile(compile_all(specs, TARGETS))


# Every op the examples do not use, in shapes that reach every kernel: a
# depthwise conv, a standalone add, every activation (chains of them, made from
# the activation table, so a new one is compiled too), avg pool with padding,
# blurpool, bilinear upsample, softmax, dropout after a pool and in conv and
# linear epilogues, a conv whose epilogue has both a residual and an activation
# (its backward materialises dz).
_NAMES = list(ACTIVATIONS)
ACTIVATION_CHAINS = "\n    ".join(" -> ".join(_NAMES[i:i + 4]) for i in range(0, len(_NAMES), 4))
ALL_OPS = f"""
network all_ops {{
    input 3x15x13
    e1 = conv 8 kernel=3 pad=1 -> bn -> leaky_relu slope=0.2
    conv 8 kernel=3 pad=1 groups=8 -> bn -> sigmoid
    add e1
    e2 = tanh
    conv 8 kernel=3 pad=1 -> add e2 -> relu -> dropout 0.1
    maxpool 3 stride=1 pad=1 -> bn
    avgpool 3 stride=2 pad=1 -> bn -> blurpool -> upsample 2 mode=bilinear
    conv 16 kernel=1x3 pad=0x1 stride=2 -> silu -> softmax
    global_avgpool
    dropout 0.2
    linear 10 -> gelu -> dropout 0.1
    scale 0.5 -> tanh
    {ACTIVATION_CHAINS}
}}
"""


def _kernel_functions() -> set[str]:
    names = set()
    for info in pkgutil.walk_packages(engine.kernels.__path__, "engine.kernels."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if name.endswith("_kernel") and type(value).__name__ in ("JITFunction", "InterpretedFunction"):
                names.add(name)
    return names


def _extra_runs(precision: str):
    model = engine.compile(ALL_OPS, precision=precision)
    x = torch.zeros(2, *model.input_shape)

    def optimizers():
        for cls in (Adam, AdamW):
            opt = cls(model.parameters(), lr=1e-3)
            cross_entropy(model(x), torch.zeros(2, dtype=torch.int64)).backward()
            opt.step()

    def eval_backward():  # batch norm in eval mode with gradients (not folded)
        model.eval()
        model(x).backward(torch.zeros(2, 10))
        model.train()

    def split_global_pool():  # an image larger than one GPU chunk: split + combine
        global_avg_pool(torch.zeros(1, 80, 80, 8, dtype=model.dtype))

    def step_loss_and_device_optimizers():  # per-pixel logits: partials + finish; Adam(W) in device mode
        from engine.kernels.clock import StepClock
        from engine.kernels.loss import cross_entropy_step

        clock = StepClock(x.device)
        cross_entropy_step(torch.zeros(4 * 64 * 64, 21, dtype=model.dtype), torch.zeros(4 * 64 * 64, dtype=torch.int64),
                           clock=clock)
        for cls in (Adam, AdamW):
            opt = cls(model.parameters(), lr=1e-3)
            opt.attach_clock(clock.counters, torch.full((4,), 1e-3), 0)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()

    def centernet_paths():  # detection: a batch too large for one program (partials + finish), the autograd
        # backward (the total's incoming gradient) and the decode peaks (examples/detect_shapes reaches the one-launch loss)
        from engine.kernels.centernet import centernet_forward, centernet_loss, heat_peaks, placeholder_targets

        z = torch.zeros(16, 40, 40, 7, dtype=model.dtype)
        t = placeholder_targets(16, (7, 40, 40), max_objects=8)
        centernet_forward(z, t.heatmap, t.index, t.size, t.offset, t.mask)
        zg = torch.zeros(2, 12, 12, 7, dtype=model.dtype, requires_grad=True)
        centernet_loss(zg, placeholder_targets(2, (7, 12, 12)))[3].backward()
        heat_peaks(zg.detach())

    def tall_partials():  # more partial rows than one finalize program should walk: folded first (batch norm:
        # the fold's last program per channel block finalises, counting the batch under a cumulative average)
        from engine.kernels.batchnorm import bn_train_forward

        sum_partials(torch.zeros(FOLD_ROWS + 1, 8), torch.zeros(FOLD_ROWS + 1, 8))
        x = torch.zeros(FOLD_ROWS + 1, 8, dtype=model.dtype)
        bn_train_forward(x, None, None, torch.zeros(8), torch.ones(8), momentum=None,
                         num_batches_tracked=torch.zeros((), dtype=torch.int64),
                         partials=(torch.zeros(FOLD_ROWS + 1, 8), torch.zeros(FOLD_ROWS + 1, 8)))

    def wide_wgrad_tiles():  # split wgrad partials too large for the kernel's own tail: summed by a second launch
        from engine.kernels.conv import conv2d_wgrad
        from engine.kernels.conv import wgrad as conv_wgrad

        tail_bytes, conv_wgrad.WGRAD_TAIL_BYTES = conv_wgrad.WGRAD_TAIL_BYTES, 0
        try:
            conv2d_wgrad(torch.zeros(4, 8, 8, 16, dtype=model.dtype), torch.zeros(4, 8, 8, 16, dtype=model.dtype),
                         (16, 16, 3, 3), stride=1, padding=1, dilation=1, groups=1, splits=3)
        finally:
            conv_wgrad.WGRAD_TAIL_BYTES = tail_bytes

    return [network_step(model, 2, True), network_step(model, 2, False), optimizers, eval_backward, split_global_pool,
            step_loss_and_device_optimizers, centernet_paths, tall_partials, wide_wgrad_tiles]


def _wide_tap_max_pool():
    """The max pool's int32 tap-index fallback (windows over 256 taps; forced here on a small
    window, the same code): forward and backward."""
    from engine.kernels.pool import max_pool2d

    x = torch.zeros(2, 9, 7, 8, requires_grad=True)
    max_pool2d(x, 3, 2, 1, wide_idx=True).backward(torch.zeros(2, 5, 4, 8))


def test_every_kernel_function_compiles_for_sm80_and_sm90():
    chosen = {}
    for precision in ("fp32", "bf16"):
        runs = [network_step(engine.compile(p, precision=precision), 2, t) for p in EXAMPLES for t in (True, False)]
        for run in runs + _extra_runs(precision):
            for spec in record_network(run):
                chosen.setdefault((spec.name, precision), spec)
    # every variant of the all-ops training step too: it exists to reach the
    # rarer fusion flags (dropout and residual+activation epilogues, ...)
    for spec in record_network(_extra_runs("fp32")[0]):
        chosen.setdefault((spec.name, spec.signature, spec.constexprs), spec)
    for spec in record_network(_wide_tap_max_pool):
        chosen.setdefault((spec.name, spec.signature, spec.constexprs), spec)
    missing = _kernel_functions() - {key[0] for key in chosen}
    assert not missing, f"kernels no compile test reaches: {sorted(missing)}"
    _assert_all_compile(compile_all(list(chosen.values()), TARGETS))


def test_conv_under_the_fused_optimizer_compiles_in_bf16():
    """The conv variants that read the optimizer's packed copies in bf16 (the interpreter runs
    fp32/fp16 only): padded input channels against masked weight rows (W_PAD) with taps per
    chunk (an RGB stem) and with one tap per chunk (20 channels stored as 24), and the wgrad
    into the flat gradient slot in PyTorch's layout, split (summed by the kernel's tail or by
    _sum_to_torch_kernel) and not."""
    from engine.kernels import optim
    from engine.kernels.conv import conv2d, conv2d_wgrad
    from engine.kernels.conv import weights as conv_weights
    from engine.kernels.conv import wgrad as conv_wgrad
    from engine.kernels.params import request_packed

    def run():
        for cin, cout, hw in ((3, 64, 32), (20, 64, 16)):
            w = torch.nn.Parameter(torch.zeros(cout, cin, 3, 3))
            request_packed(w, conv_weights.forward_packing(torch.bfloat16))
            request_packed(w, conv_weights.dgrad_packing(torch.bfloat16))
            opt = optim.SGD([w], lr=0.1)
            x = torch.zeros(8, hw, hw, cin, dtype=torch.bfloat16, requires_grad=True)
            y = conv2d(x, w, padding=1, act="relu")
            y.backward(torch.zeros_like(y))
            opt.step()
        # 1,024 pixels: enough 256-pixel chunks for three splits
        xs, dy = torch.zeros(4, 16, 16, 64, dtype=torch.bfloat16), torch.zeros(4, 16, 16, 64, dtype=torch.bfloat16)
        for splits, tail_bytes in ((1, None), (3, None), (3, 0)):
            saved = conv_wgrad.WGRAD_TAIL_BYTES
            conv_wgrad.WGRAD_TAIL_BYTES = saved if tail_bytes is None else tail_bytes
            try:
                conv2d_wgrad(xs, dy, (64, 64, 3, 3), stride=1, padding=1, dilation=1, groups=1, splits=splits,
                             out=torch.zeros(64 * 64 * 9))
            finally:
                conv_wgrad.WGRAD_TAIL_BYTES = saved

    specs = record_network(run)
    fwd = [dict(s.constexprs) for s in specs if s.name == "_conv_fwd_kernel"]
    assert {c["TPC"] > 1 for c in fwd if c["W_PAD"]} == {True, False}, fwd
    assert {s.name for s in specs} >= {"_conv_dgrad_kernel", "_conv_wgrad_kernel", "_sum_to_torch_kernel"}
    wgrads = {(dict(s.constexprs)["TORCH_LAYOUT"], dict(s.constexprs)["TAIL"])
              for s in specs if s.name == "_conv_wgrad_kernel"}
    # one split stores PyTorch's layout; several are summed into it by the last split of a tile or a second launch
    assert {(True, False), (False, True), (False, False)} <= wgrads, wgrads
    reports = compile_all([s for s in specs if s.name in GEMM_KERNELS], TARGETS)
    _assert_all_compile(reports)
    assert all(r.mma_count for r in reports), [(r.name, r.tag, r.target) for r in reports if not r.mma_count]
    # the W_PAD forwards do not spill (these stem-shaped wgrads spill on sm_80 as they did before
    # they stored PyTorch's layout: 160 B then, 140 B now)
    spills = [(r.name, r.tag, r.target, r.spills) for r in reports if r.spills and r.name != "_conv_wgrad_kernel"]
    assert not spills, spills


@pytest.mark.parametrize("pool_grad", ["kernel", "operand"])
def test_conv_with_a_fused_max_pool_compiles_in_bf16(pool_grad, monkeypatch):
    """The conv -> max pool kernels under the GPU tiles, bf16: the pooling epilogue (window-major
    rows, one-byte argmax, pooled statistics) and both backwards: the gather kernel, or the pooled
    gradient expanded in dgrad's and wgrad's operand loads (POOL > 0)."""
    import engine.kernels.conv.function as conv_function
    from engine.kernels.conv import conv2d

    monkeypatch.setattr(conv_function, "POOL_GRAD", pool_grad)

    def run():
        # airbench94's first pooled conv (24 -> 64 at 31x31: the pool drops a row and a column)
        w = torch.zeros(64, 24, 3, 3, requires_grad=True)
        x = torch.zeros(8, 31, 31, 24, dtype=torch.bfloat16, requires_grad=True)
        y, _ = conv2d(x, w, padding=1, pool=2, stats=True)
        y.backward(torch.zeros_like(y))

    specs = record_network(run)
    pooled = {s.name for s in specs if dict(s.constexprs).get("POOL", 0) > 0}
    assert pooled == ({"_conv_fwd_kernel"} if pool_grad == "kernel" else set(GEMM_KERNELS[:3])), pooled
    reports = compile_all([s for s in specs if s.name in GEMM_KERNELS], TARGETS)
    _assert_all_compile(reports)
    assert all(r.mma_count for r in reports), [(r.name, r.tag, r.target) for r in reports if not r.mma_count]
