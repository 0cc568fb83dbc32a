"""Ring attention over a mesh axis (per-shard code, run inside ``shard_map``).

Each of the P shards of the ``sequence`` axis holds T/P queries and the matching keys/values. K/V blocks
(only the K kv heads: GQA is never expanded before communication), with their positions and segment ids,
travel around the ring by ``ppermute`` in P−1 steps; every shard merges the partial (out, lse) of each
visiting block into a running float32 pair (Liu et al. 2023, "Ring Attention with Blockwise
Transformers", arXiv:2310.01889). The merge stays finite when a block is fully masked (lse = −inf).

The backward is a ``custom_vjp`` that runs the ring again: dq stays home, dK/dV accumulators travel with
their K/V block and take one last hop home, so memory stays O(T/P) (autodiff through the forward ring
would keep every visiting block).

Zigzag + causal: shard i holds chunks i and 2P−1−i of 2P. For the block that started on shard j ≠ i,
if j < i all queries see the first key chunk and none the second; if j > i only the second query chunk
sees anything, and it sees both key chunks. So each off-diagonal step costs half a block on every shard
(Brandon et al. 2023, arXiv:2311.09431, discuss the balance). Other layouts compute whole blocks; the
kernel still skips key blocks that no query can see.

Shapes (per shard): q [B, T/P, N', H]; k, v [B, T/P, K', H]; positions, segment_ids int32 [B, T/P].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lcjax.kernels.flash_attention import xla as flash

NEG_INF = -jnp.inf


def merge(out_a, lse_a, out_b, lse_b):
    """Combine two partial softmax results over disjoint key sets (float32; −inf lse means empty).

    out [B, T, N, H], lse [B, T, N]. Returns (out, lse) of the union.
    """
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(lse == NEG_INF, 0.0, lse)
    wa, wb = jnp.exp(lse_a - safe)[..., None], jnp.exp(lse_b - safe)[..., None]
    return out_a * wa + out_b * wb, lse


def _shift(x, axis_name, size):
    """Send ``x`` (any pytree) from shard i to shard i+1 (mod size)."""
    perm = [(i, (i + 1) % size) for i in range(size)]
    return jax.tree.map(lambda a: lax.ppermute(a, axis_name, perm), x)


def _half(x, which):
    """First (0) or second (1) half of x along the token axis 1."""
    n = x.shape[1] // 2
    return x[:, :n] if which == 0 else x[:, n:]


def _pad_half(x, fill, which):
    """Place x (half length) into the first/second half of a double-length array filled with ``fill``."""
    other = jnp.full_like(x, fill)
    return jnp.concatenate([x, other] if which == 0 else [other, x], axis=1)


def _forward_step(q, kv, q_pos, q_seg, *, zigzag_half, src_before, kw):
    """Attention of local queries to one visiting block. Returns (out, lse) for all local queries."""
    k, v, k_pos, k_seg = kv
    if not zigzag_half:
        return flash.flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, **kw)

    def first_key_half(_):
        return flash.flash_forward(q, _half(k, 0), _half(v, 0), q_pos, _half(k_pos, 0), q_seg,
                                   _half(k_seg, 0), **kw)

    def second_query_half(_):
        out, lse = flash.flash_forward(_half(q, 1), k, v, _half(q_pos, 1), k_pos, _half(q_seg, 1), k_seg,
                                       **kw)
        return _pad_half(out, 0.0, 1), _pad_half(lse, NEG_INF, 1)

    return lax.cond(src_before, first_key_half, second_query_half, None)


def _backward_step(q, kv, out, lse, dout, q_pos, q_seg, *, zigzag_half, src_before, kw):
    """Gradient contributions of one visiting block: (dq for local queries, dk, dv for the block)."""
    k, v, k_pos, k_seg = kv
    if not zigzag_half:
        return flash.flash_backward(q, k, v, out, lse, dout, q_pos, k_pos, q_seg, k_seg, **kw)

    def first_key_half(_):
        dq, dk, dv = flash.flash_backward(q, _half(k, 0), _half(v, 0), out, lse, dout, q_pos,
                                          _half(k_pos, 0), q_seg, _half(k_seg, 0), **kw)
        return dq, _pad_half(dk, 0.0, 0), _pad_half(dv, 0.0, 0)

    def second_query_half(_):
        dq, dk, dv = flash.flash_backward(_half(q, 1), k, v, _half(out, 1), _half(lse, 1), _half(dout, 1),
                                          _half(q_pos, 1), k_pos, _half(q_seg, 1), k_seg, **kw)
        return _pad_half(dq, 0.0, 1), dk, dv

    return lax.cond(src_before, first_key_half, second_query_half, None)


def _ring_geometry(axis_name, q, q_pos, q_seg):
    """(shard index, ring size) — the index is tied to this layer's queries by an optimization barrier so
    XLA cannot hoist per-step masks out of a layer scan and keep them all alive (see notes)."""
    if axis_name is None:
        return jnp.int32(0), 1, q, q_pos, q_seg
    idx, q, q_pos, q_seg = lax.optimization_barrier((lax.axis_index(axis_name), q, q_pos, q_seg))
    return idx, lax.axis_size(axis_name), q, q_pos, q_seg


def _fwd(q, k, v, q_pos, q_seg, axis_name, layout, causal, window, scale, block_q, block_k):
    kw = dict(causal=causal, window=window, scale=scale, block_q=block_q, block_k=block_k)
    idx, size, q, q_pos, q_seg = _ring_geometry(axis_name, q, q_pos, q_seg)
    zigzag_half = layout == "zigzag" and causal and size > 1
    kv = (k, v, q_pos, q_seg)
    out, lse = flash.flash_forward(q, k, v, q_pos, q_pos, q_seg, q_seg, **kw)
    if size == 1:
        return out.astype(q.dtype), (q, k, v, q_pos, q_seg, out, lse)

    def attend(s, kv, acc):
        src_before = (idx - s) % size < idx
        o, l = _forward_step(q, kv, q_pos, q_seg, zigzag_half=zigzag_half, src_before=src_before, kw=kw)
        return merge(*acc, o, l)

    def body(s, carry):
        acc, kv = carry
        nxt = _shift(kv, axis_name, size)  # sent while this step computes
        return attend(s, kv, acc), nxt

    acc, kv = lax.fori_loop(1, size - 1, body, ((out, lse), _shift(kv, axis_name, size)))
    out, lse = attend(size - 1, kv, acc)
    return out.astype(q.dtype), (q, k, v, q_pos, q_seg, out, lse)


def _bwd(axis_name, layout, causal, window, scale, block_q, block_k, res, dout):
    q, k, v, q_pos, q_seg, out, lse = res
    kw = dict(causal=causal, window=window, scale=scale, block_q=block_q, block_k=block_k)
    idx, size, q, q_pos, q_seg = _ring_geometry(axis_name, q, q_pos, q_seg)
    zigzag_half = layout == "zigzag" and causal and size > 1
    dq, dk, dv = flash.flash_backward(q, k, v, out, lse, dout, q_pos, q_pos, q_seg, q_seg, **kw)
    if size > 1:
        def step(s, carry):
            dq, kv, (dk, dv) = carry
            kv, (dk, dv) = _shift((kv, (dk, dv)), axis_name, size)
            src_before = (idx - s) % size < idx
            dq_s, dk_s, dv_s = _backward_step(q, kv, out, lse, dout, q_pos, q_seg, zigzag_half=zigzag_half,
                                              src_before=src_before, kw=kw)
            return dq + dq_s, kv, (dk + dk_s, dv + dv_s)

        dq, _, (dk, dv) = lax.fori_loop(1, size, step, (dq, (k, v, q_pos, q_seg), (dk, dv)))
        dk, dv = _shift((dk, dv), axis_name, size)  # the last hop brings each block's dK/dV home
    zeros_int = lambda x: jnp.zeros(x.shape, jax.dtypes.float0)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zeros_int(q_pos), zeros_int(q_seg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def _ring(q, k, v, q_pos, q_seg, axis_name, layout, causal, window, scale, block_q, block_k):
    return _fwd(q, k, v, q_pos, q_seg, axis_name, layout, causal, window, scale, block_q, block_k)[0]


def _ring_fwd(q, k, v, q_pos, q_seg, axis_name, layout, causal, window, scale, block_q, block_k):
    return _fwd(q, k, v, q_pos, q_seg, axis_name, layout, causal, window, scale, block_q, block_k)


_ring.defvjp(_ring_fwd, _bwd)


def ring_attention(q, k, v, positions, segment_ids, *, axis_name, layout="zigzag", causal=True,
                   window=None, scale=None, block_q=512, block_k=512):
    """Attention of this shard's queries to the whole sequence held across ``axis_name``.

    Args:
      q: [B, T/P, N', H]; k, v: [B, T/P, K', H] (N' divisible by K'; GQA query head n uses kv head n//G).
      positions, segment_ids: int32 [B, T/P], original token positions and document ids of this shard's
        tokens, in ``layout`` order (masks come from them only).
      axis_name: the mesh axis the sequence is sharded over (None: no sequence parallelism).
      layout: "zigzag", "striped" or "contiguous"; zigzag + causal uses the balanced half-block schedule.
      causal, window, scale: as in lcjax.ops.attention.reference (scale None = 1/√H).
      block_q, block_k: the kernel's tile sizes (clipped to divisors of the local lengths).
    Returns:
      [B, T/P, N', H] in q's dtype.
    Raises:
      ValueError for a window without causal masking.
    """
    if window is not None and not causal:
        raise ValueError("window requires causal attention")
    if segment_ids is None:
        segment_ids = jnp.zeros_like(positions)
    return _ring(q, k, v, positions, segment_ids, axis_name, layout, causal, window, scale, block_q, block_k)
