"""XLA flags for GPU backends that let the train step's collectives run under its compute.

XLA reads ``XLA_FLAGS`` once, when JAX starts its first backend; importing :mod:`lcjax` (which every entry
point does before JAX starts) adds the flags below to the environment, after the user's own: a flag the
user already set keeps the user's value. ``LCJAX_XLA_FLAGS=0`` leaves ``XLA_FLAGS`` untouched. XLA aborts
the process on a flag it does not know, and flags come and go between XLA versions, so only flags whose
names appear in the installed jaxlib's XLA library are added (none when that library cannot be found). The flags
name GPU passes only; CPU programs compile the same with or without them. What each does, and what it
changed in the deviceless H100 compiles of lcjax's train step, is in docs/performance.md.

Standard library only (imported by ``lcjax/__init__`` before JAX).
"""

from __future__ import annotations

import glob
import importlib.util
import mmap
import os
import re

#: flag -> (value, why). Sources: XLA's ``debug_options_flags.cc`` (names and defaults), JAX's "GPU
#: performance tips" and NVIDIA's JAX-Toolbox "GPU performance" page (the set MaxText also uses).
GPU_FLAGS: dict[str, tuple[str, str]] = {
    "xla_gpu_enable_latency_hiding_scheduler": (
        "true", "schedule each asynchronous collective's start early and its done late, around compute"),
    "xla_gpu_enable_pipelined_all_gather": (
        "true", "FSDP: the all-gather of the next layer's weights issued one loop iteration ahead"),
    "xla_gpu_enable_pipelined_reduce_scatter": (
        "true", "ZeRO/FSDP: a layer's gradient reduce-scatter finished during the next layer's backward"),
    "xla_gpu_enable_pipelined_all_reduce": (
        "true", "a layer's gradient all-reduce finished during the next layer's backward"),
    "xla_gpu_experimental_parallel_collective_overlap_limit": (
        "4", "up to 4 asynchronous collectives in flight at once (default 1): a ring step's K/V, positions "
             "and dK/dV transfers, or an FSDP gather beside them, no longer wait for each other"),
    "xla_gpu_collective_permute_combine_threshold_bytes": (
        "1073741824", "combine the permutes a ring step issues (K, V, positions, segment ids) into one"),
    "xla_gpu_all_reduce_combine_threshold_bytes": (
        "134217728", "combine small all-reduces into ones of up to 128 MiB (fewer launches)"),
    "xla_gpu_all_gather_combine_threshold_bytes": (
        "134217728", "combine small all-gathers into ones of up to 128 MiB"),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": (
        "134217728", "combine small reduce-scatters into ones of up to 128 MiB"),
}

OPT_OUT = "LCJAX_XLA_FLAGS"
_FLAG = re.compile(r"--([A-Za-z0-9_]+)")


def with_gpu_flags(existing: str, flags: dict[str, tuple[str, str]] = GPU_FLAGS) -> str:
    """``existing`` (an ``XLA_FLAGS`` string) followed by every flag of ``flags`` it does not already set.

    >>> with_gpu_flags("--xla_gpu_enable_pipelined_all_gather=false", {
    ...     "xla_gpu_enable_pipelined_all_gather": ("true", ""), "xla_gpu_enable_latency_hiding_scheduler": ("true", "")})
    '--xla_gpu_enable_pipelined_all_gather=false --xla_gpu_enable_latency_hiding_scheduler=true'
    """
    present = set(_FLAG.findall(existing))
    added = [f"--{name}={value}" for name, (value, _) in flags.items() if name not in present]
    return " ".join(part for part in (existing.strip(), *added) if part)


def known_flags(names, libraries=None) -> set[str]:
    """The subset of flag ``names`` that the installed XLA defines: each name is looked up as bytes in
    jaxlib's shared libraries (``libraries`` replaces them, for tests) without importing JAX. Empty when
    jaxlib is not installed."""
    if libraries is None:
        try:
            spec = importlib.util.find_spec("jaxlib")
        except (ImportError, ValueError):
            spec = None
        roots = list(spec.submodule_search_locations or []) if spec else []
        libraries = [f for root in roots for f in glob.glob(os.path.join(root, "*.so"))]
    found: set[str] = set()
    for path in libraries:
        try:
            with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                found |= {n for n in names if n not in found and data.find(n.encode() + b"\0") >= 0}
        except (OSError, ValueError):
            continue
    return found


def apply(environ=os.environ, known=None) -> bool:
    """Add :data:`GPU_FLAGS` that this XLA knows (:func:`known_flags`; ``known`` replaces the lookup) to
    ``environ["XLA_FLAGS"]`` (the user's flags win); True if it changed.

    Does nothing when ``LCJAX_XLA_FLAGS=0``. Effective only before JAX starts its first backend.
    """
    if environ.get(OPT_OUT, "1") == "0":
        return False
    before = environ.get("XLA_FLAGS", "")
    missing = [n for n in GPU_FLAGS if n not in set(_FLAG.findall(before))]
    if not missing:
        return False
    known = known_flags(missing) if known is None else known
    after = with_gpu_flags(before, {n: v for n, v in GPU_FLAGS.items() if n in known})
    if after == before:
        return False
    environ["XLA_FLAGS"] = after
    return True
