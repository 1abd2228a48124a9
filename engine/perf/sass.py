"""The main loop of a GEMM kernel, read from its SASS listing (pure text analysis).

Why: a Hopper SM issues at most 4 warp-instructions per clock (one per
scheduler) while its tensor cores retire about 2,048 bf16 multiply-adds per
clock. A GEMM main loop whose instructions take longer to issue than its matrix
instructions take to execute is instruction-bound, whatever its tile. The
SASS says how many instructions one trip of the loop issues and how many
multiply-adds its matrix instructions do, so the ratio can be read without a GPU.

What is found: the natural loops of the listing's control flow (one per back
edge; see find_loops). The main loop is the innermost loop holding tensor-core instructions
(HGMMA on sm_90, HMMA on sm_80); when a kernel has several (one per unrolled
kernel tap, say) they are taken as one loop of their summed instructions
divided by their count, i.e. equal trip counts are assumed.

Read off it, per trip:
- instructions (every SASS instruction in the span, the branch included);
- matrix instructions and their multiply-adds per warp: an HGMMA.MxNxK is
  issued by a warpgroup (4 warps) and does M*N*K multiply-adds, so M*N*K/4 per
  warp; an HMMA.16816 is issued by one warp and does 16*8*16;
- the global loads feeding the operands and their kind: TMA (`UTMALDG`),
  16-byte asynchronous copies (`LDGSTS....128`), narrower asynchronous copies,
  16-byte loads into registers (`LDG....128`) and narrower (scalar) loads.

`issue_tensor_ratio` = (instructions x warps / 4) / (multiply-adds of the CTA
per trip / 2,048): the warps cancel, so it is instructions x 512 /
multiply-adds per warp. 1.0 or more means the loop is instruction-bound.
The HGMMAs' operand reads from shared memory are counted too (`smem_per_warp`):
at 128 bytes per clock, a wgmma narrower than N = 64 waits on shared memory
rather than on its tensor cores (m64n32k16 reads 3 KB for 32 clocks of MMA).

Formats: `cuobjdump -sass` (absolute branch targets `BRA 0x32d0`) and
`nvdisasm` (labels: `.L_x_3:` and `BRA `(.L_x_3)`).

Public API: Instruction, parse_sass, Loop, find_loops, MainLoop, main_loop,
load_kind, TENSOR_MACS_PER_CLOCK, ISSUE_PER_CLOCK.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

ISSUE_PER_CLOCK = 4  # warp-instructions an SM issues per clock: 4 schedulers, one each (Volta .. Hopper)
SMEM_BYTES_PER_CLOCK = 128  # shared-memory bandwidth per SM per clock (Volta .. Hopper)
TENSOR_MACS_PER_CLOCK = {"sm_90": 2048, "sm_80": 1024}  # dense bf16/fp16 multiply-adds per SM per clock

_LINE = re.compile(r"/\*([0-9a-fA-F]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L[\w.]*):")
_HEX_TARGET = re.compile(r"^\s*(0x[0-9a-fA-F]+)")
_LABEL_TARGET = re.compile(r"`\(([^)]+)\)")
_HGMMA_SHAPE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
# HMMA shapes are written without separators: 16816 = m16 n8 k16, 1688 = m16 n8 k8, 884 = m8 n8 k4
_HMMA_MACS = {"16816": 16 * 8 * 16, "1688": 16 * 8 * 8, "16832": 16 * 8 * 32, "884": 8 * 8 * 4}

# operand load kinds, best first (what `load_kind` returns, and the order `worst` uses)
LOAD_KINDS = ("TMA", "async16", "async<16", "sync16", "scalar")
FAST_LOADS = ("TMA", "async16")


@dataclass(frozen=True)
class Instruction:
    addr: int
    opcode: str  # full, e.g. "HGMMA.64x128x16.F32.BF16"
    operands: str  # the text after the opcode, up to ';'
    predicate: str = ""  # "@!P0" or ""
    target: int | None = None  # branch target address (branches only)

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def is_branch(self) -> bool:
        return self.base in ("BRA", "JMP", "BRX", "JMX")


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of a listing, in address order, branch targets resolved (labels too)."""
    raw, labels, pending = [], {}, []
    for line in text.splitlines():
        lm = _LABEL.match(line)
        if lm:
            pending.append(lm.group(1))
            continue
        m = _LINE.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        raw.append((addr, (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    out = []
    for addr, pred, opcode, operands in raw:
        target = None
        if opcode.split(".")[0] in ("BRA", "JMP"):
            hm = _HEX_TARGET.match(operands)
            lm = _LABEL_TARGET.search(operands)
            if hm:
                target = int(hm.group(1), 16)
            elif lm and lm.group(1) in labels:
                target = labels[lm.group(1)]
        out.append(Instruction(addr, opcode, operands, pred, target))
    # trailing padding: NOPs and the self-branch after the last EXIT are not code
    while out and out[-1].base == "NOP":
        out.pop()
    if out and out[-1].is_branch and out[-1].target == out[-1].addr:
        out.pop()
    return out


def ticket_tail(instrs: list[Instruction]) -> int:
    """Instructions only the last program of a ticketed reduction runs (engine.kernels.reduction's
    last_to_arrive): those after the first predicated EXIT that follows a ticket (an atomic add),
    which every other program takes. 0 when the listing has no such exit."""
    ticket = False
    for k, ins in enumerate(instrs):
        if ins.base in ("ATOMG", "ATOM", "RED", "REDG") and ".ADD" in ins.opcode:
            ticket = True
        elif ticket and ins.base == "EXIT" and ins.predicate:
            return len(instrs) - (k + 1)
    return 0


@dataclass(frozen=True)
class Loop:
    start: int  # address of the header (the back edge's target)
    end: int  # address of the back edge
    body: tuple[Instruction, ...]  # the loop's instructions between start and end, in address order

    def contains(self, other: Loop) -> bool:
        return self != other and {i.addr for i in other.body} <= {i.addr for i in self.body}


def _blocks(instrs: list[Instruction]) -> tuple[list[list[Instruction]], dict[int, int]]:
    """Basic blocks (leaders: the first instruction, branch targets, what follows a branch or
    EXIT) and the block index of each leader's address."""
    leaders = {instrs[0].addr} if instrs else set()
    for k, ins in enumerate(instrs):
        if ins.is_branch and ins.target is not None:
            leaders.add(ins.target)
        if (ins.is_branch or ins.base == "EXIT") and k + 1 < len(instrs):
            leaders.add(instrs[k + 1].addr)
    blocks: list[list[Instruction]] = []
    for ins in instrs:
        if ins.addr in leaders or not blocks:
            blocks.append([])
        blocks[-1].append(ins)
    return blocks, {b[0].addr: k for k, b in enumerate(blocks)}


def _successors(blocks: list[list[Instruction]], index: dict[int, int]) -> list[list[int]]:
    out = []
    for k, block in enumerate(blocks):
        last = block[-1]
        succ = []
        never = last.predicate in ("@!PT",)
        always = last.predicate in ("", "@PT")
        if last.is_branch and not never:
            if last.target in index:
                succ.append(index[last.target])
            if not always and k + 1 < len(blocks):
                succ.append(k + 1)
        elif last.base == "EXIT" and always:
            pass
        elif k + 1 < len(blocks):
            succ.append(k + 1)
        out.append(succ)
    return out


def _dominators(succ: list[list[int]], pred: list[list[int]]) -> list[set[int]]:
    """dom[b]: the blocks every path from the entry (block 0) to b passes (iterative, in block order)."""
    n = len(succ)
    everything = set(range(n))
    dom = [everything for _ in range(n)]
    if n:
        dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in range(1, n):
            ps = [dom[p] for p in pred[b]]
            new = (set.intersection(*ps) if ps else set()) | {b}
            if new != dom[b]:
                dom[b], changed = new, True
    return dom


def find_loops(instrs: list[Instruction]) -> list[Loop]:
    """The natural loops of a listing's control flow, one per back edge (an edge to a block
    that dominates its source), in address order.

    A loop's body is every block that reaches the back edge without passing the
    header, restricted to the header..back-edge address span: a rarely taken retry
    block the compiler placed after the kernel (a TMA barrier's wait loop, say)
    is its own small loop and does not count as part of the loop it waits in.
    """
    blocks, index = _blocks(instrs)
    succ = _successors(blocks, index)
    pred: list[list[int]] = [[] for _ in blocks]
    for u, vs in enumerate(succ):
        for v in vs:
            pred[v].append(u)
    dom = _dominators(succ, pred)
    loops = set()
    for u, vs in enumerate(succ):
        for h in vs:
            if h not in dom[u]:
                continue  # not a back edge (a jump back out of a retry block placed later, say)
            body, stack = {h, u}, [u]
            while stack:
                x = stack.pop()
                if x == h:
                    continue
                for p in pred[x]:
                    if p not in body:
                        body.add(p)
                        stack.append(p)
            start, end = blocks[h][0].addr, blocks[u][-1].addr
            ins = tuple(i for k in sorted(body) for i in blocks[k] if start <= i.addr <= end)
            loops.add(Loop(start, end, ins))
    return sorted(loops, key=lambda lp: (lp.start, lp.end))


def mma_macs_per_warp(ins: Instruction) -> int:
    """Multiply-adds one warp's share of a matrix instruction does (0 for anything else)."""
    if ins.base == "HGMMA":
        m = _HGMMA_SHAPE.match(ins.opcode)
        return int(m.group(1)) * int(m.group(2)) * int(m.group(3)) // 4 if m else 0
    if ins.base == "HMMA":
        parts = ins.opcode.split(".")
        return _HMMA_MACS.get(parts[1], 0) if len(parts) > 1 else 0
    return 0


_ELEM_BYTES = {"BF16": 2, "F16": 2, "TF32": 4, "E4M3": 1, "E5M2": 1, "S8": 1, "U8": 1}


def mma_smem_bytes_per_warp(ins: Instruction) -> float:
    """Shared-memory bytes one warp's share of an HGMMA reads: its B tile (K x N), and its A tile
    (64 x K) unless A comes from registers (the first source is a register, not `gdesc`)."""
    m = _HGMMA_SHAPE.match(ins.opcode) if ins.base == "HGMMA" else None
    if not m:
        return 0.0
    rows, n, k = (int(g) for g in m.groups())
    elem = next((b for t, b in _ELEM_BYTES.items() if f".{t}" in ins.opcode), 2)
    srcs = [o.strip() for o in ins.operands.split(",")]
    a_in_smem = len(srcs) > 1 and srcs[1].startswith("gdesc")
    return (k * n + (rows * k if a_in_smem else 0)) * elem / 4


def load_kind(ins: Instruction) -> str | None:
    """The kind of a global load feeding an operand (None: not a global load)."""
    parts = ins.opcode.split(".")
    if ins.base in ("UTMALDG", "UBLKCP"):
        return "TMA"
    if ins.base == "LDGSTS":
        return "async16" if "128" in parts[1:] else "async<16"
    if ins.base == "LDG":
        return "sync16" if "128" in parts[1:] else "scalar"
    return None


@dataclass
class MainLoop:
    """The main loop of a kernel, per trip (see the module docstring)."""

    loops: int  # innermost loops holding matrix instructions (0: none, the whole kernel is one trip)
    instructions: float  # per trip
    mma: float  # matrix instructions per trip
    mma_opcode: str  # e.g. "HGMMA.64x128x16.F32.BF16" (the most frequent)
    macs_per_warp: float  # multiply-adds per trip, per warp
    smem_per_warp: float = 0.0  # bytes the matrix instructions read from shared memory per trip, per warp
    loads: dict = field(default_factory=dict)  # load kind -> global loads per trip
    opcodes: dict = field(default_factory=dict)  # base opcode -> count per trip

    @property
    def load_kind(self) -> str:
        """The worst kind among the loop's global loads ('none' without any)."""
        kinds = [k for k in LOAD_KINDS if self.loads.get(k)]
        return kinds[-1] if kinds else "none"

    @property
    def fast_loads(self) -> bool:
        """Every global load is TMA or a 16-byte asynchronous copy."""
        return bool(self.loads) and all(k in FAST_LOADS for k, n in self.loads.items() if n)

    @property
    def hopper_mma(self) -> bool:
        return self.mma_opcode.startswith("HGMMA")

    def issue_tensor_ratio(self, target: str = "sm_90") -> float:
        """Issue time over tensor time of one trip: >= 1.0 means instruction-bound."""
        if not self.macs_per_warp:
            return float("inf")
        return self.instructions * TENSOR_MACS_PER_CLOCK[target] / (ISSUE_PER_CLOCK * self.macs_per_warp)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> MainLoop | None:
        return cls(**data) if data else None

    def tensor_clocks(self, num_warps: int, target: str = "sm_90") -> float:
        """SM clocks the matrix instructions of one trip need: their multiply-adds at the tensor
        rate, or their shared-memory operand reads at 128 bytes per clock, whichever is longer."""
        return max(self.macs_per_warp * num_warps / TENSOR_MACS_PER_CLOCK[target],
                   self.smem_per_warp * num_warps / SMEM_BYTES_PER_CLOCK)


def main_loop(text: str) -> MainLoop | None:
    """The main loop of the (first) kernel in a SASS listing; None if no loop holds matrix instructions."""
    instrs = parse_sass(text)
    loops = [lp for lp in find_loops(instrs) if any(mma_macs_per_warp(i) for i in lp.body)]
    inner = [lp for lp in loops if not any(lp.contains(o) for o in loops)]
    if not inner:
        if not any(mma_macs_per_warp(i) for i in instrs):
            return None
        # matrix instructions but no loop around them (a reduction of one chunk, unrolled):
        # the whole kernel is one trip (loops = 0)
        inner = [Loop(instrs[0].addr, instrs[-1].addr, tuple(instrs))]
    n = len(inner)
    body = [i for lp in inner for i in lp.body]
    opcodes: dict[str, int] = {}
    loads: dict[str, int] = {}
    mma_ops: dict[str, int] = {}
    for ins in body:
        opcodes[ins.base] = opcodes.get(ins.base, 0) + 1
        kind = load_kind(ins)
        if kind:
            loads[kind] = loads.get(kind, 0) + 1
        if mma_macs_per_warp(ins):
            mma_ops[ins.opcode] = mma_ops.get(ins.opcode, 0) + 1
    return MainLoop(
        loops=n if loops else 0,
        instructions=len(body) / n,  # n = 1 when loops = 0
        mma=sum(mma_ops.values()) / n,
        mma_opcode=max(mma_ops, key=mma_ops.get),
        macs_per_warp=sum(mma_macs_per_warp(i) for i in body) / n,
        smem_per_warp=sum(mma_smem_bytes_per_warp(i) for i in body) / n,
        loads={k: v / n for k, v in loads.items()},
        opcodes={k: v / n for k, v in sorted(opcodes.items(), key=lambda kv: -kv[1])},
    )


__all__ = ["Instruction", "parse_sass", "Loop", "find_loops", "MainLoop", "main_loop", "load_kind",
           "mma_macs_per_warp", "mma_smem_bytes_per_warp", "SMEM_BYTES_PER_CLOCK", "TENSOR_MACS_PER_CLOCK", "ISSUE_PER_CLOCK", "LOAD_KINDS", "FAST_LOADS"]
