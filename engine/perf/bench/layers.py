"""Per-convolution benchmarks: fusenet's conv kernels against cuDNN.

For each convolution shape: the forward, the input gradient (dgrad) and the
weight gradient (wgrad), each against cuDNN through aten (channels_last, same
dtype, `cudnn.benchmark` on), with TFLOP/s and achieved bandwidth (the minimum
bytes a kernel must move: read its operands once, write its result once). For
a convolution taken from a network, also its fused eval-mode group (conv with
bias, folded batch norm, residual add and activation in one kernel) against
the unfused PyTorch sequence that computes the same thing.

Every fusenet result is compared with cuDNN's before its time is reported.
Shapes come from a network spec (its convolutions) or from a workloads file
(benchmarks/workloads.toml: the seven airbench shapes at N=1024).
"""
from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from engine.perf.bench.contenders import matmul_precision
from engine.perf.bench.devices import device_info, mfu
from engine.perf.bench.network import CHECK_TOL, rel_err
from engine.perf.bench.timing import measure
from engine.kernels.activations import oracle
from engine.perf.peaks import H100
from engine.precision import precision as precision_named
from engine.text import format_table

@dataclass(frozen=True)
class FusedSteps:
    """What a convolution's fused eval-mode group applies after the GEMM:
    z = conv (+ bias) (* bn scale + shift) (+ residual); y = act(z)."""

    bias: bool = False
    bn: bool = False
    residual: bool = False
    act: str = "none"

    @classmethod
    def parse(cls, words) -> "FusedSteps":
        """From the workloads file's spelling: a list of bias, bn, add, act:NAME."""
        words = list(words)
        unknown = [w for w in words if w not in ("bias", "bn", "add") and not str(w).startswith("act:")]
        if unknown:
            raise ValueError(f"unknown epilogue step(s) {unknown}; known: bias, bn, add, act:NAME")
        act = next((w.split(":", 1)[1] for w in words if w.startswith("act:")), "none")
        return cls("bias" in words, "bn" in words, "add" in words, act)

    def words(self) -> tuple[str, ...]:
        """Back to the workloads file's spelling (for labels and results)."""
        out = ["bias"] if self.bias else []
        out += ["bn"] if self.bn else []
        out += ["add"] if self.residual else []
        return tuple(out + ([f"act:{self.act}"] if self.act != "none" else []))

    def __bool__(self) -> bool:
        return bool(self.words())


