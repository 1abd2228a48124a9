"""The fusion plan on its own: golden plans of every example, kernel counts, and
the kernels a real training step launches against the ones the plan lists.

Golden files (tests/passes/golden/NAME.MODE.txt) hold `fusenet check --kernels`'s
plan: each kernel group, what it fuses, and the kernels it launches forward and
backward on a GPU (a dry run at the spec's batch). A change to fusion or to a
kernel family's launches shows up as a text diff; regenerate them with
FUSENET_UPDATE_GOLDEN=1 after checking the diff is what you meant.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

import engine
from engine.kernels.centernet import placeholder_targets
from engine.kernels.launch import launch_log
from engine.kernels.optim import SGD
from engine.runtime.launches import format_launches, record_launches
from engine.training.step import TrainStep

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden")
EXAMPLES = ["digits", "lenet5", "resnet_small", "unet_tiny", "airbench94", "resnet9", "detect_shapes"]

# Kernel launches per training step and per inference forward, on a GPU at the
# spec's batch (tinygrad's check_schedule in spirit): a fusion that silently
# stops applying, or a family that starts launching more, fails here first.
# The training step is the one `fusenet train` runs (its loss is one launch; a trailing
# constant scale runs inside it).
LAUNCHES = {
    "digits": (19, 7),
    "lenet5": (22, 7),
    "resnet_small": (95, 29),
    "unet_tiny": (35, 13),
    "airbench94": (42, 21),
    "resnet9": (60, 22),
    "detect_shapes": (30, 12),
}


def _model(name: str):
    return engine.compile(ROOT / "examples" / f"{name}.cnn")


@pytest.mark.parametrize("mode", ["training", "inference"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_golden_plan(name, mode):
    model = _model(name)
    launches = record_launches(model, model.train_config.batch, training=mode == "training")
    text = format_launches(launches) + "\n"
    path = GOLDEN / f"{name}.{mode}.txt"
    if os.environ.get("FUSENET_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"no golden plan {path.name}; run with FUSENET_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(), f"the plan of {name} ({mode}) changed; diff it against {path}"
    assert not launches.unattributed, f"launches no group made: {launches.unattributed}"
    assert launches.total() == LAUNCHES[name][0 if mode == "training" else 1]


def _real_step(model, batch: int) -> list[str]:
    """The kernels one real (interpreted, executed) training step launches, in order."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model.input_shape, generator=gen)
    out = model.output_shape
    det = model.train_config.detection
    if det is not None:  # loss centernet
        y = placeholder_targets(batch, out)
    else:
        y = torch.zeros((batch,) if len(out) == 1 else (batch, *out[1:]), dtype=torch.int64)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    step = TrainStep(model, opt, backend="triton", device=x.device, lr_of=lambda k: 0.1, total_steps=1,
                     label_smoothing=0.1, detection=det)
    with launch_log() as log:
        step.body(x, y)
    step.close()
    return list(log)


@pytest.mark.parametrize("name", EXAMPLES)
def test_a_real_step_launches_exactly_what_the_plan_lists(name):
    """Run one training step for real (interpreter tiles, batch 1) and compare its
    launches with the plan's per-group lists recorded for the same tiles."""
    model = _model(name)
    planned = record_launches(model, 1, training=True, gpu_tiles=False)
    assert Counter(_real_step(model, 1)) == Counter(planned.all())


STATS_SPEC = """
network stats_sources {
    input 3x13x11
    conv 8 kernel=3 pad=1 bias=false -> maxpool 3 stride=2 pad=1 -> bn -> relu
    conv 8 kernel=3 pad=1 -> bn -> relu -> maxpool 2
    t = maxpool 2 stride=1
    bn -> add t
    avgpool 2 -> bn
    global_avgpool
    linear 4
}
"""


def _stats_of(plan) -> dict[str, str]:
    """{producer op (first seen, numbered): op of the node whose statistics it emits}."""
    out, seen = {}, Counter()
    for grp in plan:
        op = plan.graph.node(grp.anchor).op
        seen[op] += 1
        if grp.epilogue.stats is not None:
            out[f"{op}{seen[op]}"] = plan.graph.node(grp.epilogue.stats).op
    return out


def test_bn_statistics_come_from_every_producer_that_can_emit_them():
    """plan_bn_stats: a conv or a max pool whose output only a training-mode bn reads emits
    that bn's statistics; a max pool feeding no bn, one whose value is also a tap,
    an avg pool (its registry entry says it cannot) and inference plans do not."""
    from engine.passes.pipeline import run_pipeline

    graph = engine.load(STATS_SPEC).graph
    assert _stats_of(run_pipeline(graph, training=True)) == {"maxpool1": "bn", "conv2": "bn"}
    assert _stats_of(run_pipeline(graph, training=False)) == {}


def test_the_statistics_pass_asks_the_op_registry(monkeypatch):
    """Which ops emit statistics is the registry's fact, not names in the pass."""
    from dataclasses import replace

    from engine.ir import ops
    from engine.passes.pipeline import run_pipeline

    graph = engine.load(STATS_SPEC).graph
    monkeypatch.setitem(ops.REGISTRY, "maxpool", replace(ops.REGISTRY["maxpool"], emits_stats=False))
    monkeypatch.setitem(ops.REGISTRY, "avgpool", replace(ops.REGISTRY["avgpool"], emits_stats=True))
    assert _stats_of(run_pipeline(graph, training=True)) == {"conv2": "bn", "avgpool1": "bn"}


LINKS_SPEC = """
network links {
    input 3x12x12
    conv 8 kernel=3 pad=1 bias=false -> maxpool 2 -> bn -> relu
    conv 8 kernel=3 pad=1 bias=false -> bn -> relu
    conv 8 kernel=3 pad=1 groups=8 bias=false -> bn
    s = relu
    conv 8 kernel=1 -> bn -> add s
    global_avgpool
    linear 4
}
"""


def _links(plan) -> dict[str, tuple[str, str]]:
    """{group's first node: (which hand-off, the node it names)} of a plan."""
    g, out = plan.graph, {}
    for grp in plan:
        for field in ("sums_by", "pool_grad_by"):
            nid = getattr(grp.epilogue, field)
            if nid is not None:
                out[f"{g.node(grp.anchor).op}%{grp.anchor}"] = (field, f"{g.node(nid).op}%{nid}")
    return out


def test_backward_links_pair_each_bn_with_its_one_conv():
    """plan_backward_links: the first conv's fused pool gets its gradient from the bn reading it; a bn
    (+ act) whose output one plain conv alone reads gets its sums from that conv's dgrad. Not a bn
    read by a depthwise conv (its own dgrad kernel), nor one whose output is a tap that a conv and
    an add read; nothing in an inference plan."""
    from engine.passes.pipeline import run_pipeline

    graph = engine.load(LINKS_SPEC).graph
    links = _links(run_pipeline(graph, training=True))
    assert links == {"conv%1": ("pool_grad_by", "bn%3"), "bn%3": ("sums_by", "conv%5")}, links
    assert _links(run_pipeline(graph, training=False)) == {}
