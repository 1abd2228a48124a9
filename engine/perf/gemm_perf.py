"""The static performance estimate of a training step: every GEMM kernel's main
loop read from its sm_90 SASS, timed against an H100's peaks, and the step summed
against the analytic floor (`fusenet inspect FILE --perf`; docs/PERF_MODEL.md).

Why: without a GPU nothing can be timed, but three things bound a kernel's time
and all three are known here: the instructions its main loop issues (the SASS,
engine.perf.sass), the multiply-adds its tensor cores do (the same loop), and
the bytes it must move (its tensors). Each launch is estimated at the slowest
of the three; the non-GEMM kernels at their analytic minimum HBM time
(engine.perf.analytic); the sum is set against the analytic floor of the step.

How a step is seen: one training step runs on PyTorch's meta device with GPU
tiles (nothing is computed, no memory is used); every launch's grid, arguments
and variant are noted (engine.kernels.launch.observing_launches). The variants
are compiled for sm_90 (engine.perf.aot: workers, disk cache); a variant whose
SASS has a loop with matrix instructions is a GEMM.

Public API: DeviceModel, H100_SXM, GemmLaunch, record_step, loop_trips,
estimate_launch, Estimate, step_perf, StepPerf, format_perf.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.perf.sass import MainLoop


@dataclass(frozen=True)
class DeviceModel:
    """The peaks a launch is estimated against (docs/PERF_MODEL.md says where each comes from)."""

    name: str
    target: str  # the SASS it runs
    sms: int
    clock_hz: float
    issue_per_clock: int  # warp-instructions per SM per clock
    tensor_macs_per_clock: int  # dense bf16 multiply-adds per SM per clock
    hbm_bytes_per_s: float


# 989 TFLOP/s dense bf16 (engine.perf.analytic's peak) = 132 SMs x 2,048 MACs x 2 FLOPs x 1.83 GHz:
# the clock is the one that peak implies, so tensor time here and the analytic floor agree
H100_SXM = DeviceModel("H100 SXM", "sm_90", sms=132, clock_hz=1.83e9, issue_per_clock=4,
                       tensor_macs_per_clock=2048, hbm_bytes_per_s=3.35e12)


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# --------------------------------------------------------------------------- #
# Loop trips per program, from a launch's arguments (by parameter name)
# --------------------------------------------------------------------------- #
# The conv forward passes its trip count as `K_ITERS`; dgrad's depends on the
# stride phase (each tap reaches one phase: KH*KW*CHUNKS trips over SH*SW phase
# programs on average); the others are read from their sizes and block sizes.
_TRIPS: dict[str, Callable[[dict], float]] = {
    "_conv_dgrad_kernel": lambda a: a["KH"] * a["KW"] * a["CHUNKS"] / (a["SH"] * a["SW"]),
    # P_PER_SPLIT counts pixel boxes when the wgrad steps boxes (TH > 0), pixels otherwise
    "_conv_wgrad_kernel": lambda a: a["P_PER_SPLIT"] if a["TH"] else _cdiv(a["P_PER_SPLIT"], a["BLOCK_P"]),
    "_conv_wgrad_folded_kernel": lambda a: a["PER_SPLIT"],  # boxes of pixels
    "_linear_fwd_kernel": lambda a: _cdiv(a["F"], a["BLOCK_K"]),
    "_linear_dgrad_kernel": lambda a: _cdiv(a["O"], a["BLOCK_K"]),
    "_linear_wgrad_kernel": lambda a: _cdiv(a["rows_per_split"], a["BLOCK_K"]),
}


def loop_trips(name: str, args: dict) -> float | None:
    """Main-loop trips of one program of a launch (None: unknown kernel)."""
    if "K_ITERS" in args:
        return int(args["K_ITERS"])
    fn = _TRIPS.get(name)
    return fn(args) if fn else None


# --------------------------------------------------------------------------- #
# Recording a step
# --------------------------------------------------------------------------- #
@dataclass
class GemmLaunch:
    """One launch of a step: its variant, programs, loop trips and tensor bytes."""

    spec: Any  # engine.kernels.launch.Specialization
    programs: int
    trips: float | None
    bytes: int  # distinct tensor arguments' bytes: what it must at least move
    args: dict = field(default_factory=dict)  # scalar arguments by parameter name (sizes, BLOCK_*)


def _bind(kernel, args: tuple, meta: dict) -> dict:
    import inspect

    fn = getattr(kernel, "fn", kernel)
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in meta.items() if k in params}
    bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def record_launches(run: Callable[[], Any]) -> list[GemmLaunch]:
    """Every launch `run()` makes, with GPU tiles, as a dry run (no kernel executes): its
    variant, programs, loop trips (None if unknown) and tensor bytes."""
    import torch

    from engine import device
    from engine.kernels.launch import kernel_name, observing_launches, recording, specialization

    out: list[GemmLaunch] = []

    def observe(kernel, grid, args, meta) -> None:
        if callable(grid):
            grid = grid(meta)
        grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
        seen, nbytes = set(), 0
        for t in args:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                nbytes += t.numel() * t.element_size()
        bound = _bind(kernel, args, meta)
        scalars = {k: v for k, v in bound.items() if isinstance(v, (int, float, bool))}
        out.append(GemmLaunch(specialization(kernel, args, meta), math.prod(int(g) for g in grid),
                              loop_trips(kernel_name(kernel), bound), nbytes, scalars))

    with device.gpu_tiles(), recording(dry_run=True), observing_launches(observe):
        run()
    return out


def record_step(model, batch: int) -> list[GemmLaunch]:
    """Every launch of one training step of `model` (forward, loss, backward, SGD) at
    `batch`, on the meta device (nothing runs, no memory is used; `model` moves there)."""
    import torch

    from engine.perf.step import network_step

    run = network_step(model.to("meta"), batch, training=True)

    def on_meta() -> None:
        with torch.device("meta"):
            run()

    return record_launches(on_meta)


# --------------------------------------------------------------------------- #
# Estimates
# --------------------------------------------------------------------------- #
@dataclass
class Estimate:
    """Seconds of one launch at the device's peaks, by limit."""

    issue_s: float
    tensor_s: float
    hbm_s: float

    @property
    def seconds(self) -> float:
        return max(self.issue_s, self.tensor_s, self.hbm_s)

    @property
    def bound(self) -> str:
        return max((("issue", self.issue_s), ("tensor", self.tensor_s), ("hbm", self.hbm_s)), key=lambda kv: kv[1])[0]


