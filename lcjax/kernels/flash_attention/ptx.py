"""What the PTX of a compiled GPU program says about its matmul kernels (read without a GPU).

A deviceless compile for a GPU target (``lcjax.sharding.mesh.deviceless_gpus``) with XLA's
``xla_dump_to`` option writes one ``.ptx`` file per kernel. Three facts decide whether a Hopper (sm_90)
attention kernel can be fast, and all three are visible in the text:

- asynchronous tile loads: ``cp.async.{ca,cg}.shared.global`` (Ampere-style, what Triton's software
  pipelining emits) or ``cp.async.bulk`` (TMA). None means every tile load stalls the warps;
- the matrix instruction: Hopper's ``wgmma.mma_async...m64nNk16``; N < 64 leaves most of the tensor
  core idle;
- the Ampere ``mma.sync`` instruction: a fallback that reaches about half of Hopper's peak.

Mosaic GPU kernels (``pallas_mosaic``) are compiled by the CUDA plugin's own pipeline, not XLA's: XLA's dump
holds no PTX for their ``mosaic_gpu_v2`` custom calls. The plugin writes each kernel's PTX and ptxas report
(``NAME_i.ptx``, ``NAME_i.ptxas``) when ``MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1
MOSAIC_GPU_DUMP_TO=DIR`` are set at compile time (read when a kernel is compiled, so they may be set after
``import jax``; DIR must exist). :func:`mosaic_dump` sets them, :func:`read_mosaic_dump` pairs the two files,
and :func:`mosaic_problems` adds the ptxas facts: register spills and TMA loads
(``cp.async.bulk.tensor...shared::cluster.global``).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)")
_CP_ASYNC = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared")
_CP_ASYNC_BULK = re.compile(r"\bcp\.async\.bulk\.")
_WGMMA = re.compile(r"\bwgmma\.mma_async(?:\.sp)?\.sync\.aligned\.m64n(\d+)k\d+")
_MMA_SYNC = re.compile(r"\bmma\.sync\.")
_TMA_LOAD = re.compile(r"\bcp\.async\.bulk\.tensor\.\dd\.shared::cluster\.global")
MIN_WGMMA_N = 64


class KernelPtx(NamedTuple):
    """Counts of the relevant instructions in one kernel's PTX."""

    name: str  # the .entry name (a Pallas kernel keeps its pallas_call name)
    cp_async: int  # cp.async.{ca,cg} tile loads
    cp_async_bulk: int  # cp.async.bulk (TMA) loads
    wgmma: dict  # {N: count} of wgmma.mma_async m64nNk16 instructions
    mma_sync: int  # Ampere mma.sync instructions
    tma_loads: int = 0  # cp.async.bulk.tensor global -> shared (TMA tile loads)

    @property
    def is_matmul(self) -> bool:
        return bool(self.wgmma) or self.mma_sync > 0

    def summary(self) -> str:
        shapes = ", ".join(f"m64n{n}k16 x{c}" for n, c in sorted(self.wgmma.items())) or "none"
        return (f"{self.name}: cp.async {self.cp_async}, cp.async.bulk {self.cp_async_bulk}, wgmma {shapes}, "
                f"mma.sync {self.mma_sync}")


def parse(ptx: str) -> KernelPtx:
    """Facts of one PTX text (the first ``.entry`` names it; "" when there is none)."""
    entry = _ENTRY.search(ptx)
    return KernelPtx(name=entry.group(1) if entry else "",
                     cp_async=len(_CP_ASYNC.findall(ptx)),
                     cp_async_bulk=len(_CP_ASYNC_BULK.findall(ptx)),
                     wgmma=dict(sorted(Counter(int(n) for n in _WGMMA.findall(ptx)).items())),
                     mma_sync=len(_MMA_SYNC.findall(ptx)),
                     tma_loads=len(_TMA_LOAD.findall(ptx)))


def read_dump(directory) -> list[KernelPtx]:
    """Facts of every ``*.ptx`` file under ``directory`` (an XLA dump), sorted by kernel name."""
    return sorted((parse(p.read_text()) for p in Path(directory).rglob("*.ptx")), key=lambda k: k.name)


