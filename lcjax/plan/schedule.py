"""What a compiled program does while its collectives are in flight: a reader of XLA's scheduled HLO.

``compiled.as_text()`` of a jitted function prints every computation with its instructions in execution
order (the schedule). An asynchronous collective appears as ``<kind>-start`` … ``<kind>-done``; it is
*overlapped* when heavy work (a kernel, a matmul, a loop) is scheduled between the two, *exposed* when
only elementwise fusions or bookkeeping are. A ``conditional`` in a GPU program copies its predicate to the host, so one inside a loop
costs a host round-trip per iteration. Kernel calls are ``custom-call``s: Triton (``__gpu$xla.gpu.triton``),
Mosaic GPU (``mosaic_gpu``), cuBLAS/cuDNN.

A start whose done is in another computation (XLA's collective pipelining carries it across loop
iterations) counts the work after the start in its computation and before the done in the other.

Pure Python (lcjax.plan imports no JAX): the input is the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

COLLECTIVES = ("collective-permute", "all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-broadcast")
KERNEL_TARGETS = {"triton": "__gpu$xla.gpu.triton", "mosaic": "mosaic_gpu", "cublas": "__cublas$",
                  "cudnn": "__cudnn$"}

_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z][\w\-]*)\((.*)$")


@dataclass
class Instr:
    """One HLO instruction as scheduled: its name, opcode, the text after the opcode's "(" and the line."""

    name: str
    op: str
    args: str
    line: str


@dataclass
class Transfer:
    """One asynchronous collective: kind, where it starts, and the work scheduled while it is in flight."""

    kind: str
    computation: str
    start: str
    done: str
    work: list = field(default_factory=list)  # names of the ops scheduled between start and done
    bytes: int = 0  # bytes of the collective's result (what arrives on this device)

    @property
    def overlapped(self) -> bool:
        return bool(self.work)


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO result type such as ``bf16[1,8192,32,128]{3,2,1,0}`` or a tuple of them
    (float8 types count 1 byte; unknown element types count 0)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size
    return total


def result_bytes(instr: "Instr") -> int:
    """Bytes of an instruction's result: the type between ``=`` and the opcode on its line."""
    head = instr.line.split("=", 1)[1] if "=" in instr.line else ""
    return shape_bytes(head.split(f" {instr.op}(", 1)[0])


def parse(text: str) -> dict[str, list[Instr]]:
    """Computation name -> its instructions in schedule order."""
    comps: dict[str, list[Instr]] = {}
    current = None
    for line in text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m and "=" not in line.split("(")[0]:
                current = m.group(1)
                comps[current] = []
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append(Instr(m.group(1), m.group(2), m.group(3), line))
    return comps


_HEAVY_OPS = {"custom-call", "while", "conditional", "call", "dot", "convolution"}


def is_work(instr: Instr) -> bool:
    """Heavy work a transfer can hide under: a kernel (custom call), a loop, a branch, a matmul, or a
    fusion XLA emits as a matmul/kernel (``kind=kCustom``/``kOutput``) — not elementwise fusions,
    bookkeeping or other collectives."""
    if instr.op in _HEAVY_OPS:
        return True
    return instr.op == "fusion" and ("kind=kCustom" in instr.line or "kind=kOutput" in instr.line)


def _kind(op: str) -> str | None:
    for kind in COLLECTIVES:
        if op in (f"{kind}-start", kind):
            return kind
    return None


def transfers(comps: dict[str, list[Instr]]) -> list[Transfer]:
    """Every asynchronous collective (``*-start`` with its ``*-done``) and the work scheduled between."""
    starts = {}  # start name -> (computation, index)
    for comp, instrs in comps.items():
        for i, ins in enumerate(instrs):
            if ins.op.endswith("-start") and _kind(ins.op):
                starts[ins.name] = (comp, i)
    found = []
    seen = set()
    for comp, instrs in comps.items():
        for j, ins in enumerate(instrs):
            if not (ins.op.endswith("-done") and _kind(ins.op[:-5] + "-start")):
                continue
            operand = re.match(r"\s*%?([\w.\-]+)", ins.args)
            src = operand.group(1) if operand else ""
            if src in starts and starts[src][0] == comp:
                i = starts[src][1]
                work = [x.name for x in instrs[i + 1:j] if is_work(x)]
                seen.add(src)
            else:  # carried across a loop iteration: work before the done here (the start is elsewhere)
                work = [x.name for x in instrs[:j] if is_work(x)]
                src = src or "?"
            found.append(Transfer(_kind(ins.op[:-5] + "-start"), comp, src, ins.name, work, result_bytes(ins)))
    for name, (comp, i) in starts.items():  # a start whose done is in another computation
        if name not in seen and not any(t.start == name for t in found):
            instrs = comps[comp]
            work = [x.name for x in instrs[i + 1:] if is_work(x)]
            found.append(Transfer(_kind(instrs[i].op), comp, name, "?", work))
    return found


def synchronous_collectives(comps: dict[str, list[Instr]]) -> list[tuple[str, str]]:
    """(computation, op) of collectives XLA left synchronous (no start/done pair): always exposed."""
    return [(c, ins.op) for c, instrs in comps.items() for ins in instrs if ins.op in COLLECTIVES]


