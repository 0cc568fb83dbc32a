"""What the PTX of a compiled GPU program says about its matmul kernels (read without a GPU).

A deviceless compile for a GPU target (``lcjax.sharding.mesh.deviceless_gpus``) with XLA's
``xla_dump_to`` option writes one ``.ptx`` file per kernel. Three facts decide whether a Hopper (sm_90)
attention kernel can be fast, and all three are visible in the text:

- asynchronous tile loads: ``cp.async.{ca,cg}.shared.global`` (Ampere-style, what Triton's software
  pipelining emits) or ``cp.async.bulk`` (TMA). None means every tile load stalls the warps;
- the matrix instruction: Hopper's ``wgmma.mma_async...m64nNk16``; N < 64 leaves most of the tensor
  core idle;
- the Ampere ``mma.sync`` instruction: a fallback that reaches about half of Hopper's peak.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)")
_CP_ASYNC = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared")
_CP_ASYNC_BULK = re.compile(r"\bcp\.async\.bulk\.")
_WGMMA = re.compile(r"\bwgmma\.mma_async(?:\.sp)?\.sync\.aligned\.m64n(\d+)k\d+")
_MMA_SYNC = re.compile(r"\bmma\.sync\.")
MIN_WGMMA_N = 64


class KernelPtx(NamedTuple):
    """Counts of the relevant instructions in one kernel's PTX."""

    name: str  # the .entry name (a Pallas kernel keeps its pallas_call name)
    cp_async: int  # cp.async.{ca,cg} tile loads
    cp_async_bulk: int  # cp.async.bulk (TMA) loads
    wgmma: dict  # {N: count} of wgmma.mma_async m64nNk16 instructions
    mma_sync: int  # Ampere mma.sync instructions

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
                     mma_sync=len(_MMA_SYNC.findall(ptx)))


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
