"""One per-shard entry for every sequence-parallel strategy (what the model and lcjax.attention call)."""

from __future__ import annotations

from lcjax.parallel.allgather import allgather_attention
from lcjax.parallel.ring import ring_attention
from lcjax.parallel.ulysses import ulysses_attention

IMPLS = ("local", "ring", "ulysses", "hybrid", "allgather")


def sequence_parallel_attention(q, k, v, positions, segment_ids, *, impl, axis_name, layout="zigzag",
                                causal=True, window=None, scale=None, block_q=None, block_k=None,
                                kernel="xla", ulysses_size=None, dkv_dtype="float32", ordered=False):
    """Attention of this shard's queries to the whole sequence sharded over ``axis_name``.

    impl: "local" (no sequence parallelism: the axis must have size 1 or be None), "ring" (K/V travel by
    ppermute), "ulysses" (all-to-all over the whole axis), "hybrid" (all-to-all inside groups of
    ``ulysses_size`` shards, ring across them), "allgather" (K/V gathered over the axis, Llama 3 style:
    lcjax.parallel.allgather). ``ordered``: the caller vouches for ordered positions, which lets a ring
    with a window send less (lcjax.parallel.ring.kv_sends); every impl is exact for any positions without
    it. Other arguments and shapes: lcjax.parallel.ring.
    Raises ValueError for an unknown impl or heads the impl cannot divide.
    """
    if impl == "allgather" and axis_name is not None:
        return allgather_attention(q, k, v, positions, segment_ids, axis_name=axis_name, causal=causal,
                                   window=window, scale=scale, block_q=block_q, block_k=block_k, kernel=kernel,
                                   dkv_dtype=dkv_dtype)
    common = dict(layout=layout, causal=causal, window=window, scale=scale, block_q=block_q, block_k=block_k,
                  kernel=kernel, dkv_dtype=dkv_dtype, ordered=ordered)
    if impl in ("local", "allgather"):
        return ring_attention(q, k, v, positions, segment_ids, axis_name=None, **common)
    if impl == "ring":
        return ring_attention(q, k, v, positions, segment_ids, axis_name=axis_name, **common)
    if impl == "ulysses":
        return ulysses_attention(q, k, v, positions, segment_ids, axis_name=axis_name, **common)
    if impl == "hybrid":
        if ulysses_size is None:
            raise ValueError("attention.impl 'hybrid' needs attention.ulysses_size")
        return ulysses_attention(q, k, v, positions, segment_ids, axis_name=axis_name, group=ulysses_size,
                                 **common)
    raise ValueError(f"attention.impl {impl!r} must be one of {', '.join(IMPLS)}")
