"""Attention over groups of heads, one group at a time (``train.head_chunks``).

Heads are independent in attention, so computing it for G groups of heads in sequence gives the same
output while the attention's own working set (the ring's float32 output/lse accumulators in the forward,
the float32 dq and travelling dK/dV in the backward; lcjax.parallel.ring) is that of N/G query heads.
The sequence stays sharded exactly as before (every group runs the whole ring); the K/V bytes sent per
layer are unchanged (each group sends its own kv heads), in G times as many, smaller, transfers.

GQA grouping: query head n uses kv head n // (N/K) (docs/design.md), so group g takes the contiguous query heads
[g·N/G, (g+1)·N/G) and kv heads [g·K/G, (g+1)·K/G); G must divide the kv heads on the shard.

Two forms: a ``lax.map`` over the groups (one loop; XLA runs the groups strictly one after another), or the
groups unrolled in the program (``unroll``). The unrolled form exists for host offload of the ring's
residuals (``train.offload=saved``): XLA cannot offload a residual saved inside a loop nested in the
scanned layer (scripts/offload_repro.py, variant ``offload_in_inner_loop``), while unrolled groups name
their residuals in the layer body itself. Measured on the 4M config (docs/memory.md): ``remat=layer``
needs the loop (65.58 GB; unrolled 77.20 GB, XLA overlaps the groups), ``remat=full offload=saved`` the
unrolled form (63.49 GB).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def head_chunked(attend, q, k, v, *, groups: int, unroll: bool = False):
    """``attend(q, k, v)`` computed for ``groups`` groups of heads in sequence (``lax.map``; the backward
    runs the groups' backwards in reverse, from their residuals): q [B, T, N', H], k, v [B, T, K', H] -> [B, T, N', H] like ``attend``.
    ``groups`` 1 calls ``attend`` once; ``unroll``: the groups written out in the program instead of a
    loop (module doc). Raises ValueError when ``groups`` does not divide K'."""
    if groups <= 1:
        return attend(q, k, v)
    b, t, n, h = q.shape
    kh = k.shape[2]
    if kh % groups or n % groups:
        raise ValueError(f"train.head_chunks {groups} must divide the kv heads on a shard ({kh}) and the "
                         f"query heads ({n})")
    if unroll:
        nq, nk = n // groups, kh // groups
        group = lambda x, g, size: x[:, :, g * size:(g + 1) * size]
        return jnp.concatenate([attend(group(q, g, nq), group(k, g, nk), group(v, g, nk))
                                for g in range(groups)], axis=2)
    split = lambda x: x.reshape(b, t, groups, x.shape[2] // groups, h).transpose(2, 0, 1, 3, 4)
    out = lax.map(lambda qkv: attend(*qkv), (split(q), split(k), split(v)))
    return out.transpose(1, 2, 0, 3, 4).reshape(b, t, n, h)