def estimate_launch(loop: MainLoop, instructions: int, num_warps: int, programs: int, trips: float, nbytes: int,
                    dev: DeviceModel = H100_SXM, tail: int = 0) -> Estimate:
    """max(issue, tensor, HBM) time of a GEMM launch.

    Per program: the loop's instructions x trips plus the rest of the kernel once
    (`instructions` = the whole listing), times warps, over the SM's issue rate;
    the loop's multiply-adds x trips over the SM's tensor rate, or its HGMMAs'
    shared-memory reads over 128 bytes per clock if longer. The busiest SM
    runs ceil(programs / SMs) programs (waves). HBM: the tensors' bytes once.
    `tail`: instructions of the listing only a ticketed reduction's last program runs
    (sass.ticket_tail): once per launch, not per program.
    """
    if not loop.loops:  # no loop: the whole kernel is one trip
        trips, instructions, tail = 1, loop.instructions, 0
    loop_instrs = loop.instructions * max(1, loop.loops)
    per_program_issue = (loop.instructions * trips + max(0.0, instructions - tail - loop_instrs)) * num_warps
    waves = _cdiv(programs, dev.sms)
    return Estimate(issue_s=(waves * per_program_issue + tail * num_warps) / dev.issue_per_clock / dev.clock_hz,
                    tensor_s=waves * trips * loop.tensor_clocks(num_warps, dev.target) / dev.clock_hz,
                    hbm_s=nbytes / dev.hbm_bytes_per_s)


