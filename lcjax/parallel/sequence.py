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


def forward_recv_bytes(impl: str, n_shards: int, seq_len: int, *, layout: str = "zigzag", causal: bool = True,
                       window: int | None = None, batch: int = 1, heads: int = 32, kv_heads: int = 8,
                       head_dim: int = 128, itemsize: int = 2, ulysses_size: int | None = None,
                       ordered: bool = True) -> int:
    """Bytes one of ``n_shards`` shards receives in one attention forward over ``seq_len`` tokens (the
    inputs' exchange; positions and segment ids, int32, included; Ulysses' output all-to-all left out).

    ring: the K/V blocks of lcjax.parallel.ring.kv_sends (a window with ordered positions in the
    contiguous or zigzag layout receives only what it can see; ``recv_bytes``); allgather: the other
    P−1 blocks' K/V; ulysses: (P−1)/P of the group's q, k, v for its heads (kv heads repeated up to the
    group when fewer) plus the group's positions; hybrid: Ulysses inside groups of ``ulysses_size``, then a
    ring across the groups on 1/``ulysses_size`` of the heads; local: 0. Raises ValueError for another impl.
    """
    from lcjax.parallel.ring import recv_bytes

    local = seq_len // n_shards
    per_token_kv = 2 * kv_heads * head_dim * itemsize + 8
    if impl == "local" or n_shards == 1:
        return 0
    if impl == "ring":
        return recv_bytes(n_shards, seq_len, layout=layout, causal=causal, window=window, batch=batch,
                          kv_heads=kv_heads, head_dim=head_dim, itemsize=itemsize, ordered=ordered)
    if impl == "allgather":
        return batch * (n_shards - 1) * local * per_token_kv
    if impl in ("ulysses", "hybrid"):
        u = n_shards if impl == "ulysses" else ulysses_size
        if not u or n_shards % u:
            raise ValueError(f"attention.ulysses_size {u} must divide the {n_shards} shards")
        qkv = (heads + 2 * max(kv_heads, u)) * head_dim * itemsize
        gathered = batch * (u - 1) * local * (qkv // u + 8)
        if u == n_shards:
            return gathered
        ring = recv_bytes(n_shards // u, seq_len, layout=layout, causal=causal, window=window, batch=batch,
                          kv_heads=max(kv_heads, u) // u, head_dim=head_dim, itemsize=itemsize, ordered=ordered)
        return gathered + ring
    raise ValueError(f"attention.impl {impl!r} must be one of {', '.join(IMPLS)}")
