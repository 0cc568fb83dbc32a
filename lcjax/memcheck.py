"""Refuse what cannot fit, before anything is allocated or written.

A command compiles its step (train step, evaluation forward, generation prefill/decode) for abstract
arrays first, then compares XLA's per-device bytes (argument + output + temporary − alias, docs/design.md
"Numbers") with what the devices have: on an accelerator ``device.memory_stats()`` (``bytes_limit`` less
``bytes_in_use``); on CPU the host's available memory (``MemAvailable`` of /proc/meminfo), shared by the
simulated devices of this process, plus whatever the host needs besides (``host_bytes``). The check is
skipped with ``--set train.check_memory=false`` (e.g. when XLA's CPU estimate is too pessimistic).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

HINTS = {
    "train": "fewer bytes per device: a larger mesh.sequence or mesh.model, train.remat=full, "
             "train.offload=layer, train.head_chunks / train.seq_chunk, "
             "train.loss_tile / train.mlp_tile, train.fsdp=true or train.shard_optimizer=true, "
             "train.grad_accum, a shorter data.seq_len or smaller data.global_batch",
    "eval": "fewer bytes per device: shorter --lengths, a smaller --batch-size, a larger mesh.sequence or "
            "mesh.model (--set), train.loss_tile",
    "generate": "fewer bytes per device: a shorter prompt or --max-new-tokens, a larger mesh.sequence or "
                "mesh.model (--set)",
}
BYPASS = "--set train.check_memory=false skips this check"
GPU_MEMORY_FRACTION = "0.95"  # of each GPU's memory for XLA's allocator (JAX's default preallocation: 0.75)


def configure_gpu_allocator(environ=None) -> str:
    """Let JAX's GPU allocator use 95 % of each GPU's memory (``XLA_PYTHON_CLIENT_MEM_FRACTION``) unless the
    user set the fraction or turned preallocation off, so that a step whose compiled per-device bytes fit
    under 95 % of the GPU (docs/memory.md) can run; JAX's default preallocates 75 %. Must run before JAX
    initialises a backend (the CLI calls it first). Returns the fraction in effect ("" when preallocation
    is off)."""
    env = os.environ if environ is None else environ
    if env.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0"):
        return env.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
    return env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)


class DoesNotFit(ValueError):
    """The compiled program needs more memory than the devices have (CLI exit 2, one line)."""


@dataclass(frozen=True)
class Budget:
    """Bytes available per device and where the figure comes from."""

    per_device: int
    source: str


def host_available_bytes() -> int | None:
    """The host's available memory in bytes: MemAvailable of /proc/meminfo, else the free physical pages;
    None when neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def budget(devices, host_bytes: int = 0) -> Budget | None:
    """What each of ``devices`` (this process's, all of one platform) can still hold; None when unknown.

    CPU devices share the host's available memory less ``host_bytes`` (host arrays the command builds
    besides the compiled program); accelerators report ``bytes_limit`` − ``bytes_in_use`` each (the
    smallest over the devices)."""
    devices = list(devices)
    if devices[0].platform == "cpu":
        free = host_available_bytes()
        if free is None:
            return None
        return Budget((free - host_bytes) // len(devices),
                      f"{free / 1e9:.1f} GB available on the host, shared by {len(devices)} cpu devices")
    limits = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return Budget(min(limits), f"{devices[0].device_kind}")


def compiled_bytes(memory_analysis) -> dict:
    """XLA's per-device bytes of a compiled step: argument, output, temp, alias and total (argument +
    output + temp − alias; docs/design.md, "Numbers")."""
    ma = memory_analysis
    parts = {"argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
             "temp": ma.temp_size_in_bytes, "alias": ma.alias_size_in_bytes}
    return {**parts, "total": parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]}


def host_bytes(memory_analysis) -> dict:
    """XLA's host-memory bytes of a compiled step (pinned host buffers, e.g. offloaded remat residuals):
    the ``host_*`` fields of the memory analysis, argument, output, temp, alias and total (argument + output
    + temp − alias); all 0 when the program places nothing in host memory or the backend has no such
    fields."""
    get = lambda name: int(getattr(memory_analysis, f"host_{name}_size_in_bytes", 0) or 0)
    parts = {k: get(k) for k in ("argument", "output", "temp", "alias")}
    return {**parts, "total": parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]}


def compiled_total(compiled) -> int | None:
    """Per-device bytes of a compiled program (:func:`compiled_bytes` total), None when the backend
    has no memory analysis."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # a backend without the analysis
        return None
    return None if ma is None else compiled_bytes(ma)["total"]


def gb(n: int) -> str:
    """``n`` bytes as text for one-line messages: GB (10⁹ bytes) from 10 MB up, MB below."""
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e7 else f"{n / 1e6:.1f} MB"


def check_fits(needed: int | None, devices, *, what: str, kind: str, enabled: bool = True,
               host_bytes: int = 0) -> None:
    """Raise DoesNotFit (one line: needed, available, the keys that would help, how to skip the check)
    when ``needed`` bytes per device (XLA's figure for ``what``) exceed :func:`budget`. Does nothing when
    not ``enabled`` or either figure is unknown. ``kind``: ``train``, ``eval`` or ``generate`` (the hints)."""
    if not enabled or needed is None:
        return
    have = budget(devices, host_bytes)
    if have is None or needed <= have.per_device:
        return
    raise DoesNotFit(f"{what} needs {gb(needed)} per device (XLA, compiled), more than the "
                     f"{gb(max(have.per_device, 0))} available per device ({have.source}); "
                     f"{HINTS[kind]}; {BYPASS}")


def reusing(jitted, executable, *, static=None):
    """``jitted``, calling the ahead-of-time ``executable`` (compiled for the memory check, so the program is
    not compiled twice) when the arguments' types are those it was compiled for; with ``static``, the last
    argument is a static one that must equal it (and is not passed to ``executable``)."""
    def call(*args):
        if static is None or args[-1] == static:
            try:
                return executable(*(args if static is None else args[:-1]))
            except TypeError:  # other shapes, dtypes or shardings than compiled for
                pass
        return jitted(*args)
    return call