def estimate_other(instructions: int, num_warps: int, programs: int, repeats: int, nbytes: int,
                   dev: DeviceModel = H100_SXM, tail: int = 0) -> Estimate:
    """max(issue, HBM) time of a launch without a main loop (normalisation, pooling, pointwise, the loss,
    the optimizer, the split-sum tails): every program issues its listing but the ticket tail (`tail`,
    once per launch) `repeats` times (a row reduction's constexpr N_ITER; other loops once, a lower
    bound), times warps, over the SM's issue rate, for ceil(programs / SMs) programs; HBM: the
    tensors' bytes once."""
    waves = _cdiv(programs, dev.sms)
    per_program = (instructions - tail) * max(1, repeats)
    return Estimate(issue_s=(waves * per_program + tail) * num_warps / dev.issue_per_clock / dev.clock_hz,
                    tensor_s=0.0, hbm_s=nbytes / dev.hbm_bytes_per_s)


@dataclass
class VariantPerf:
    """A GEMM variant of the step: its compile report, main loop and launches' estimates."""

    report: Any  # engine.perf.aot_report.KernelReport
    loop: MainLoop
    estimates: list[Estimate] = field(default_factory=list)  # one per launch
    tile_macs: float = 0.0  # sum over launches of programs x trips x a trip's multiply-adds (padded tiles)
    args: dict = field(default_factory=dict)  # the first launch's arguments (for the shape column)

    @property
    def launches(self) -> int:
        return len(self.estimates)

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.estimates)

    @property
    def bound(self) -> str:
        """The limit of the launches that take most of the time."""
        by: dict[str, float] = {}
        for e in self.estimates:
            by[e.bound] = by.get(e.bound, 0.0) + e.seconds
        return max(by, key=by.get) if by else "-"

    @property
    def ratio(self) -> float:
        return self.loop.issue_tensor_ratio(self.report.target)


@dataclass
class StepPerf:
    """The step: GEMM variants, the rest at its analytic minimum, and the floor."""

    name: str
    batch: int
    precision: str
    device: DeviceModel
    variants: list[VariantPerf]
    other_gemm_launches: int  # launches of loop kernels whose trips are unknown (not estimated)
    non_gemm_s: float  # non-GEMM kernel groups at their analytic minimum HBM time
    non_gemm_launch_bytes: int  # what the non-GEMM launches touch as recorded (for comparison)
    floor_s: float  # the analytic floor of the fused step
    failed: list = field(default_factory=list)  # KernelReports of variants that did not compile
    others: list = field(default_factory=list)  # Estimates of the non-GEMM launches as recorded (estimate_other)

    @property
    def gemm_s(self) -> float:
        return sum(v.seconds for v in self.variants)

    @property
    def step_s(self) -> float:
        return self.gemm_s + self.non_gemm_s

    @property
    def recorded_s(self) -> float:
        """The non-GEMM launches as recorded: each at the larger of its SASS issue time and its bytes."""
        return sum(e.seconds for e in self.others)

    def conv_variants(self) -> list[VariantPerf]:
        return [v for v in self.variants if v.report.name.startswith("_conv_")]

    def summary(self) -> dict:
        """The issue's target figures over the conv variants (and the step)."""
        conv = self.conv_variants()
        ratios = [v.ratio for v in conv]
        return {
            "conv_variants": len(conv),
            "ratio_median": statistics.median(ratios) if ratios else 0.0,
            "ratio_worst": max(ratios) if ratios else 0.0,
            "fast": sum(1 for v in conv if v.loop.hopper_mma and v.loop.fast_loads),
            "spills": sum(1 for v in self.variants if v.report.spills),
            "smem_max": max((v.report.smem for v in self.variants), default=0),
            "gemm_us": 1e6 * self.gemm_s, "non_gemm_us": 1e6 * self.non_gemm_s,
            "step_us": 1e6 * self.step_s, "floor_us": 1e6 * self.floor_s,
            "step_over_floor": self.step_s / self.floor_s if self.floor_s else float("inf"),
            "recorded_us": 1e6 * self.recorded_s, "recorded_step_us": 1e6 * (self.gemm_s + self.recorded_s),
            "recorded_launches": len(self.others),
        }


