"""The step audit: launches and tensor bytes of one training step, from a dry run
on the meta device. Pinned per example so they cannot creep up: a fusion that
stops applying, or a new per-step copy, fails here and must be looked at."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine
from engine.perf.audit import audit_eager, audit_fusenet, format_audit

ROOT = Path(__file__).resolve().parents[2]

# (Triton launches, torch device ops, bytes) of a bf16 training step at the spec's batch
PINS = {
    "digits": (34, 29, 8273672),
    "lenet5": (31, 28, 15158900),
    "resnet_small": (154, 134, 309322032),
    "unet_tiny": (48, 56, 204263956),
    "airbench94": (94, 71, 4055879480),
    "resnet9": (107, 87, 6295419792),
}


@pytest.mark.parametrize("name", PINS)
def test_step_audit_is_pinned(name):
    spec = engine.load(ROOT / "examples" / f"{name}.cnn")
    audit = audit_fusenet(spec, spec.train.batch, "bf16")
    launches, ops, nbytes = PINS[name]
    assert (audit.triton_launches, sum(audit.torch_ops.values())) == (launches, ops), (
        f"{name}: {audit.triton_launches} Triton launches and {sum(audit.torch_ops.values())} torch ops per step, "
        f"pinned {launches} and {ops}: {dict(audit.torch_ops)}")
    assert audit.bytes <= nbytes, f"{name}: {audit.bytes} bytes per step, pinned at most {nbytes}"
    assert not audit.host_syncs, f"{name}: the step reads device values on the host: {dict(audit.host_syncs)}"


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
