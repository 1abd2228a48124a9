"""The step audit: launches and tensor bytes of one training step, from a dry run
on the meta device. Pinned per example so they cannot creep up: a fusion that
stops applying, or a new per-step copy, fails here and must be looked at.

The audited step is the one `fusenet train` runs (engine.training.step.TrainStep's
body, the spec's optimizer), in its steady state (after one unaudited step)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine
from engine.ir.ops import Family
from engine.perf.audit import audit_eager, audit_fusenet, format_audit

ROOT = Path(__file__).resolve().parents[2]

# (Triton launches, torch device ops, bytes) of a bf16 training step at the spec's batch.
# No torch op touches a weight: convs and linears read the fused optimizer's packed copies
# and write their weight gradients into its flat buffer (engine/kernels/params.py). The ops
# left: lenet5's flatten (an NHWC -> NCHW copy) and its max-pool backward's gradient clone;
# in unet_tiny, autograd's handling of the concat producers' in-place writes.
# The backward hand-offs (engine/kernels/batchnorm/backward.py) took a batch norm's reduce launch
# wherever a conv alone reads its output (its dgrad epilogue makes the sums) and a fused pool's
# gather kernel wherever a bn reads the pooled output (the bn's backward writes the full-resolution
# gradient): airbench94 59 -> 50 launches, 3.126 -> 2.850 GB. Then a conv's last programs finish the
# statistics of the bn it feeds (bn_stats_tail: no finalize launch): 50 -> 43, 2.835 GB; and a max
# pool's backward gather makes the sums of a bn before it: 43 -> 42, 2.832 GB. A fused pool's
# full-resolution gradient stops at the rows the pool read (conv2d_dgrad/wgrad `extent`): 2.740 GB.
# The stem's bn leaves its dx to the stem's folded wgrad, which takes it from dz, X^T X and X^T 1
# (BnApplyLink): 42 -> 41 launches, 2.599 GB.
# The stem's wgrad (wgrad_folded) is one program a split: 128 splits of 288-float partials where the
# per-tap kernel had 30 of 768 (+55 KB; resnet_small's folded 1x1 wgrads -9 KB).
PINS = {
    "digits": (19, 0, 5117096),
    "lenet5": (22, 2, 12514320),
    "resnet_small": (95, 0, 228080308),
    "unet_tiny": (35, 7, 179931516),
    "airbench94": (41, 0, 2598568872),
    "resnet9": (60, 0, 5357058552),
    "detect_shapes": (30, 0, 23622860),
}


def _audit(name: str, **kw):
    spec = engine.load(ROOT / "examples" / f"{name}.cnn")
    return spec, audit_fusenet(spec, spec.train.batch, "bf16", **kw)


@pytest.mark.parametrize("name", PINS)
def test_step_audit_is_pinned(name):
    _, audit = _audit(name)
    launches, ops, nbytes = PINS[name]
    assert (audit.triton_launches, sum(audit.torch_ops.values())) == (launches, ops), (
        f"{name}: {audit.triton_launches} Triton launches and {sum(audit.torch_ops.values())} torch ops per step, "
        f"pinned {launches} and {ops}: {dict(audit.torch_ops)}")
    assert audit.bytes <= nbytes, f"{name}: {audit.bytes} bytes per step, pinned at most {nbytes}"
    assert not audit.host_syncs, f"{name}: the step reads device values on the host: {dict(audit.host_syncs)}"
    assert not {"copy_", "zeros", "ones_like", "fill_"} & set(audit.torch_ops) or name == "unet_tiny", (
        f"{name}: bookkeeping ops are back (gradient gathers, zero-filled gradients, loss seeds): "
        f"{dict(audit.torch_ops)}")
    assert "_to_copy" not in audit.torch_ops, (
        f"{name}: a step casts tensors (a weight repacked per step instead of read from the optimizer's "
        f"packed copy?): {dict(audit.torch_ops)}")


def _floor(spec) -> int:
    """The fewest launches a training step of `spec` can take with its plan: one forward launch
    per kernel group that computes (not a view, not a scale the loss absorbs), one backward launch
    per group with a trainable layer, the loss and one optimizer launch."""
    from engine.runtime.fused import TritonNetwork

    plan = TritonNetwork(spec, precision="bf16").kernel_plan()
    groups = [g for g in plan if g.family is not Family.FLATTEN]
    if groups and groups[-1].family is Family.SCALE:
        groups = groups[:-1]
    trainable = [g for g in groups if spec.graph.node(g.anchor).name]
    return len(groups) + len(trainable) + 2


@pytest.mark.parametrize("name", PINS)
def test_launches_between_the_plans_floor_and_the_pinned_ceiling(name):
    """Fewer launches than the plan's floor means kernels silently went missing (a dry
    run that stopped recording, a skipped backward); more than the pin means a fusion
    stopped applying or a per-step copy came back."""
    spec, audit = _audit(name)
    ceiling = sum(PINS[name][:2])
    assert _floor(spec) <= audit.launches <= ceiling, (name, _floor(spec), audit.launches, ceiling)


@pytest.mark.parametrize("plan_pass", ["plan_bn_stats", "plan_backward_links"])
def test_the_ceiling_catches_a_fusion_that_stops_applying(plan_pass, monkeypatch):
    """Without the batch-norm statistics fusion (conv epilogues, max pools), or without the backward
    hand-offs (the bn sums from a conv's dgrad), the same step launches more."""
    from engine.passes import pipeline

    monkeypatch.setattr(pipeline, "PLAN_PASSES", tuple(p for p in pipeline.PLAN_PASSES if p[0] != plan_pass))
    _, audit = _audit("digits")
    assert audit.launches > sum(PINS["digits"][:2])


def test_the_audit_runs_the_training_step_of_fusenet_train(monkeypatch):
    from engine.training.step import TrainStep

    calls = []
    real = TrainStep.body
    monkeypatch.setattr(TrainStep, "body", lambda self, x, y: (calls.append(self.backend), real(self, x, y))[1])
    _audit("digits")
    assert calls == ["triton", "triton"]  # one unaudited warm-up step, one audited


def test_audit_counts_device_work_and_host_syncs():
    """A hand-made step: one op per kind the audit tells apart."""
    from engine.perf.audit import StepAudit, _DeviceOps

    audit = StepAudit("probe")
    a = torch.empty(4, 8, device="meta")
    with _DeviceOps(audit):
        b = a.view(8, 4)  # a view: no work
        c = (b * 2).clone()  # two device ops
        _ = float(c.sum())  # a device op and a host sync
        torch.randint(0, 5, (1,)).item()  # CPU: host work, not counted
    assert dict(audit.torch_ops) == {"mul": 1, "clone": 1, "sum": 1}
    assert sum(audit.host_syncs.values()) == 1
    assert audit.torch_bytes == (128 + 128) + (128 + 128) + (128 + 4)  # in + out of mul, clone, sum


def test_eager_audit_counts_pytorch_ops_and_the_table_prints():
    spec = engine.load(ROOT / "examples" / "digits.cnn")
    fused, eager = audit_fusenet(spec, 8, "fp32"), audit_eager(spec, 8, "fp32")
    assert eager.triton_launches == 0 and eager.torch_ops["convolution"] == 2
    text = format_audit([fused, eager], "digits")
    assert "fusenet" in text and "PyTorch eager" in text and "host syncs" in text


def test_bench_without_a_gpu_prints_the_step_audit(capsys):
    from engine.cli.main import main

    assert main(["bench", str(ROOT / "examples" / "digits.cnn"), "--no-inspect"]) == 0
    out = capsys.readouterr().out
    assert "step audit" in out and "PyTorch eager" in out and "Triton kernels" in out
