"""All-gather context parallelism (per-shard code, run inside ``shard_map``), as Llama 3 trained at 128k.

Every shard gathers the K/V of all P shards of the ``sequence`` axis (only the K kv heads: with GQA the
K/V are a fraction G = N/K of the queries' size, so gathering them is cheap next to the attention
compute), with their positions and segment ids, and attends its own T/P queries to all T keys (Dubey et al.
2024, "The Llama 3 Herd of Models", arXiv:2407.21783, §3.3.2 "context parallelism"). The local block is
attended first, from the shard's own K/V, so the gather is in flight meanwhile; then the other P−1 blocks,
merged by their log-sum-exp (lcjax.parallel.ring.merge).

Masks come from positions and segment ids only, so every layout and every mask (causal, window,
documents, arbitrary positions or reused segment ids) is exact; the kernel skips the tiles that the
actual position and segment ranges rule out.

The backward (``custom_vjp``) gathers the K/V again rather than keeping the gathered copy alive between
the passes (residuals stay O(T/P)), computes dq at home and the dK/dV of every shard's block, and
reduce-scatters those over the axis (``psum_scatter``) so each shard receives the sum for its own block.

Per shard per layer: forward receives (P−1)·T/P tokens of K/V; backward receives them again and
reduce-scatters (P−1)·T/P tokens of dK/dV. Peak extra memory: the gathered K/V [B, (P−1)·T/P, K', H] ×2 and,
in the backward, their float32 gradients.

Inside Ulysses groups (``attention.ulysses_size`` U, lcjax.parallel.ulysses): an all-to-all first gives each
shard its group's U·T/P tokens for N'/U of the heads, then the K/V are gathered over ``groups`` — the P/U
shards that hold the same heads, one per Ulysses group (``axis_index_groups``) — so each shard gathers
its 1/U of the kv heads for the (P/U − 1)·U·T/P tokens of the other groups: the gathered K/V (memory and
bytes) shrink by (P/U − 1)/(P − 1), for as many Ulysses shards as the heads allow, plus the all-to-alls.

Shapes (per shard): q [B, T/P, N', H]; k, v [B, T/P, K', H]; positions, segment_ids int32 [B, T/P].
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from lcjax.kernels.flash_attention.api import get_kernel
from lcjax.parallel.ring import checked_segments, in_flight, merge
from lcjax.parallel.spec import AttentionSpec


class GatherPlan(NamedTuple):
    """Static settings of one all-gather attention (hashable: a non-differentiable custom VJP argument):
    the attention spec, unchanged, the axis K/V are gathered over and ``groups``: None (the whole axis) or
    the shards gathered together (a tuple of equal-size tuples of axis indices covering the axis)."""

    spec: AttentionSpec
    axis_name: str
    groups: tuple | None = None


def _size_and_index(axis_name: str, groups):
    """(shards gathered together, this shard's place among them) over ``axis_name`` or its ``groups``."""
    if groups is None:
        return lax.axis_size(axis_name), lax.axis_index(axis_name)
    place = np.zeros(sum(len(g) for g in groups), np.int32)
    for g in groups:
        place[list(g)] = np.arange(len(g))
    return len(groups[0]), jnp.asarray(place)[lax.axis_index(axis_name)]


def _index_groups(groups):
    return None if groups is None else [list(g) for g in groups]


def _rotation(idx, size: int, start: int):
    """int32 [size − start]: shard indices idx+start, idx+start+1, … (mod size)."""
    return (idx + start + jnp.arange(size - start, dtype=jnp.int32)) % size


def gather_others(x, axis_name: str, groups=None):
    """[B, L, ...] on each shard -> [B, (P−1)·L, ...]: the blocks of the other P−1 shards of ``axis_name``
    (of its group among ``groups``, P then the group size), in the order idx+1, idx+2, … (mod P)."""
    size, idx = _size_and_index(axis_name, groups)
    gathered = lax.all_gather(x, axis_name, axis_index_groups=_index_groups(groups))  # [P, B, L, ...]
    rest = jnp.take(gathered, _rotation(idx, size, 1), axis=0)
    return jnp.moveaxis(rest, 0, 1).reshape(x.shape[0], (size - 1) * x.shape[1], *x.shape[2:])


def scatter_home(own, others, axis_name: str, groups=None):
    """The inverse of :func:`gather_others` for gradients: ``own`` [B, L, ...] (this shard's block) and
    ``others`` [B, (P−1)·L, ...] (the other blocks, in :func:`gather_others` order) summed over the axis (or
    this shard's group of ``groups``) into each block's owner: returns this shard's [B, L, ...] (a
    reduce-scatter)."""
    size, idx = _size_and_index(axis_name, groups)
    b, n = own.shape[:2]
    blocks = jnp.moveaxis(others.reshape(b, size - 1, n, *own.shape[2:]), 1, 0)
    ring_order = jnp.concatenate([own[None], blocks])  # blocks of shards idx, idx+1, ...
    by_shard = jnp.take(ring_order, (jnp.arange(size, dtype=jnp.int32) - idx) % size, axis=0)
    return lax.psum_scatter(by_shard, axis_name, scatter_dimension=0, axis_index_groups=_index_groups(groups))


def _tie(q, k, v, pos, seg):
    """The inputs tied together by an optimization barrier, so that XLA cannot hoist the (layer-invariant)
    position/segment gathers and masks out of a layer scan and keep every layer's alive at once (as
    lcjax.parallel.ring._ring_geometry does)."""
    return lax.optimization_barrier((q, k, v, pos, seg))


def _kw(plan: GatherPlan):
    return plan.spec.kernel_options()


def _fwd(q, k, v, pos, seg, plan: GatherPlan):
    """Local block first (its K/V need no transfer), then the gathered rest; residuals O(T/P) with the
    checkpoint names ``attention``/``attention_lse`` as in the ring."""
    kernel, kw = get_kernel(plan.spec.kernel), _kw(plan)
    q, k, v, pos, seg = _tie(q, k, v, pos, seg)
    if _size_and_index(plan.axis_name, plan.groups)[0] == 1:
        out, lse = kernel.flash_forward(q, k, v, pos, pos, seg, seg, **kw)
        return out.astype(q.dtype), (q, k, v, pos, seg, out.astype(q.dtype), lse)
    rest = [gather_others(x, plan.axis_name, plan.groups) for x in (k, v, pos, seg)]  # in flight meanwhile
    acc = kernel.flash_forward(q, k, v, pos, pos, seg, seg, **kw)
    acc, rest = in_flight(acc, rest)  # inside Ulysses groups XLA otherwise left the gather exposed (H100)
    r_k, r_v, r_pos, r_seg = rest
    out, lse = merge(*acc, *kernel.flash_forward(q, r_k, r_v, pos, r_pos, seg, r_seg, **kw))
    out = checkpoint_name(out.astype(q.dtype), "attention")
    lse = checkpoint_name(lse, "attention_lse")
    return out, (q, k, v, pos, seg, out, lse)


def _bwd(plan: GatherPlan, res, dout):
    """dq at home; the dK/dV of the gathered blocks reduce-scattered back to their owners in
    ``plan.spec.dkv_dtype``."""
    q, k, v, pos, seg, out, lse = res
    kernel, kw = get_kernel(plan.spec.kernel), _kw(plan)
    q, k, v, pos, seg = _tie(q, k, v, pos, seg)
    wire = jnp.dtype(plan.spec.dkv_dtype)
    zeros_int = lambda x: jnp.zeros(x.shape, jax.dtypes.float0)
    if _size_and_index(plan.axis_name, plan.groups)[0] == 1:
        dq, dk, dv = kernel.flash_backward(q, k, v, out, lse, dout, pos, pos, seg, seg, **kw)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zeros_int(pos), zeros_int(seg)
    r_k, r_v, r_pos, r_seg = (gather_others(x, plan.axis_name, plan.groups) for x in (k, v, pos, seg))
    dq, dk, dv = kernel.flash_backward(q, k, v, out, lse, dout, pos, pos, seg, seg, **kw)
    dq_r, dk_r, dv_r = kernel.flash_backward(q, r_k, r_v, out, lse, dout, pos, r_pos, seg, r_seg, **kw)
    home = lambda own, rest: scatter_home(own.astype(wire), rest.astype(wire), plan.axis_name, plan.groups)
    dk, dv = home(dk, dk_r), home(dv, dv_r)
    return (dq + dq_r).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zeros_int(pos), zeros_int(seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _allgather(q, k, v, pos, seg, plan):
    return _fwd(q, k, v, pos, seg, plan)[0]


_allgather.defvjp(_fwd, _bwd)


def allgather_attention(q, k, v, positions, segment_ids, *, axis_name, causal=True, window=None, scale=None,
                        block_q=None, block_k=None, kernel="xla", dkv_dtype="float32"):
    """:func:`allgather` with the spec's fields as keyword arguments (tests, benchmarks)."""
    spec = AttentionSpec(impl="allgather", causal=causal, window=window, scale=scale, block_q=block_q,
                         block_k=block_k, kernel=kernel, dkv_dtype=dkv_dtype)
    return allgather(q, k, v, positions, segment_ids, spec, axis_name=axis_name)


def allgather(q, k, v, positions, segment_ids, spec: AttentionSpec, *, axis_name, groups=None):
    """Attention of this shard's queries to the whole sequence, by gathering K/V over ``axis_name``.

    Args:
      q: [B, T/P, N', H]; k, v: [B, T/P, K', H] (GQA: query head n uses kv head n // (N'/K')).
      positions, segment_ids: int32 [B, T/P] of this shard's tokens, in any layout order (any values;
        segment_ids None: one document).
      spec: the attention settings (causal, window, scale as in lcjax.ops.attention.reference; block_q,
        block_k: the kernel's tiles (None: its own); kernel; dkv_dtype: dtype of the dK/dV reduce-scatter,
        "float32" or "bfloat16"). ``spec.impl``, ``layout`` and ``ordered`` are not read here.
      axis_name: the mesh axis the sequence is sharded over.
      groups: None (gather over the whole axis) or a tuple of equal-size tuples of axis indices that
        gather among themselves (the shards holding the same heads inside Ulysses groups).
    Returns:
      [B, T/P, N', H] in q's dtype.
    Raises:
      ValueError for a window without causal masking or an unknown ``dkv_dtype``.
    """
    segment_ids = checked_segments(positions, segment_ids, causal=spec.causal, window=spec.window,
                                   dkv_dtype=spec.dkv_dtype)
    groups = None if groups is None else tuple(tuple(int(d) for d in g) for g in groups)
    return _allgather(q, k, v, positions, segment_ids, GatherPlan(spec, axis_name, groups))