def hopper_problems(kernel: KernelPtx) -> list[str]:
    """Why a matmul kernel cannot run at Hopper speed ([] when it loads asynchronously, uses only wgmma
    with N >= 64 and no mma.sync; always [] for a kernel without matmuls)."""
    if not kernel.is_matmul:
        return []
    problems = []
    if kernel.cp_async + kernel.cp_async_bulk == 0:
        problems.append(f"{kernel.name}: no asynchronous tile loads (cp.async / cp.async.bulk)")
    small = sorted(n for n in kernel.wgmma if n < MIN_WGMMA_N)
    if small:
        problems.append(f"{kernel.name}: wgmma with N = {small} < {MIN_WGMMA_N}")
    if kernel.mma_sync:
        problems.append(f"{kernel.name}: {kernel.mma_sync} Ampere mma.sync instructions")
    if not kernel.wgmma:
        problems.append(f"{kernel.name}: no wgmma")
    return problems


def compile_and_read(lowered, directory) -> list[KernelPtx]:
    """Compile a ``jax.jit(...).lower(...)`` result with its PTX dumped to ``directory`` and read it."""
    lowered.compile(compiler_options={"xla_dump_to": str(directory)})
    return read_dump(directory)


# ------------------------------------------------------------------------------- Mosaic GPU dumps

_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
MOSAIC_DUMP_ENV = ("MOSAIC_GPU_DUMP_PTX", "MOSAIC_GPU_DUMP_PTXAS", "MOSAIC_GPU_DUMP_TO")


class PtxasReport(NamedTuple):
    """One kernel's ``ptxas -v`` facts."""

    name: str
    registers: int
    stack_bytes: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes


def parse_ptxas(text: str) -> PtxasReport | None:
    """Facts of a ptxas report (the first entry function), None when it names none."""
    entry, frame, regs = _PTXAS_ENTRY.search(text), _PTXAS_FRAME.search(text), _PTXAS_REGS.search(text)
    if not (entry and frame and regs):
        return None
    stack, stores, loads = map(int, frame.groups())
    return PtxasReport(entry.group(1), int(regs.group(1)), stack, stores, loads)


@contextlib.contextmanager
def mosaic_dump(directory):
    """Within the block, Mosaic GPU compiles write each kernel's PTX and ptxas report to ``directory``
    (created); the previous environment is restored afterwards."""
    os.makedirs(directory, exist_ok=True)
    saved = {k: os.environ.get(k) for k in MOSAIC_DUMP_ENV}
    os.environ.update({"MOSAIC_GPU_DUMP_PTX": "1", "MOSAIC_GPU_DUMP_PTXAS": "1",
                       "MOSAIC_GPU_DUMP_TO": str(directory)})
    try:
        yield Path(directory)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def read_mosaic_dump(directory) -> list[tuple[KernelPtx, PtxasReport | None]]:
    """(PTX facts, ptxas report or None) of every Mosaic GPU kernel dumped to ``directory``, sorted by
    kernel name. The plugin also writes a large MLIR pass log per kernel; it is deleted here."""
    for log in Path(directory).glob("*.mlir-passes.log"):
        log.unlink()
    out = []
    for path in sorted(Path(directory).glob("*.ptx")):
        report = path.with_suffix(".ptxas")
        out.append((parse(path.read_text()), parse_ptxas(report.read_text()) if report.exists() else None))
    return sorted(out, key=lambda kr: kr[0].name)


def mosaic_problems(kernel: KernelPtx, report: PtxasReport | None) -> list[str]:
    """Why a Mosaic GPU matmul kernel cannot run at Hopper speed: :func:`hopper_problems`, plus no TMA
    loads, register spills, or a missing ptxas report ([] when none applies)."""
    problems = hopper_problems(kernel)
    if kernel.is_matmul and kernel.tma_loads == 0:
        problems.append(f"{kernel.name}: no TMA loads (cp.async.bulk.tensor global -> shared)")
    if report is None:
        problems.append(f"{kernel.name}: no ptxas report")
    elif report.spill_stores or report.spill_loads:
        problems.append(f"{kernel.name}: register spills ({report.spill_stores} bytes stored, "
                        f"{report.spill_loads} bytes loaded; {report.registers} registers)")
    return problems


def compile_and_read_mosaic(lowered, directory) -> list[tuple[KernelPtx, PtxasReport | None]]:
    """Compile a ``jax.jit(...).lower(...)`` result with Mosaic GPU's PTX and ptxas reports dumped to
    ``directory`` and read them (:func:`read_mosaic_dump`). A kernel already compiled in this process
    (same shapes) is not compiled again and so not dumped."""
    with mosaic_dump(directory):
        lowered.compile()
    return read_mosaic_dump(directory)
