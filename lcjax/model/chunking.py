"""Attention over groups of heads, one group at a time (``train.head_chunks``).

Heads are independent in attention, so computing it for G groups of heads in sequence gives the same
output while the attention's own working set (the ring's float32 output/lse accumulators in the forward,
the float32 dq and travelling dK/dV in the backward; lcjax.parallel.ring) is that of N/G query heads.
The sequence stays sharded exactly as before (every group runs the whole ring); the K/V bytes sent per
layer are unchanged (each group sends its own kv heads), in G times as many, smaller, transfers.

GQA grouping: query head n uses kv head n // (N/K) (DESIGN.md), so group g takes the contiguous query heads
[g·N/G, (g+1)·N/G) and kv heads [g·K/G, (g+1)·K/G); G must divide the kv heads on the shard.
"""

from __future__ import annotations

from jax import lax


def head_chunked(attend, q, k, v, *, groups: int):
    """``attend(q, k, v)`` computed for ``groups`` groups of heads in sequence (``lax.map``; the backward
    runs the groups' backwards in reverse, from their residuals): q [B, T, N', H], k, v [B, T, K', H] -> [B, T, N', H] like ``attend``.
    ``groups`` 1 calls ``attend`` once. Raises ValueError when ``groups`` does not divide K'."""
    if groups <= 1:
        return attend(q, k, v)
    b, t, n, h = q.shape
    kh = k.shape[2]
    if kh % groups or n % groups:
        raise ValueError(f"train.head_chunks {groups} must divide the kv heads on a shard ({kh}) and the "
                         f"query heads ({n})")
    split = lambda x: x.reshape(b, t, groups, x.shape[2] // groups, h).transpose(2, 0, 1, 3, 4)
    out = lax.map(lambda qkv: attend(*qkv), (split(q), split(k), split(v)))
    return out.transpose(1, 2, 0, 3, 4).reshape(b, t, n, h)