def _non_gemm_s(spec, batch: int, precision: str, dev: DeviceModel) -> tuple[float, float]:
    """(non-GEMM groups' forward + backward minimum HBM seconds, the fused step's floor seconds)."""
    from engine.perf.analytic import analytic_report, group_costs
    from engine.passes.pipeline import run_pipeline
    from engine.precision import PRECISIONS

    plan = run_pipeline(spec.graph, training=True)
    costs = group_costs(plan, batch, PRECISIONS[precision].bytes)
    other = sum(c.bytes + c.backward_bytes for c in costs if c.family not in ("conv", "linear"))
    floor = analytic_report(spec, batch, precision)["fused"]["step"]["floor_s"]
    return other / dev.hbm_bytes_per_s, floor


def gemm_variants(launches: list[GemmLaunch], jobs: int = 2, dev: DeviceModel = H100_SXM
                  ) -> tuple[list[VariantPerf], int, int, list, list[Estimate]]:
    """Compile the launches' variants for `dev.target` and estimate every launch: (GEMM variants, GEMM
    launches with unknown trips, bytes of the other launches, failed reports, the other launches'
    estimates)."""
    from engine.perf.aot import compile_all

    specs = list(dict.fromkeys(la.spec for la in launches))
    reports = dict(zip(specs, compile_all(specs, (dev.target,), jobs=jobs)))
    variants: dict[Any, VariantPerf] = {}
    unknown, other_bytes, others = 0, 0, []
    for la in launches:
        rep = reports[la.spec]
        loop = MainLoop.from_dict(rep.loop) if rep.ok else None
        if loop is None:
            other_bytes += la.bytes
            if rep.ok:
                others.append(estimate_other(rep.instructions, rep.num_warps, la.programs,
                                             int(la.args.get("N_ITER", 1)), la.bytes, dev, rep.tail_instructions))
            continue
        if la.trips is None:
            unknown += 1
            continue
        v = variants.setdefault(la.spec, VariantPerf(rep, loop, args=la.args))
        v.estimates.append(estimate_launch(loop, rep.instructions, rep.num_warps, la.programs, la.trips, la.bytes,
                                           dev, rep.tail_instructions))
        v.tile_macs += la.programs * la.trips * loop.macs_per_warp * rep.num_warps
    return list(variants.values()), unknown, other_bytes, [r for r in reports.values() if not r.ok], others


def step_perf(model, batch: int, jobs: int = 2, dev: DeviceModel = H100_SXM) -> StepPerf:
    """Record a training step of `model`, compile its variants for `dev.target`, estimate it."""
    variants, unknown, other_bytes, failed, others = gemm_variants(record_step(model, batch), jobs, dev)
    non_gemm, floor = _non_gemm_s(model.spec, batch, model.precision, dev)
    return StepPerf(model.name, batch, model.precision, dev, variants, unknown, non_gemm, other_bytes, floor,
                    failed, others)


# --------------------------------------------------------------------------- #
# Text
# --------------------------------------------------------------------------- #
def _short(name: str) -> str:
    """'_conv_dgrad_kernel' -> 'conv dgrad'."""
    return name.strip("_").removesuffix("_kernel").replace("_", " ")


def _shape(name: str, a: dict) -> str:
    """The conv a launch belongs to, 'Cin->Cout KHxKW @HxW' (channels as stored: a padded RGB
    stem shows 8), or a linear's 'F->O', from the launch's arguments."""
    try:
        if name == "_conv_fwd_kernel":
            cin, cout = a["XC_A"] * a["ALIGN"], a["COUT_A"] * a["NALIGN"]
        elif name == "_conv_dgrad_kernel":
            cin, cout = a["DXC_A"] * a["NALIGN"], a["DYC_A"] * a["ALIGN"]
        elif name in ("_conv_wgrad_kernel", "_conv_wgrad_folded_kernel"):
            cin, cout = a["XC_A"] * a["ALIGN"], a["DYC_A"] * a["NALIGN"]
        elif "F" in a and "O" in a:
            return f"{a['F']}->{a['O']}"
        else:
            return ""
        k = f" {a['KH']}x{a['KW']}" if "KH" in a else ""
        return f"{cin}->{cout}{k} @{a['H']}x{a['W']}"
    except KeyError:
        return ""


