"""What the AOT check tells about each kernel variant: the GPU targets, one
`KernelReport` per (variant, target), its short constexpr tag, and the text
table `fusenet inspect` and `fusenet bench` print.

Imports neither torch nor Triton (the launcher's parameter list is read only
when a tag is made).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from engine.text import format_table

TARGETS = {"sm_80": 80, "sm_90": 90}  # name -> compute capability: A100 and H100
MMA_ORDER = ("HGMMA", "HMMA", "IGMMA", "IMMA", "QGMMA", "QMMA", "BGMMA", "BMMA", "DMMA", "OMMA")
# what a compile measures (the worker's result keys; what the disk cache stores)
REPORT_FIELDS = ("regs", "spill_stores", "spill_loads", "stack", "smem", "mma", "instructions",
                 "tail_instructions", "opcodes", "loop", "compile_s")


@dataclass
class KernelReport:
    """What one kernel variant compiles to on one target."""

    name: str
    tag: str  # short `k=v` summary of the constexprs
    target: str  # "sm_80" | "sm_90"
    num_warps: int = 4
    num_stages: int = 3
    regs: int = 0  # registers per thread
    spill_stores: int = 0  # bytes
    spill_loads: int = 0  # bytes
    stack: int = 0  # bytes of stack frame per thread
    smem: int = 0  # shared memory bytes per block
    mma: dict = field(default_factory=dict)  # opcode -> count, e.g. {"HGMMA": 8}
    instructions: int = 0  # SASS instructions, trailing NOP padding excluded
    tail_instructions: int = 0  # of those, the ones only a ticketed reduction's last program runs (sass.ticket_tail)
    opcodes: dict = field(default_factory=dict)  # opcode (before the first '.') -> count
    loop: dict | None = None  # the main loop's per-trip figures (engine.perf.sass.MainLoop.as_dict), if any
    compile_s: float = 0.0
    cached: bool = False  # came from the disk cache
    error: str | None = None
    spec: Any = field(default=None, repr=False, compare=False)

    @property
    def spills(self) -> int:
        """Spill bytes (stores + loads) reported by ptxas."""
        return self.spill_stores + self.spill_loads

    @property
    def mma_count(self) -> int:
        return sum(self.mma.values())

    @property
    def ok(self) -> bool:
        return self.error is None


def normalise_target(target: str | int) -> str:
    """"sm_90", "sm90", "SM_90" or 90 -> "sm_90"; ValueError for a target not in TARGETS."""
    if isinstance(target, int):
        target = f"sm_{target}"
    t = str(target).lower().replace("sm", "sm_").replace("__", "_")
    if t not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {sorted(TARGETS)}")
    return t


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    s = str(v)
    if s.startswith("triton.language.") or s.startswith("tl."):
        s = s.rsplit(".", 1)[-1]
    return s


def constexpr_tag(constexprs: Iterable[tuple[str, Any]], max_len: int = 60) -> str:
    """`ACT=1 HAS_BIAS !HAS_RES BLOCK_M=64 ...` (True -> name, False -> !name, None -> name=-)."""
    parts = []
    for k, v in constexprs:
        if v is True:
            parts.append(k)
        elif v is False:
            parts.append("!" + k)
        elif v is None:
            parts.append(f"{k}=-")
        else:
            parts.append(f"{k}={_fmt_value(v)}")
    s = " ".join(parts)
    return s if len(s) <= max_len else s[: max_len - 1] + "…"


def spec_tag(spec) -> str:
    """Tag of the kernel's declared `tl.constexpr` parameters (runtime args the JIT
    specialised, i.e. None pointers and integers equal to 1, are left out)."""
    from engine.kernels.launch import kernel_params

    try:
        declared = {p.name for p, is_constexpr, _ in kernel_params(spec.kernel) if is_constexpr}
    except Exception:  # noqa: BLE001 - a kernel whose parameters cannot be read: tag every constexpr
        declared = None
    items = [(k, v) for k, v in spec.constexprs if declared is None or k in declared]
    return constexpr_tag(items)


def make_report(spec, target: str, data: dict | None, error: str | None, cached: bool) -> KernelReport:
    """The report of `spec` on `target` from a compile result (or its cached copy), or from an error."""
    r = KernelReport(name=spec.name, tag=spec_tag(spec), target=target, num_warps=spec.num_warps,
                     num_stages=spec.num_stages, spec=spec, cached=cached, error=error)
    if data:
        for k in REPORT_FIELDS:
            setattr(r, k, data[k])
    return r


def _mma_text(r: KernelReport) -> str:
    if not r.mma:
        return "0"
    kinds = sorted(r.mma, key=lambda k: (MMA_ORDER.index(k) if k in MMA_ORDER else 99, k))
    return " ".join(f"{k}:{r.mma[k]}" for k in kinds)


def format_report(reports: Sequence[KernelReport]) -> str:
    """A plain-text table, one row per kernel variant and target.

    Columns: kernel, variant (its constexprs), target, warps/stages, registers per
    thread, spill bytes (stores + loads), shared memory bytes, MMA instructions by
    opcode (HMMA = mma.sync, HGMMA = Hopper wgmma, IMMA = integer, ...), SASS
    instruction count, and a note (compile errors, spills).
    """
    head = ("kernel", "variant", "target", "w/s", "regs", "spills", "smem", "mma", "instrs", "note")
    rows = []
    for r in reports:
        if r.error:
            msg = r.error.strip().splitlines()[-1][:160] if r.error.strip() else "unknown error"
            rows.append((r.name, r.tag, r.target, f"{r.num_warps}/{r.num_stages}", "-", "-", "-", "-", "-",
                         "ERROR: " + msg))
            continue
        note = f"spills {r.spill_stores}B st / {r.spill_loads}B ld" if r.spills else ""
        rows.append((r.name, r.tag, r.target, f"{r.num_warps}/{r.num_stages}", str(r.regs), str(r.spills),
                     str(r.smem), _mma_text(r), str(r.instructions), note))
    out = format_table(head, rows, align="lllrrrrlrl", rule="columns").splitlines()
    n_err = sum(1 for r in reports if r.error)
    n_spill = sum(1 for r in reports if not r.error and r.spills)
    n_mma = sum(1 for r in reports if not r.error and r.mma)
    out.append(f"{len(reports)} variants: {n_err} failed to compile, {n_spill} spill, {n_mma} use tensor cores")
    return "\n".join(out)
