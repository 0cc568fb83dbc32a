"""Helpers shared by the benchmark scripts (imported from scripts/ only; imports JAX lazily)."""

from __future__ import annotations

import time


def timed(fn, *args, iters):
    """Median seconds per call of a jitted ``fn`` (compiled and warmed first)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
