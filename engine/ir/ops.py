"""The op registry: one definition per op of the language, holding every fact
the engine needs about it.

`dsl/schema.py` declares what the language accepts (names, parameters,
defaults); this module declares what each op *is* to the engine:

- `family`: the kernel family that runs it (engine.kernels has one module per
  family; the runtime has one executor per family);
- `groups`: the op groups the passes and tools ask about (parametric, GEMM,
  activation, unary pointwise, merge), each declared here once;
- `shape`: its shape rule (engine.ir.shape_rules): output shape, parameters, FLOPs;
- `layer`: for parametric ops, the PyTorch layer that holds its parameters (the
  state-dict contract: conv `[out, in/groups, kh, kw]`, ...);
- `reference`: its meaning in PyTorch, the oracle the reference backend runs;
- `backward_flops`: its backward FLOPs per forward FLOP, for the analytic model;
- `emits_stats`: its kernel can write the batch statistics of its own output
  (per-tile partial sums of y and y*y, fp32 [T, C]) for a training-mode batch
  norm that reads only that output, which then skips its statistics pass
  (engine.passes.fusion.plan_bn_stats; the family's executor passes them on).
- `makes_bn_grad`: its backward kernel can form the gradient of a training-mode
  batch norm (+ activation) whose output only it reads -- dz and the batch
  norm's per-channel gradient sums, in its epilogue -- so that batch norm skips
  its reduce pass (engine.passes.fusion.plan_backward_links; conv: with groups 1).

The registry imports neither torch nor triton (`fusenet check` runs on it):
layer builders and references receive the torch module they compute with.

Activations are a family: their entries are made here from the language's
list (`dsl.schema.ACTIVATIONS`); what tells one activation from another on the
device and in PyTorch (its forward and gradient device functions, its PyTorch
function, its initialisation gain) is defined once, in
engine/kernels/activations.py. Adding an activation touches those two files.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

from dsl.schema import ACTIVATIONS
from engine.ir import shape_rules as rules
from engine.ir.graph import Node


class Family(Enum):
    """The kernel family of an op, and of the kernel group it anchors."""

    INPUT = "input"
    CONV = "conv"
    LINEAR = "linear"
    BATCH_NORM = "bn"
    ACTIVATION = "act"
    SCALE = "scale"
    POINTWISE = "pointwise"  # a fused run of unary pointwise ops (a group family only, no op has it)
    SOFTMAX = "softmax"
    POOL = "pool"
    GLOBAL_POOL = "global_pool"
    BLURPOOL = "blurpool"
    UPSAMPLE = "upsample"
    DROPOUT = "dropout"
    FLATTEN = "flatten"
    ADD = "add"
    CONCAT = "concat"


class Group(Enum):
    PARAMETRIC = "parametric"  # owns parameters: a named PyTorch layer (conv0, bn3, linear0)
    GEMM = "gemm"  # a matrix multiply on the tensor cores; its backward is a dgrad and a wgrad
    ACTIVATION = "activation"  # a unary nonlinearity a fused epilogue can apply
    UNARY_POINTWISE = "unary_pointwise"  # one input, elementwise: may join a pointwise chain kernel
    MERGE = "merge"  # combines the current tensor with a named tap


@dataclass(frozen=True)
class RefCall:
    """What a reference receives: the torch module to compute with, the node,
    its input tensors (NCHW), its PyTorch layer (parametric ops) and the mode."""

    torch: Any
    node: Node
    inputs: tuple
    layer: Any = None
    training: bool = False

    @property
    def F(self):
        return self.torch.nn.functional

    @property
    def x(self):
        return self.inputs[0]

    @property
    def attrs(self):
        return self.node.attrs


@dataclass(frozen=True)
class OpDef:
    name: str
    family: Family
    shape: rules.ShapeRule
    groups: frozenset[Group] = frozenset()
    layer: Callable[[Any, Node, tuple[int, ...]], Any] | None = None  # (torch.nn, node, input shape) -> Module
    reference: Callable[[RefCall], Any] | None = None  # None for activations: see module docstring
    backward_flops: float = 1.0
    emits_stats: bool = False  # can emit the next training-mode bn's partial sums (see the module docstring)
    makes_bn_grad: bool = False  # its backward can make the previous training-mode bn's dz and sums (ditto)

    def is_(self, group: Group) -> bool:
        return group in self.groups


def _conv_layer(nn, node: Node, in_shape):
    a = node.attrs
    return nn.Conv2d(in_shape[0], a["out"], a["kernel"], a["stride"], a["pad"], a["dilation"], a["groups"], a["bias"])


def _bn_layer(nn, node: Node, in_shape):
    cls = nn.BatchNorm2d if len(in_shape) == 3 else nn.BatchNorm1d
    return cls(in_shape[0], eps=node.attrs["eps"], momentum=node.attrs["momentum"])


def binomial_filter(size: int) -> list[float]:
    """Normalised binomial coefficients: [1,2,1]/4 for size 3 (blurpool's filter)."""
    row = [1.0]
    for _ in range(size - 1):
        row = [a + b for a, b in zip([0.0] + row, row + [0.0])]
    total = sum(row)
    return [v / total for v in row]


def blurpool_reference(torch, x, stride: int, size: int):
    """Reflect-pad by (size-1)/2 | size/2, then the separable binomial filter, depthwise, at `stride`."""
    F = torch.nn.functional
    left, right = (size - 1) // 2, size // 2
    if size > 1:
        x = F.pad(x, (left, right, left, right), mode="reflect")
    f1 = torch.tensor(binomial_filter(size), dtype=x.dtype, device=x.device)
    kernel = (f1[:, None] * f1[None, :]).expand(x.shape[1], 1, size, size)
    return F.conv2d(x, kernel, stride=stride, groups=x.shape[1])


def _upsample_reference(c: RefCall):
    a = c.attrs
    kw = {"align_corners": False} if a["mode"] == "bilinear" else {}
    return c.F.interpolate(c.x, scale_factor=a["factor"], mode=a["mode"], **kw)


_PARAMETRIC, _GEMM = frozenset({Group.PARAMETRIC}), frozenset({Group.PARAMETRIC, Group.GEMM})
_UNARY = frozenset({Group.UNARY_POINTWISE})
_MERGE = frozenset({Group.MERGE})


def _call_layer(c: RefCall):
    return c.layer(c.x)


_DEFS = [
    OpDef("input", Family.INPUT, rules.elementwise),
    OpDef("conv", Family.CONV, rules.conv, _GEMM, layer=_conv_layer, reference=_call_layer, backward_flops=2.0,
          emits_stats=True, makes_bn_grad=True),
    OpDef("linear", Family.LINEAR, rules.linear, _GEMM, reference=_call_layer, backward_flops=2.0,
          layer=lambda nn, node, in_shape: nn.Linear(in_shape[0], node.attrs["out"], node.attrs["bias"])),
    OpDef("bn", Family.BATCH_NORM, rules.batch_norm, _PARAMETRIC, layer=_bn_layer, reference=_call_layer),
    OpDef("softmax", Family.SOFTMAX, rules.softmax, reference=lambda c: c.F.softmax(c.x, dim=1)),
    OpDef("maxpool", Family.POOL, rules.pool, emits_stats=True, makes_bn_grad=True,
          reference=lambda c: c.F.max_pool2d(c.x, c.attrs["kernel"], c.attrs["stride"], c.attrs["pad"])),
    OpDef("avgpool", Family.POOL, rules.pool,
          reference=lambda c: c.F.avg_pool2d(c.x, c.attrs["kernel"], c.attrs["stride"], c.attrs["pad"])),
    OpDef("global_avgpool", Family.GLOBAL_POOL, rules.global_pool, reference=lambda c: c.x.mean(dim=(2, 3))),
    OpDef("global_maxpool", Family.GLOBAL_POOL, rules.global_pool,
          reference=lambda c: c.F.adaptive_max_pool2d(c.x, 1).flatten(1)),
    OpDef("blurpool", Family.BLURPOOL, rules.blurpool,
          reference=lambda c: blurpool_reference(c.torch, c.x, c.attrs["stride"], c.attrs["filter"])),
    OpDef("dropout", Family.DROPOUT, rules.elementwise, reference=lambda c: c.F.dropout(c.x, c.attrs["p"], c.training)),
    OpDef("flatten", Family.FLATTEN, rules.flatten, reference=lambda c: c.x.flatten(1)),
    OpDef("upsample", Family.UPSAMPLE, rules.upsample, reference=_upsample_reference),
    OpDef("scale", Family.SCALE, rules.elementwise, _UNARY, reference=lambda c: c.x * c.attrs["factor"]),
    OpDef("add", Family.ADD, rules.add, _MERGE, reference=lambda c: c.inputs[0] + c.inputs[1]),
    OpDef("concat", Family.CONCAT, rules.concat, _MERGE, reference=lambda c: c.torch.cat(list(c.inputs), dim=1)),
] + [
    OpDef(name, Family.ACTIVATION, rules.elementwise, frozenset({Group.ACTIVATION, Group.UNARY_POINTWISE}))
    for name in ACTIVATIONS
]

REGISTRY: dict[str, OpDef] = {d.name: d for d in _DEFS}


def op(name: str) -> OpDef:
    """The definition of op `name` (KeyError names the known ops)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}; known: {', '.join(REGISTRY)}") from None


def ops_in(group: Group) -> frozenset[str]:
    """The names of the ops in `group`."""
    return frozenset(d.name for d in _DEFS if group in d.groups)


def is_(node_or_op: Node | str, group: Group) -> bool:
    """Whether a node's op (or an op name) belongs to `group`."""
    name = node_or_op if isinstance(node_or_op, str) else node_or_op.op
    return group in REGISTRY[name].groups


def emits_stats(node_or_op: Node | str) -> bool:
    """Whether a node's op (or an op name) can emit the batch statistics of its output."""
    name = node_or_op if isinstance(node_or_op, str) else node_or_op.op
    return REGISTRY[name].emits_stats


def makes_bn_grad(node: Node) -> bool:
    """Whether a node's backward kernel can make the dz and gradient sums of a training bn before it
    (a conv only with groups 1: the depthwise dgrad is a kernel of its own)."""
    return REGISTRY[node.op].makes_bn_grad and (family(node) is not Family.CONV or node.attr("groups") == 1)


def family(node_or_op: Node | str) -> Family:
    name = node_or_op if isinstance(node_or_op, str) else node_or_op.op
    return REGISTRY[name].family