def _tile(constexprs: dict) -> str:
    return "x".join(str(v) for k, v in constexprs.items() if k.startswith("BLOCK_"))


def _mma_text(loop: MainLoop) -> str:
    op = loop.mma_opcode.split(".")
    return f"{loop.mma:g}x {op[0]}.{op[1]}" if len(op) > 1 else f"{loop.mma:g}x {op[0]}"


def _loads_text(loop: MainLoop) -> str:
    return " ".join(f"{k}:{n:g}" for k, n in loop.loads.items() if n) or "none"


def format_perf(perf: StepPerf) -> str:
    """The per-variant table, the step's sum against the floor, and the target figures."""
    from engine.text import format_table

    dev = perf.device
    head = ("kernel", "shape", "tile", "w/s", "loop", "mma/trip", "issue/tensor", "loads", "regs", "spill",
            "smem KB", "n", "est us", "bound")
    rows = []
    for v in perf.variants:
        r, lp = v.report, v.loop
        rows.append((_short(r.name), _shape(r.name, v.args), _tile(dict(r.spec.constexprs)), f"{r.num_warps}/{r.num_stages}",
                     f"{lp.instructions:g}", _mma_text(lp), f"{v.ratio:.2f}", _loads_text(lp), str(r.regs),
                     str(r.spills), f"{r.smem / 1024:.0f}", str(v.launches), f"{1e6 * v.seconds:.1f}", v.bound))
    s = perf.summary()
    out = [f"{perf.name}: GEMM main loops on {dev.target} and a training step estimated on an {dev.name} "
           f"(batch {perf.batch}, {perf.precision}); model: docs/PERF_MODEL.md",
           format_table(head, rows, align="llllrlrlrrrrrl", rule="columns"), ""]
    out.append(f"GEMM kernels (estimated)       {s['gemm_us']:9.1f} us  ({sum(v.launches for v in perf.variants)} "
               f"launches, {len(perf.variants)} variants)")
    if perf.other_gemm_launches:
        out.append(f"  not estimated: {perf.other_gemm_launches} launches of loop kernels with unknown trip counts")
    out.append(f"non-GEMM (analytic HBM min.)   {s['non_gemm_us']:9.1f} us  (their launches touch "
               f"{perf.non_gemm_launch_bytes / 1e6:.1f} MB as recorded: "
               f"{1e6 * perf.non_gemm_launch_bytes / dev.hbm_bytes_per_s:.1f} us at full bandwidth)")
    out.append(f"estimated step                 {s['step_us']:9.1f} us  = {s['step_over_floor']:.2f}x the analytic "
               f"floor ({s['floor_us']:.1f} us)")
    out.append(f"non-GEMM as recorded           {s['recorded_us']:9.1f} us  ({s['recorded_launches']} launches, each at "
               f"the larger of its SASS issue time and its bytes): the step {s['recorded_step_us']:.1f} us")
    out.append(f"conv main loops: issue/tensor median {s['ratio_median']:.2f}, worst {s['ratio_worst']:.2f}; "
               f"{s['fast']}/{s['conv_variants']} on HGMMA with TMA or 16-byte async loads; "
               f"{s['spills']} variants spill; largest shared memory {s['smem_max'] / 1024:.0f} KB")
    return "\n".join(out)


__all__ = ["DeviceModel", "H100_SXM", "GemmLaunch", "record_launches", "record_step", "gemm_variants", "loop_trips", "estimate_launch", "estimate_other",
           "Estimate",
           "VariantPerf", "StepPerf", "step_perf", "format_perf"]
