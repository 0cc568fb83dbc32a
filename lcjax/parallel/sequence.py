"""One per-shard entry for every sequence-parallel strategy (what the model and lcjax.attention call):
a table from ``spec.impl`` to its implementation, each taking the :class:`AttentionSpec` unchanged."""

from __future__ import annotations

from lcjax.parallel.allgather import allgather
from lcjax.parallel.ring import ring
from lcjax.parallel.spec import AttentionSpec
from lcjax.parallel.ulysses import ulysses


def _local(q, k, v, positions, segment_ids, spec: AttentionSpec, axis_name):
    return ring(q, k, v, positions, segment_ids, spec, axis_name=None)


def _ring(q, k, v, positions, segment_ids, spec: AttentionSpec, axis_name):
    return ring(q, k, v, positions, segment_ids, spec, axis_name=axis_name)


def _ulysses(q, k, v, positions, segment_ids, spec: AttentionSpec, axis_name):
    return ulysses(q, k, v, positions, segment_ids, spec, axis_name=axis_name)


def _hybrid(q, k, v, positions, segment_ids, spec: AttentionSpec, axis_name):
    if spec.ulysses_size is None:
        raise ValueError("attention.impl 'hybrid' needs attention.ulysses_size")
    return ulysses(q, k, v, positions, segment_ids, spec, axis_name=axis_name, group=spec.ulysses_size)


def _allgather(q, k, v, positions, segment_ids, spec: AttentionSpec, axis_name):
    if axis_name is None:  # no sequence axis: nothing to gather
        return ring(q, k, v, positions, segment_ids, spec, axis_name=None)
    if spec.ulysses_size not in (None, 1):  # Ulysses inside groups, gathered across them
        return ulysses(q, k, v, positions, segment_ids, spec, axis_name=axis_name, group=spec.ulysses_size)
    return allgather(q, k, v, positions, segment_ids, spec, axis_name=axis_name)


# spec.impl -> implementation; its keys are lcjax.choices.ATTENTION_IMPLS (tests/core/test_choices.py)
IMPLEMENTATIONS = {"local": _local, "ring": _ring, "ulysses": _ulysses, "hybrid": _hybrid, "allgather": _allgather}
IMPLS = tuple(IMPLEMENTATIONS)


def sequence_parallel(q, k, v, positions, segment_ids, spec: AttentionSpec, *, axis_name):
    """Attention of this shard's queries to the whole sequence sharded over ``axis_name``.

    spec.impl: "local" (no sequence parallelism: the axis must have size 1 or be None), "ring" (K/V travel
    by ppermute), "ulysses" (all-to-all over the whole axis), "hybrid" (all-to-all inside groups of
    ``spec.ulysses_size`` shards, ring across them), "allgather" (K/V gathered over the axis, Llama 3 style:
    lcjax.parallel.allgather; with ``spec.ulysses_size`` U, all-to-all inside groups of U and the K/V
    gathered across the groups). Shapes: q [B, T/P, N', H]; k, v [B, T/P, K', H];
    positions, segment_ids int32 [B, T/P] in ``spec.layout`` order; returns [B, T/P, N', H] in q's dtype
    (lcjax.parallel.ring.ring). Raises ValueError for an unknown impl or heads the impl cannot divide.
    """
    if spec.impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention.impl {spec.impl!r} must be one of {', '.join(IMPLS)}")
    return IMPLEMENTATIONS[spec.impl](q, k, v, positions, segment_ids, spec, axis_name)


def sequence_parallel_attention(q, k, v, positions, segment_ids, *, impl, axis_name, layout="zigzag",
                                causal=True, window=None, scale=None, block_q=None, block_k=None,
                                kernel="xla", ulysses_size=None, dkv_dtype="float32", ordered=False):
    """:func:`sequence_parallel` with the spec's fields as keyword arguments (tests, benchmarks)."""
    spec = AttentionSpec(impl=impl, layout=layout, window=window, block_q=block_q, block_k=block_k,
                         kernel=kernel, dkv_dtype=dkv_dtype, ulysses_size=ulysses_size, causal=causal, scale=scale,
                         ordered=bool(ordered))
    return sequence_parallel(q, k, v, positions, segment_ids, spec, axis_name=axis_name)


def forward_recv_bytes(spec: AttentionSpec, n_shards: int, seq_len: int, *, batch: int = 1, heads: int = 32,
                       kv_heads: int = 8, head_dim: int = 128, itemsize: int = 2) -> int:
    """Bytes one of ``n_shards`` shards receives in one attention forward over ``seq_len`` tokens (the
    inputs' exchange; positions and segment ids, int32, included; Ulysses' output all-to-all left out), for
    ``batch`` sequences of ``heads`` query and ``kv_heads`` kv heads of ``head_dim`` at ``itemsize`` bytes.

    By ``spec.impl`` (with ``spec.layout``, ``causal``, ``window``, ``ordered``, ``ulysses_size``): ring: the
    K/V blocks of lcjax.parallel.ring.kv_sends (a window with ordered positions in the contiguous or zigzag
    layout receives only what it can see; ``recv_bytes``); allgather: the other P−1 blocks' K/V; ulysses:
    (P−1)/P of the group's q, k, v for its heads (kv heads repeated up to the group when fewer) plus the
    group's positions; hybrid: Ulysses inside groups of ``ulysses_size``, then a ring across the groups on
    1/``ulysses_size`` of the heads (allgather with ``ulysses_size``: the other groups' K/V of those heads
    gathered instead); local: 0. Raises ValueError for another impl or a ``ulysses_size``
    that does not divide the shards.
    """
    from lcjax.parallel.ring import recv_bytes

    impl, local = spec.impl, seq_len // n_shards
    per_token_kv = 2 * kv_heads * head_dim * itemsize + 8
    ring_kw = dict(layout=spec.layout, causal=spec.causal, window=spec.window, batch=batch, head_dim=head_dim,
                   itemsize=itemsize, ordered=spec.ordered)
    if impl == "local" or n_shards == 1:
        return 0
    if impl == "ring":
        return recv_bytes(n_shards, seq_len, kv_heads=kv_heads, **ring_kw)
    if impl == "allgather" and spec.ulysses_size in (None, 1):
        return batch * (n_shards - 1) * local * per_token_kv
    if impl in ("ulysses", "hybrid", "allgather"):
        u = n_shards if impl == "ulysses" else spec.ulysses_size
        if not u or n_shards % u:
            raise ValueError(f"attention.ulysses_size {u} must divide the {n_shards} shards")
        qkv = (heads + 2 * max(kv_heads, u)) * head_dim * itemsize
        gathered = batch * (u - 1) * local * (qkv // u + 8)
        if u == n_shards:
            return gathered
        if impl == "allgather":  # the other groups' K/V of this shard's 1/U of the kv heads
            kv_per_token = 2 * max(kv_heads, u) // u * head_dim * itemsize + 8
            return gathered + batch * (n_shards // u - 1) * u * local * kv_per_token
        return gathered + recv_bytes(n_shards // u, seq_len, kv_heads=max(kv_heads, u) // u, **ring_kw)
    raise ValueError(f"attention.impl {impl!r} must be one of {', '.join(IMPLS)}")
