"""Tensor-parallel (TP) helpers over the ``model`` mesh axis, Megatron style (per-shard code).

Shoeybi et al. 2019, "Megatron-LM" (arXiv:1909.08053), §3: column-parallel in-projections need no
communication; row-parallel out-projections end with an all-reduce (``psum``) over the TP axis; the
embedding and the output layer are split over the vocabulary, and the cross-entropy is computed from the
vocabulary shards with three all-reduces of [B, T] values, so the [B, T, V] logits are never gathered.

Sequence-parallel TP (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", arXiv:2205.05198, §4.2.2): between TP regions (norms, residual adds) the tokens are split over the
TP axis too; each column-parallel input is all-gathered along tokens and each row-parallel output
reduce-scattered along tokens instead of all-reduced — the same bytes as the all-reduce, and the
activations outside the TP regions are 1/tp the size. :func:`all_gather_matmul` and
:func:`matmul_reduce_scatter` are the collective matmuls that hide those transfers under the matmuls
(Wang et al. 2023, "Overlap Communication with Dependent Computation via Decomposition", ASPLOS '23): the
transfer is cut into tp ring steps of ``ppermute`` and each step multiplies the block it already holds
while the next one travels. Their transposes (autodiff) are each other's ring in the other direction.

Every function takes plain arrays and the TP axis name. Run inside ``shard_map``; with ``check_vma=True``
JAX transposes ``psum`` correctly for autodiff (see docs/design.md, "How one training step flows").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def vocab_range(local_vocab: int, axis: str):
    """First vocabulary id held by this shard: ``axis_index · V/tp``."""
    return lax.axis_index(axis) * local_vocab


def vocab_parallel_embed(tokens, table, axis: str, *, scatter: bool = False):
    """Embedding lookup with the table split over the vocabulary.

    tokens: int32 [B, T]; table: this shard's rows [V/tp, D]. Returns [B, T, D] summed over ``axis``, or
    with ``scatter`` this shard's block of T/tp tokens of that sum, [B, T/tp, D] (a reduce-scatter along
    tokens: shard r gets tokens r·T/tp …; T must divide by tp).
    """
    local = tokens - vocab_range(table.shape[0], axis)
    inside = (local >= 0) & (local < table.shape[0])
    rows = jnp.take(table, jnp.clip(local, 0, table.shape[0] - 1), axis=0)
    rows = jnp.where(inside[..., None], rows, 0).astype(table.dtype)
    if scatter:
        return lax.psum_scatter(rows, axis, scatter_dimension=1, tiled=True)
    return lax.psum(rows, axis)


def vocab_parallel_cross_entropy(logits, labels, *, vocab_size: int, axis: str):
    """Per-token cross-entropy −log softmax(logits)[label] from vocabulary-sharded logits.

    logits: float32 [B, T, V/tp] (this shard's slice of the padded vocabulary); labels: int32 [B, T];
    vocab_size: the true V — padded ids (≥ V) are excluded from the softmax. Returns float32 [B, T] nats.
    """
    local_v = logits.shape[-1]
    start = vocab_range(local_v, axis)
    ids = start + jnp.arange(local_v)
    logits = jnp.where(ids < vocab_size, logits.astype(jnp.float32), -jnp.inf)
    peak = lax.pmax(lax.stop_gradient(jnp.max(logits, axis=-1)), axis)
    sum_exp = lax.psum(jnp.sum(jnp.exp(logits - peak[..., None]), axis=-1), axis)
    local_label = labels - start
    inside = (local_label >= 0) & (local_label < local_v)
    picked = jnp.take_along_axis(logits, jnp.clip(local_label, 0, local_v - 1)[..., None], axis=-1)[..., 0]
    target = lax.psum(jnp.where(inside, picked, 0.0), axis)
    return jnp.log(sum_exp) + peak - target


def row_parallel(x, w, axis: str):
    """x [..., F/tp] @ w [F/tp, D], summed over the TP axis: the row-parallel out-projection."""
    return lax.psum(x @ w, axis)


def all_gather_matmul(x, ws, axis: str):
    """``all_gather(x) @ w`` for each w of ``ws``, the gather hidden under the matmuls (column-parallel
    input under sequence-parallel TP).

    x: this shard's block of tokens [B, T/tp, D] (shard r holds tokens r·T/tp …); ws: a tuple of weights
    [D, F_i]. Returns a tuple of [B, T, F_i] in x's dtype, tokens in the original order. Ring of tp steps:
    at step s a shard multiplies the block of shard (r + s) mod tp while passing it on to shard r − 1
    (``ppermute``), so each transfer has a matmul to run under. tp = 1: plain matmuls.
    """
    tp = lax.axis_size(axis)
    if tp == 1:
        return tuple(x @ w for w in ws)
    r = lax.axis_index(axis)
    b, t, _ = x.shape
    left = [(j, (j - 1) % tp) for j in range(tp)]
    outs = [jnp.zeros((b, t * tp, w.shape[-1]), jnp.result_type(x, w)) for w in ws]
    block = x
    for s in range(tp):
        nxt = lax.ppermute(block, axis, left) if s < tp - 1 else None
        ys = [block @ w for w in ws]
        if nxt is not None:  # the received block usable only after the local products exist: else XLA
            ys, nxt = lax.optimization_barrier((ys, nxt))  # fuses both into one GEMM that awaits the transfer
        outs = [lax.dynamic_update_slice_in_dim(o, y, ((r + s) % tp) * t, axis=1) for o, y in zip(outs, ys)]
        block = nxt
    return tuple(outs)


def matmul_reduce_scatter(x, w, axis: str):
    """This shard's block of tokens of ``psum(x @ w)``, [B, T/tp, D], the reduction hidden under the
    matmuls (row-parallel output under sequence-parallel TP).

    x: [B, T, F/tp] (all T tokens, this shard's F columns); w: [F/tp, D]; T must divide by tp. Returns
    [B, T/tp, D] in the matmul's dtype: tokens r·T/tp … on shard r. Ring of tp steps: at step s a shard
    multiplies the block bound for shard (r − s − 1) mod tp, adds the partial sum that block brought from
    shard r − 1 and passes it on to shard r + 1 (``ppermute``); after tp steps each block is complete at
    its owner. The transfer of a partial sum runs under the next block's matmul. tp = 1: a plain matmul.
    """
    tp = lax.axis_size(axis)
    if tp == 1:
        return x @ w
    r = lax.axis_index(axis)
    t = x.shape[1] // tp
    right = [(j, (j + 1) % tp) for j in range(tp)]
    x_block = lambda s: lax.dynamic_slice_in_dim(x, ((r - s - 1) % tp) * t, t, axis=1)
    acc = x_block(0) @ w
    for s in range(1, tp):
        acc = lax.ppermute(acc, axis, right) + _after(acc, x_block(s)) @ w
    return acc


def _after(done, value):
    """``value``, made to wait for ``done`` (an optimization barrier, a no-op at run time): the ring's
    step s + 1 multiplies only after step s has, so XLA's dot merger (which joins independent dots sharing
    an operand, here the slices of one x) cannot fuse the steps into one matmul that leaves the partial
    sum's transfer nothing to run under. (The all-gather side does not use it: this kind of barrier there
    kept a 67 MB transfer exposed and cost 0.44 GB per device in the LLaMA-2-7B compile; it ties only each
    step's own products to the block in flight instead, docs/performance.md.)"""
    return lax.optimization_barrier((done, value))[1]


def kv_columns(w, *, n_kv_heads: int, n_heads: int, head_dim: int, axis: str):
    """This shard's K/V projection columns [D, K'·H].

    When K ≥ tp the weight is already split over ``axis`` (K/tp heads per shard) and returned as is. When
    K < tp it is replicated ([D, K·H], stored once) and each shard takes the one kv head its query heads
    use: shard r holds query heads r·N/tp …, which map to kv head (r·N/tp) // (N/K).
    """
    if w.shape[-1] != n_kv_heads * head_dim:  # already sharded over the TP axis
        return w
    tp = lax.axis_size(axis)
    if tp == 1:
        return w
    kv = (lax.axis_index(axis) * (n_heads // tp)) // (n_heads // n_kv_heads)
    return lax.dynamic_slice_in_dim(w, kv * head_dim, head_dim, axis=w.ndim - 1)


def vocab_parallel_argmax(logits, *, vocab_size: int, axis: str):
    """Global argmax id (int32 [B, T]) of vocabulary-sharded logits [B, T, V/tp], padded ids (>= V) left out;
    ties go to the smallest id. Two [B, T] all-reduces (max, then min over the tied shards' ids)."""
    local_v = logits.shape[-1]
    start = vocab_range(local_v, axis)
    ids = start + jnp.arange(local_v)
    logits = jnp.where(ids < vocab_size, logits.astype(jnp.float32), -jnp.inf)
    local_max = jnp.max(logits, axis=-1)
    peak = lax.pmax(local_max, axis)
    local_arg = (start + jnp.argmax(logits, axis=-1)).astype(jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    return lax.pmin(jnp.where(local_max == peak, local_arg, big), axis)


def vocab_parallel_label_is_argmax(logits, labels, *, vocab_size: int, axis: str):
    """bool [B, T]: whether ``labels`` [B, T] holds the largest logit of vocabulary-sharded logits
    [B, T, V/tp] (a tie counts as a hit), without gathering them: each shard's local max and its label
    logit (if the label is on that shard), then one ``pmax`` and one ``psum`` of [B, T] values."""
    local_v = logits.shape[-1]
    start = vocab_range(local_v, axis)
    ids = start + jnp.arange(local_v)
    logits = jnp.where(ids < vocab_size, logits.astype(jnp.float32), -jnp.inf)
    peak = lax.pmax(jnp.max(logits, axis=-1), axis)
    local_label = labels - start
    inside = (local_label >= 0) & (local_label < local_v)
    picked = jnp.take_along_axis(logits, jnp.clip(local_label, 0, local_v - 1)[..., None], axis=-1)[..., 0]
    hit = lax.psum((inside & (picked >= peak)).astype(jnp.int32), axis)
    return hit > 0