@dataclass(frozen=True)
class ConvShape:
    name: str
    n: int
    cin: int
    cout: int
    h: int
    w: int
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False
    epilogue: FusedSteps = field(default_factory=lambda: FusedSteps())  # the fused eval group, if any

    @property
    def out_hw(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.pad, self.dilation
        return ((self.h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (self.w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)

    @property
    def flops(self) -> int:
        ho, wo = self.out_hw
        return 2 * self.n * ho * wo * self.cout * (self.cin // self.groups) * self.kernel[0] * self.kernel[1]

    def describe(self) -> str:
        k = "x".join(map(str, self.kernel))
        s = "" if self.stride == (1, 1) else f" s{self.stride[0]}"
        g = "" if self.groups == 1 else f" g{self.groups}"
        return f"{self.cin}->{self.cout} {k}{s}{g} @{self.h}x{self.w} N={self.n}"


def shapes_from_workloads(path: str | Path, batch: int | None = None) -> list[ConvShape]:
    """The [[layer]] entries of a workloads TOML file."""
    data = tomllib.loads(Path(path).read_text())
    out = []
    for i, e in enumerate(data.get("layer", [])):
        try:
            pair = lambda v: tuple(v) if isinstance(v, list) else (int(v), int(v))  # noqa: E731
            out.append(ConvShape(
                name=e.get("name", f"layer{i}"), n=int(batch or e["n"]), cin=int(e["cin"]), cout=int(e["cout"]),
                h=int(e["hw"]), w=int(e["hw"]), kernel=pair(e.get("kernel", 3)), stride=pair(e.get("stride", 1)),
                pad=pair(e.get("pad", 1)), groups=int(e.get("groups", 1)), bias=bool(e.get("bias", False)),
                epilogue=FusedSteps.parse(e.get("epilogue", ()))))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: [[layer]] entry {i + 1} is malformed ({type(err).__name__}: {err}); "
                             "expected n, cin, cout, hw and optionally kernel, stride, pad, groups, bias, "
                             "epilogue") from None
    return out


def shapes_from_spec(spec, batch: int) -> list[ConvShape]:
    """Every distinct convolution of a network, with the epilogue its eval plan fuses."""
    from engine.ir.ops import Family
    from engine.passes.pipeline import run_pipeline

    plan = run_pipeline(spec.graph, training=False)
    graph = plan.graph
    seen, out = set(), []
    for group in plan:
        if group.family is not Family.CONV:
            continue
        node, e = graph.node(group.anchor), group.epilogue
        c, h, w = graph.node(node.inputs[0]).shape
        a = node.attrs
        steps = FusedSteps(e.bias, e.folded_bn is not None, e.residual is not None,
                           graph.node(e.act).op if e.act is not None else "none")
        shape = ConvShape(f"line {node.pos.line}", batch, c, a["out"], h, w, tuple(a["kernel"]), tuple(a["stride"]),
                          tuple(a["pad"]), tuple(a["dilation"]), a["groups"], a["bias"], steps)
        key = (shape.cin, shape.cout, shape.h, shape.w, shape.kernel, shape.stride, shape.pad, shape.dilation,
               shape.groups, shape.bias, shape.epilogue)
        if key not in seen:
            seen.add(key)
            out.append(shape)
    return out


def _conv_kw(s: ConvShape) -> dict:
    return dict(stride=s.stride, padding=s.pad, dilation=s.dilation, groups=s.groups)


def layer_cases(s: ConvShape, precision: str, device: torch.device, gen: torch.Generator):
    """(op, bytes, fusenet closure, cuDNN closure) for forward, dgrad, wgrad and the fused group."""
    from engine.kernels.conv import conv2d_dgrad, conv2d_forward, conv2d_wgrad

    dt, tf32 = precision_named(precision).dtype, precision_named(precision).tf32
    ho, wo = s.out_hw
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    x = rnd(s.n, s.h, s.w, s.cin).to(dt)  # [N,H,W,Cin] NHWC
    w = (rnd(s.cout, s.cin // s.groups, *s.kernel) / (s.cin // s.groups * s.kernel[0] * s.kernel[1]) ** 0.5).to(dt)
    dy = rnd(s.n, ho, wo, s.cout).to(dt)  # [N,Ho,Wo,Cout]
    # the same tensors as NCHW views in channels_last memory: what cuDNN is fastest on
    x_cl, dy_cl = x.permute(0, 3, 1, 2), dy.permute(0, 3, 1, 2)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    kw = _conv_kw(s)
    e = x.element_size()
    conv_bw = torch.ops.aten.convolution_backward
    cases = [
        ("forward", (x.numel() + w.numel() + dy.numel()) * e,
         lambda: conv2d_forward(x, w, allow_tf32=tf32, **kw).y.permute(0, 3, 1, 2),
         lambda: F.conv2d(x_cl, w_cl, **kw)),
        ("dgrad", (dy.numel() + w.numel() + x.numel()) * e,
         lambda: conv2d_dgrad(dy, w, tuple(x.shape), allow_tf32=tf32, **kw).permute(0, 3, 1, 2),
         lambda: conv_bw(dy_cl, x_cl, w_cl, None, list(s.stride), list(s.pad), list(s.dilation), False, [0, 0],
                         s.groups, [True, False, False])[0]),
        ("wgrad", (x.numel() + dy.numel()) * e + w.numel() * 4,
         lambda: conv2d_wgrad(x, dy, tuple(w.shape), allow_tf32=tf32, **kw)[0],
         lambda: conv_bw(dy_cl, x_cl, w_cl, None, list(s.stride), list(s.pad), list(s.dilation), False, [0, 0],
                         s.groups, [False, True, False])[1]),
    ]
    if s.epilogue:
        cases.append(_fused_case(s, x, x_cl, w, w_cl, dy, dy_cl, rnd, tf32))
    return cases


def _fused_case(s, x, x_cl, w, w_cl, res, res_cl, rnd, tf32):
    """The eval-mode fused conv group against PyTorch's unfused op sequence."""
    from engine.kernels.batchnorm import bn_eval_scale_shift
    from engine.kernels.conv import conv2d_forward

    kw = _conv_kw(s)
    steps = s.epilogue
    bias = rnd(s.cout) if steps.bias or s.bias else None
    act, residual = steps.act, steps.residual
    scale = shift = None
    if steps.bn:
        gamma, beta, mean, var = rnd(s.cout), rnd(s.cout), rnd(s.cout), rnd(s.cout).abs() + 0.5
        scale, shift = bn_eval_scale_shift(gamma, beta, mean, var, 1e-5)
    bias_dt = None if bias is None else bias.to(x.dtype)

    def fused():
        return conv2d_forward(x, w, bias, scale=scale, shift=shift, residual=res if residual else None, act=act,
                              allow_tf32=tf32, **kw).y.permute(0, 3, 1, 2)

    def unfused():
        y = F.conv2d(x_cl, w_cl, bias_dt, **kw)
        if scale is not None:
            y = F.batch_norm(y, mean.to(y.dtype), var.to(y.dtype), gamma.to(y.dtype), beta.to(y.dtype), False, 0.0, 1e-5)
        if residual:
            y = y + res_cl
        return oracle(act, y, 0.01)  # the kernel's default slope, 0.01, for leaky_relu

    nbytes = (x.numel() + w.numel() + res.numel() * (2 if residual else 1)) * x.element_size()
    return ("fused " + "+".join(["conv", *steps.words()]), nbytes, fused, unfused)


def bench_layers(shapes: list[ConvShape], precision: str, *, device: torch.device | str | None = None,
                 warmup: int = 5, repeats: int = 50, max_seconds: float = 5.0,
                 log: Callable[[str], None] | None = None) -> list[dict]:
    """One row per shape and op, with fusenet's and cuDNN's times and the check."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = device_info(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for s in shapes:
        with matmul_precision(precision):
            for op, nbytes, ours, theirs in layer_cases(s, precision, device, gen):
                row = {"layer": s.name, "shape": s.describe(), "op": op, "precision": precision,
                       "flops": s.flops, "bytes": nbytes}
                try:
                    err = rel_err(ours().float(), theirs().float())
                    row["check"] = {"rel_err": err, "tol": CHECK_TOL[precision], "ok": err <= CHECK_TOL[precision]}
                    for who, fn in (("fusenet", ours), ("cudnn", theirs)):
                        t = measure(lambda i: fn(), device, warmup=warmup, repeats=repeats, max_seconds=max_seconds)
                        sec = t.median_ms / 1e3
                        row[who] = {"ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms,
                                    "tflops": s.flops / sec / 1e12, "gb_per_s": nbytes / sec / 1e9,
                                    "mfu": mfu(s.flops, sec, precision, info)}
                    row["speedup"] = row["cudnn"]["ms"] / row["fusenet"]["ms"]
                    flag = "" if row["check"]["ok"] else "  OUTPUT MISMATCH"
                    log(f"  {s.describe():34} {op:26} fusenet {row['fusenet']['ms']:8.3f} ms  "
                        f"cuDNN {row['cudnn']['ms']:8.3f} ms{flag}")
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                    log(f"  {s.describe():34} {op:26} failed: {row['error'][:200]}")
                rows.append(row)
    return rows


def analytic_layers(shapes: list[ConvShape], precision: str) -> list[dict]:
    """Without a GPU: per shape and op, FLOPs, minimum bytes and the H100 roofline floor."""
    e = precision_named(precision).bytes
    rows = []
    for s in shapes:
        ho, wo = s.out_hw
        xb, yb = s.n * s.h * s.w * s.cin * e, s.n * ho * wo * s.cout * e
        wb = s.cout * (s.cin // s.groups) * s.kernel[0] * s.kernel[1] * e
        for op, nbytes in (("forward", xb + wb + yb), ("dgrad", yb + wb + xb), ("wgrad", xb + yb + wb // e * 4)):
            compute, memory = s.flops / H100["flops_per_s"][precision], nbytes / H100["hbm_bytes_per_s"]
            rows.append({"shape": s.describe(), "op": op, "flops": s.flops, "bytes": nbytes,
                         "floor_us": 1e6 * max(compute, memory), "bound": "compute" if compute > memory else "memory"})
    return rows


def format_analytic_layers(rows: list[dict], precision: str) -> str:
    body = [(r["shape"], r["op"], f"{r['flops'] / 1e9:.2f}", f"{r['bytes'] / 1e6:.1f}", f"{r['floor_us']:.1f}",
             r["bound"]) for r in rows]
    return "\n".join([f"per-layer analytic model, {precision}, roofline floors on an {H100['name']}",
                      format_table(("layer", "op", "GFLOP", "MB", "floor us", "bound"), body, align="llr")])
