"""The op registry: one definition per op, in agreement with the language and
with every layer that looks ops up (kernels, runtime, reference, training)."""
from __future__ import annotations

import torch

from dsl.schema import ACTIVATIONS as DSL_ACTIVATIONS
from dsl.schema import LAYERS
from engine.ir.ops import REGISTRY, Family, Group, RefCall, emits_stats, is_, op, ops_in


def test_every_language_layer_has_one_definition_and_back():
    assert set(REGISTRY) - {"input"} == set(LAYERS)


def test_activations_are_declared_once_and_defined_once():
    from engine.kernels.activations import ACTIVATIONS, CODES

    assert tuple(ACTIVATIONS) == tuple(DSL_ACTIVATIONS), "the kernels' table and the language list differ"
    assert ops_in(Group.ACTIVATION) == set(DSL_ACTIVATIONS)
    assert sorted(CODES.values()) == list(range(len(CODES))), "activation codes are 0..n-1, one each"
    for name, act in ACTIVATIONS.items():
        sig = LAYERS[name]
        keywords = {p.name for p in sig.keywords}
        # the one runtime float the kernels take is the activation's one parameter, if it has one
        assert keywords == ({act.param} if act.param else set()), name
        assert not sig.positional, name


def test_groups_are_what_the_passes_expect():
    assert ops_in(Group.PARAMETRIC) == {"conv", "linear", "bn"}
    assert ops_in(Group.GEMM) == {"conv", "linear"}
    assert ops_in(Group.MERGE) == {"add", "concat"}
    assert ops_in(Group.UNARY_POINTWISE) == set(DSL_ACTIVATIONS) | {"scale"}
    assert is_("relu", Group.ACTIVATION) and not is_("scale", Group.ACTIVATION)


def test_ops_that_emit_batch_statistics():
    """The producers whose kernels can write the next training-mode bn's partial sums
    (engine.passes.fusion.plan_bn_stats asks this, never op names)."""
    assert {name for name, d in REGISTRY.items() if d.emits_stats} == {"conv", "maxpool"}
    assert emits_stats("maxpool") and not emits_stats("avgpool")


def test_every_op_has_what_its_layers_need():
    from engine.runtime.executors import EXECUTORS

    for name, d in REGISTRY.items():
        assert d.name == name and callable(d.shape)
        if name == "input":
            continue
        assert d.family in EXECUTORS, f"no runtime executor for {name}'s family {d.family}"
        if is_(name, Group.PARAMETRIC):
            assert d.layer is not None, name
        if d.family is not Family.ACTIVATION:
            assert d.reference is not None, f"{name} has no PyTorch reference"
    assert Family.POINTWISE in EXECUTORS  # the chain family has no op but an executor


def test_references_compute_with_the_torch_they_are_given():
    from engine.ir.graph import Node

    node = Node(1, "maxpool", (0,), {"kernel": (2, 2), "stride": (2, 2), "pad": (0, 0)})
    x = torch.randn(2, 3, 6, 4)
    got = op("maxpool").reference(RefCall(torch, node, (x,)))
    assert torch.equal(got, torch.nn.functional.max_pool2d(x, 2))


def test_the_registry_imports_neither_torch_nor_triton():
    import subprocess
    import sys

    code = ("import sys; import engine.ir.ops, engine.ir.frontend, engine.passes.pipeline; "
            "bad = [m for m in ('torch', 'triton') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
