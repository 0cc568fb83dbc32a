"""All-to-all (Ulysses) sequence parallelism, alone or inside a ring (hybrid), as per-shard code.

DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv:2309.14509, §3): an all-to-all over the U shards of a group
trades the sequence split for a head split — every shard then holds the whole (group's) sequence for N/U
of the heads, attends locally, and a second all-to-all trades back. It moves 4·T·D/U elements per layer
per shard instead of the ring's K/V traffic, but U cannot exceed the number of heads.

Hybrid (Fang & Zhao 2024, "USP", arXiv:2405.07719): the ``sequence`` axis of size P is factorised as
groups of U consecutive shards (Ulysses inside a group) and a ring over the P/U groups (ring attention
across them, lcjax.parallel.ring with ``group=U``). With ``spec.impl`` "allgather" the K/V are gathered
across the groups instead (lcjax.parallel.allgather over :func:`across_groups`).

GQA: K kv heads split over the group when U divides K; when K < U (and K divides U) each kv head is
repeated U/K times before the all-to-all so that shard r gets kv head r // (U/K), the one its query heads
r·N/U … use (the LLaMA "repeat" mapping).

Shapes per shard: q [B, T/P, N', H], k, v [B, T/P, K', H]; positions, segment_ids int32 [B, T/P].
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from lcjax.parallel.allgather import allgather
from lcjax.parallel.ring import ring
from lcjax.parallel.spec import AttentionSpec


def check_heads(n_heads: int, n_kv_heads: int, group: int) -> None:
    """Raise ValueError unless ``n_heads`` query and ``n_kv_heads`` kv heads (per shard) split over
    ``group`` Ulysses shards."""
    if n_heads % group:
        raise ValueError(f"attention.ulysses_size {group} must divide the {n_heads} query heads per shard")
    if n_kv_heads % group and group % n_kv_heads:
        raise ValueError(f"attention.ulysses_size {group} and the {n_kv_heads} kv heads per shard must "
                         f"divide one another")


def _groups(size: int, group: int):
    if group == size:
        return None
    return [list(range(g * group, (g + 1) * group)) for g in range(size // group)]


def _gather_sequence(x, axis_name, groups, group):
    """[B, L] int -> [B, group·L]: the group's tokens in shard order (an all-gather via all-to-all)."""
    tiled = jnp.broadcast_to(x[..., None], x.shape + (group,))
    return lax.all_to_all(tiled, axis_name, 2, 1, axis_index_groups=groups, tiled=True)[..., 0]


def across_groups(size: int, group: int) -> tuple:
    """The shards holding the same heads, one per Ulysses group of ``group`` consecutive shards of
    ``size``: ((0, U, 2U, …), (1, U+1, …), …) — what an all-gather across the groups runs over."""
    return tuple(tuple(range(u, size, group)) for u in range(group))


def zigzag_group_order(local_len: int, group: int) -> np.ndarray:
    """Permutation of a group's gathered tokens [early_0, late_0, early_1, late_1, …] (each shard's two
    zigzag chunks of ``local_len``/2) into [early_0 … early_{U−1}, late_{U−1} … late_0]: the zigzag layout of
    the ring across groups, whose zigzag work balance then applies unchanged."""
    half = local_len // 2
    early = [np.arange(u * local_len, u * local_len + half) for u in range(group)]
    late = [np.arange(u * local_len + half, (u + 1) * local_len) for u in reversed(range(group))]
    return np.concatenate(early + late)


def ulysses_attention(q, k, v, positions, segment_ids, *, axis_name, group=None, layout="zigzag",
                      causal=True, window=None, scale=None, block_q=None, block_k=None, kernel="xla",
                      dkv_dtype="float32", ordered=False):
    """:func:`ulysses` with the spec's fields as keyword arguments (tests, benchmarks)."""
    spec = AttentionSpec(layout=layout, causal=causal, window=window, scale=scale, block_q=block_q,
                         block_k=block_k, kernel=kernel, dkv_dtype=dkv_dtype, ordered=bool(ordered))
    return ulysses(q, k, v, positions, segment_ids, spec, axis_name=axis_name, group=group)


def ulysses(q, k, v, positions, segment_ids, spec: AttentionSpec, *, axis_name, group=None):
    """Sequence-parallel attention by all-to-all over groups of ``group`` shards of ``axis_name``
    (default: the whole axis, pure Ulysses), with a ring across the groups when there are several — or,
    for ``spec.impl`` "allgather", the K/V gathered across them (lcjax.parallel.allgather).

    Args: as lcjax.parallel.ring.ring (``spec`` passed on unchanged); ``group`` must divide the axis size.
    Returns: [B, T/P, N', H] in q's dtype, this shard's tokens in layout order.
    Raises: ValueError when the heads cannot be divided over the group.
    """
    size = lax.axis_size(axis_name)
    group = size if group is None else group
    if size % group:
        raise ValueError(f"attention.ulysses_size {group} must divide mesh.sequence = {size}")
    check_heads(q.shape[2], k.shape[2], group)
    groups = _groups(size, group)
    if k.shape[2] < group:
        k, v = (jnp.repeat(x, group // k.shape[2], axis=2) for x in (k, v))
    heads_to_sequence = lambda x: lax.all_to_all(x, axis_name, 2, 1, axis_index_groups=groups, tiled=True)
    q, k, v = heads_to_sequence(q), heads_to_sequence(k), heads_to_sequence(v)
    positions = _gather_sequence(positions, axis_name, groups, group)
    segment_ids = _gather_sequence(segment_ids, axis_name, groups, group)
    if spec.impl == "allgather":  # every key is gathered: no ring order to keep
        out = allgather(q, k, v, positions, segment_ids, spec, axis_name=axis_name,
                        groups=across_groups(size, group))
        return lax.all_to_all(out, axis_name, 1, 2, axis_index_groups=groups, tiled=True)
    reorder = spec.layout == "zigzag" and group < size
    if reorder:
        order = zigzag_group_order(q.shape[1] // group, group)
        q, k, v = (jnp.take(x, order, axis=1) for x in (q, k, v))
        positions, segment_ids = jnp.take(positions, order, axis=1), jnp.take(segment_ids, order, axis=1)
    out = ring(q, k, v, positions, segment_ids, spec, axis_name=axis_name, group=group)
    if reorder:
        out = jnp.take(out, np.argsort(order), axis=1)
    return lax.all_to_all(out, axis_name, 1, 2, axis_index_groups=groups, tiled=True)