def loop_bodies(comps: dict[str, list[Instr]]) -> set[str]:
    """Names of the computations that are bodies of ``while`` loops, and everything they call."""
    bodies = set()
    for instrs in comps.values():
        for ins in instrs:
            if ins.op == "while":
                m = re.search(r"body=%?([\w.\-]+)", ins.line)
                if m:
                    bodies.add(m.group(1))
    frontier = list(bodies)
    while frontier:
        comp = frontier.pop()
        for ins in comps.get(comp, []):
            for callee in re.findall(r"(?:calls|to_apply|body|condition|true_computation|false_computation|"
                                     r"branch_computations)=\{?%?([\w.\-]+)", ins.line):
                if callee not in bodies:
                    bodies.add(callee)
                    frontier.append(callee)
    return bodies


def kernel_calls(comps: dict[str, list[Instr]]) -> dict[str, int]:
    """Custom-call kernels by library (triton, mosaic, cublas, cudnn), counted once per call site."""
    counts = {name: 0 for name in KERNEL_TARGETS}
    for instrs in comps.values():
        for ins in instrs:
            if ins.op == "custom-call":
                for name, target in KERNEL_TARGETS.items():
                    if f'custom_call_target="{target}' in ins.line:
                        counts[name] += 1
    return counts


def named_kernels(comps: dict[str, list[Instr]], *, rematerialised: bool = False) -> dict[str, int]:
    """Pallas kernel call sites by kernel name (the ``name=`` of ``pallas_call``, read from op_name);
    ``rematerialised``: only those a remat policy re-runs in the backward (op_name inside JAX's
    ``rematted_computation``)."""
    counts: dict[str, int] = {}
    for instrs in comps.values():
        for ins in instrs:
            if ins.op == "custom-call":
                m = re.search(r'op_name="([^"]*)/([\w.\-]+)/pallas_call"', ins.line)
                if m and (not rematerialised or "rematted_computation" in m.group(1)):
                    counts[m.group(2)] = counts.get(m.group(2), 0) + 1
    return counts


def report(text: str) -> dict:
    """Summary of a scheduled HLO module (``compiled.as_text()``).

    Returns a dict: ``collectives`` {kind: {"count", "overlapped", "exposed", "synchronous", "bytes",
    "exposed_bytes", "in_loops", "exposed_in_loops"}} — asynchronous collectives counted overlapped or
    exposed, synchronous ones (no start/done pair) apart; bytes are those of each collective's result, summed
    over call sites (a site in a loop body counts once); ``in_loops`` counts sites inside ``while`` bodies (the
    layer loop, the ring). Also ``conditionals`` (total) and ``conditionals_in_loops``;
    ``conditionals_beside_transfers`` (in a computation that also starts or finishes a collective);
    ``kernels`` {library: call sites}; ``pallas_kernels`` {kernel name: call sites} and
    ``pallas_kernels_rematerialised`` (those a remat policy re-runs in the backward); ``while_loops``;
    ``exposed`` [(kind, computation)] of the exposed asynchronous ones.
    """
    comps = parse(text)
    moves = transfers(comps)
    loops = loop_bodies(comps)
    kinds: dict[str, dict] = {}

    def count(kind, how, nbytes, comp):
        row = kinds.setdefault(kind, dict.fromkeys(("count", "overlapped", "exposed", "synchronous", "bytes",
                                                    "exposed_bytes", "in_loops", "exposed_in_loops"), 0))
        row["count"] += 1
        row[how] += 1
        row["bytes"] += nbytes
        row["in_loops"] += comp in loops
        if how != "overlapped":
            row["exposed_bytes"] += nbytes
            row["exposed_in_loops"] += comp in loops

    for t in moves:
        count(t.kind, "overlapped" if t.overlapped else "exposed", t.bytes, t.computation)
    for comp, instrs in comps.items():
        for ins in instrs:
            if ins.op in COLLECTIVES:
                count(ins.op, "synchronous", result_bytes(ins), comp)
    conds = [(c, ins) for c, instrs in comps.items() for ins in instrs if ins.op == "conditional"]
    with_transfers = {t.computation for t in moves}
    return {
        "collectives": kinds,
        "conditionals": len(conds),
        "conditionals_in_loops": sum(c in loops for c, _ in conds),
        "conditionals_beside_transfers": sum(c in with_transfers for c, _ in conds),
        "kernels": kernel_calls(comps),
        "pallas_kernels": named_kernels(comps),
        "pallas_kernels_rematerialised": named_kernels(comps, rematerialised=True),
        "while_loops": sum(ins.op == "while" for instrs in comps.values() for ins in instrs),
        "exposed": [(t.kind, t.computation) for t in moves if not t.overlapped],
    }


def markdown(rep: dict) -> str:
    """The report as a short markdown table (one row per collective kind) and a line of counts."""
    rows = ["| collective | count | overlapped | exposed | synchronous | in loops (exposed) | MB (exposed) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, r in sorted(rep["collectives"].items()):
        rows.append(f"| {kind} | {r['count']} | {r['overlapped']} | {r['exposed']} | {r['synchronous']} | "
                    f"{r.get('in_loops', 0)} ({r.get('exposed_in_loops', 0)}) | "
                    f"{r.get('bytes', 0) / 1e6:.1f} ({r.get('exposed_bytes', 0) / 1e6:.1f}) |")
    k = rep["kernels"]
    rows.append("")
    rows.append(f"conditionals: {rep['conditionals']} ({rep['conditionals_in_loops']} in loops, "
                f"{rep['conditionals_beside_transfers']} beside transfers); while loops: {rep['while_loops']}; "
                f"kernel call sites: " + ", ".join(f"{n} {c}" for n, c in k.items()))
    if rep.get("pallas_kernels"):
        rows.append("Pallas kernels: " + ", ".join(f"{n} {c}" for n, c in sorted(rep["pallas_kernels"].items())))
    return "\n".join(rows)
