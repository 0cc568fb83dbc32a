"""One per-shard entry for every sequence-parallel strategy (what the model and lcjax.attention call):
a table from ``spec.impl`` to its implementation, each taking the :class:`AttentionSpec` unchanged."""

from __future__ import annotations

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


# spec.impl -> implementation; its keys are lcjax.choices.ATTENTION_IMPLS (tests/test_choices.py)
IMPLEMENTATIONS = {"local": _local, "ring": _ring, "ulysses": _ulysses, "hybrid": _hybrid}
IMPLS = tuple(IMPLEMENTATIONS)


def sequence_parallel(q, k, v, positions, segment_ids, spec: AttentionSpec, *, axis_name):
    """Attention of this shard's queries to the whole sequence sharded over ``axis_name``.

    spec.impl: "local" (no sequence parallelism: the axis must have size 1 or be None), "ring" (K/V travel
    by ppermute), "ulysses" (all-to-all over the whole axis), "hybrid" (all-to-all inside groups of
    ``spec.ulysses_size`` shards, ring across them). Shapes: q [B, T/P, N', H]; k, v [B, T/P, K', H];
    positions, segment_ids int32 [B, T/P] in ``spec.layout`` order; returns [B, T/P, N', H] in q's dtype
    (lcjax.parallel.ring.ring). Raises ValueError for an unknown impl or heads the impl cannot divide.
    """
    if spec.impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention.impl {spec.impl!r} must be one of {', '.join(IMPLS)}")
    return IMPLEMENTATIONS[spec.impl](q, k, v, positions, segment_ids, spec, axis_name)


def sequence_parallel_attention(q, k, v, positions, segment_ids, *, impl, axis_name, layout="zigzag",
                                causal=True, window=None, scale=None, block_q=None, block_k=None,
                                kernel="xla", ulysses_size=None, dkv_dtype="float32"):
    """:func:`sequence_parallel` with the spec's fields as keyword arguments (tests, benchmarks)."""
    spec = AttentionSpec(impl=impl, layout=layout, window=window, block_q=block_q, block_k=block_k,
                         kernel=kernel, dkv_dtype=dkv_dtype, ulysses_size=ulysses_size, causal=causal, scale=scale)
    return sequence_parallel(q, k, v, positions, segment_ids, spec, axis_name=axis_name)
