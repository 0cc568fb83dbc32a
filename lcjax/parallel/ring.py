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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from lcjax.choices import DKV_DTYPES
from lcjax.kernels.flash_attention.api import get_kernel
from lcjax.parallel.spec import AttentionSpec

NEG_INF = -jnp.inf


def merge(out_a, lse_a, out_b, lse_b):
    """Combine two partial softmax results over disjoint key sets (float32; −inf lse means empty).

    out [B, T, N, H], lse [B, T, N]. Returns (out, lse) of the union.
    """
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(lse == NEG_INF, 0.0, lse)
    wa, wb = jnp.exp(lse_a - safe)[..., None], jnp.exp(lse_b - safe)[..., None]
    return out_a * wa + out_b * wb, lse


class RingPlan(NamedTuple):
    """Static description of one ring (hashable: a non-differentiable argument of the custom VJP): the
    attention spec, unchanged, the axis the ring runs over (None: no sequence parallelism) and ``group``:
    > 1 runs one ring per position inside consecutive groups of that size (hybrid Ulysses × ring: shard
    d = g·group + u is at ring position g of ring u)."""

    spec: AttentionSpec
    axis_name: str | None
    group: int = 1


def _perm(size: int, group: int, hops: int):
    """ppermute pairs moving every block ``hops`` ring positions forward (within its ring)."""
    rings = size // group
    return [(g * group + u, ((g + hops) % rings) * group + u) for g in range(rings) for u in range(group)]


def _shift(x, plan: RingPlan, size: int, hops: int = 1):
    """Send ``x`` (any pytree) ``hops`` positions along the ring."""
    perm = _perm(size, plan.group, hops)
    return jax.tree.map(lambda a: lax.ppermute(a, plan.axis_name, perm), x)


def ring_steps(ring_size: int, local_len: int, *, layout: str, causal: bool, window: int | None) -> int:
    """How many blocks each shard attends to (itself included): all ``ring_size`` of them, except for a
    causal sliding window in the contiguous layout, where blocks wholly more than W−1 tokens behind are
    never visible: the block s steps back is at least (s−1)·L+1 positions away (L = T/P; positions
    strictly increase within a document), so s ≤ ⌈(W−1)/L⌉ suffices."""
    if window is None or not causal or layout != "contiguous":
        return ring_size
    return min(ring_size, 1 + -(-(window - 1) // local_len))


def src_before(ring_pos, step, ring_size):
    """Did the block visiting at ``step`` start on an earlier ring position? (works on ints and tracers)"""
    return (ring_pos - step) % ring_size < ring_pos


def step_halves(zigzag_half: bool, earlier: bool):
    """Which half of the local queries and of the visiting keys one ring step computes (None = all).

    Zigzag + causal, block from an earlier shard: every query, the first (early) key chunk; from a later
    shard: the second (late) query chunk, every key. Otherwise the whole block. (The traced ring computes
    the same pairs branch-free as two quarter blocks, see :func:`_quarters`.)
    """
    if not zigzag_half:
        return None, None
    return (None, 0) if earlier else (1, None)


def _sel(x, half):
    """x, or its first (0) / second (1) half along the token axis 1."""
    if half is None:
        return x
    n = x.shape[1] // 2
    return x[:, :n] if half == 0 else x[:, n:]


def _half(x, h):
    """The half ``h`` (traced int32 0 or 1) of ``x`` along the token axis 1: a dynamic slice, one shape."""
    n = x.shape[1] // 2
    return lax.dynamic_slice_in_dim(x, h * n, n, axis=1)


def _zigzag_h(earlier):
    """The two (query half, key half) quarter blocks a zigzag off-diagonal step computes, branch-free.

    From an earlier shard the step needs (q0, k0) and (q1, k0); from a later one (q1, k0) and (q1, k1).
    Both are "A = (q1, k0)" plus "B = (q_h, k_h)" with h = 0 (earlier) or 1 (later): the same shapes on
    every step, the choice a computed slice offset instead of a ``lax.cond`` (whose predicate a GPU would
    copy to the host once per step). Returns h as int32.
    """
    return jnp.where(earlier, 0, 1).astype(jnp.int32)


def _add_half(x, part, h):
    """``x`` with ``part`` added to its half ``h`` (traced) along the token axis 1."""
    n = x.shape[1] // 2
    return lax.dynamic_update_slice_in_dim(x, _half(x, h) + part, h * n, axis=1)


def _forward_step(kernel, q, kv, acc, q_pos, q_seg, *, zigzag_half, earlier, kw):
    """``acc`` = (out, lse) float32 of the local queries, merged with their attention to one visiting block."""
    k, v, k_pos, k_seg = kv
    if not zigzag_half:
        return merge(*acc, *kernel.flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, **kw))
    h, n = _zigzag_h(earlier), q.shape[1] // 2
    call = lambda qh, kh: kernel.flash_forward(qh(q), kh(k), kh(v), qh(q_pos), kh(k_pos), qh(q_seg), kh(k_seg),
                                               **kw)
    late = lambda x: _sel(x, 1)
    out, lse = acc
    o_b, l_b = merge(_half(out, h), _half(lse, h), *call(lambda x: _half(x, h), lambda x: _half(x, h)))  # (q_h, k_h)
    out = lax.dynamic_update_slice_in_dim(out, o_b, h * n, axis=1)
    lse = lax.dynamic_update_slice_in_dim(lse, l_b, h * n, axis=1)
    o_a, l_a = merge(late(out), late(lse), *call(late, lambda x: _sel(x, 0)))  # (q1, k0)
    return out.at[:, n:].set(o_a), lse.at[:, n:].set(l_a)


def _backward_step(kernel, q, kv, grads, out, lse, dout, q_pos, q_seg, *, zigzag_half, earlier, kw):
    """``grads`` = (dq of the local queries, dk, dv of the visiting block), float32, plus this block's
    contributions."""
    k, v, k_pos, k_seg = kv
    if not zigzag_half:
        parts = kernel.flash_backward(q, k, v, out, lse, dout, q_pos, k_pos, q_seg, k_seg, **kw)
        return tuple(g + p for g, p in zip(grads, parts))
    h = _zigzag_h(earlier)
    call = lambda qh, kh: kernel.flash_backward(qh(q), kh(k), kh(v), qh(out), qh(lse), qh(dout), qh(q_pos),
                                                kh(k_pos), qh(q_seg), kh(k_seg), **kw)
    dq, dk, dv = grads
    dq_b, dk_b, dv_b = call(lambda x: _half(x, h), lambda x: _half(x, h))   # (q_h, k_h)
    dq, dk, dv = _add_half(dq, dq_b, h), _add_half(dk, dk_b, h), _add_half(dv, dv_b, h)
    dq_a, dk_a, dv_a = call(lambda x: _sel(x, 1), lambda x: _sel(x, 0))     # (q1, k0)
    n = q.shape[1] // 2
    return dq.at[:, n:].add(dq_a), dk.at[:, :n].add(dk_a), dv.at[:, :n].add(dv_a)


def _ring_geometry(plan: RingPlan, q, q_pos, q_seg):
    """(ring position, ring size, axis size, q, q_pos, q_seg) — the position is tied to this layer's
    queries by an optimization barrier so XLA cannot hoist per-step masks out of a layer scan and keep
    them all alive (see notes)."""
    if plan.axis_name is None:
        return jnp.int32(0), 1, 1, q, q_pos, q_seg
    idx, q, q_pos, q_seg = lax.optimization_barrier((lax.axis_index(plan.axis_name), q, q_pos, q_seg))
    size = lax.axis_size(plan.axis_name)
    return idx // plan.group, size // plan.group, size, q, q_pos, q_seg


def _setup(plan: RingPlan, q, q_pos, q_seg):
    """Kernel module, its keyword arguments, and the ring geometry shared by the forward and backward."""
    spec = plan.spec
    idx, ring, size, q, q_pos, q_seg = _ring_geometry(plan, q, q_pos, q_seg)
    zigzag_half = spec.layout == "zigzag" and spec.causal and ring > 1
    steps = ring_steps(ring, q.shape[1], layout=spec.layout, causal=spec.causal, window=spec.window)
    return get_kernel(spec.kernel), spec.kernel_options(), idx, ring, size, zigzag_half, steps, q, q_pos, q_seg


def _fwd(q, k, v, q_pos, q_seg, plan: RingPlan):
    """Forward ring: block s+1 is sent while block s is attended (every transfer hidden under a step).

    Residuals: (q, k, v, positions, segments, out in q's dtype, lse float32); ``out`` and ``lse`` carry the
    checkpoint names ``attention`` and ``attention_lse`` so a remat policy can keep them and the backward
    never re-runs this ring (lcjax.model.llama.REMAT_POLICIES).
    """
    kernel, kw, idx, ring, size, zigzag_half, steps, q, q_pos, q_seg = _setup(plan, q, q_pos, q_seg)
    kv = (k, v, q_pos, q_seg)
    if steps == 1:
        out, lse = kernel.flash_forward(q, k, v, q_pos, q_pos, q_seg, q_seg, **kw)
    else:
        def attend(s, kv, acc):
            return _forward_step(kernel, q, kv, acc, q_pos, q_seg, zigzag_half=zigzag_half,
                                 earlier=src_before(idx, s, ring), kw=kw)

        def body(s, carry):
            acc, kv = carry
            nxt = _shift(kv, plan, size)  # sent while this step computes
            return attend(s, kv, acc), nxt

        first = _shift(kv, plan, size)  # in flight during the local block
        acc = kernel.flash_forward(q, k, v, q_pos, q_pos, q_seg, q_seg, **kw)
        acc, kv = lax.fori_loop(1, steps - 1, body, (acc, first))
        out, lse = attend(steps - 1, kv, acc)
    out = checkpoint_name(out.astype(q.dtype), "attention")
    lse = checkpoint_name(lse, "attention_lse")
    return out, (q, k, v, q_pos, q_seg, out, lse)


def _bwd(plan: RingPlan, res, dout):
    """Backward ring, double-buffered: at the start of step s each shard sends on the K/V block it holds
    (block s+1 of its successor) and the finished dK/dV accumulator of step s−1, computes step s's
    gradients, then receives; every transfer is hidden under a step's kernels except the last hop that
    brings each block's dK/dV home. dK/dV travel in ``plan.spec.dkv_dtype`` (float32 unless lowered)."""
    q, k, v, q_pos, q_seg, out, lse = res
    kernel, kw, idx, ring, size, zigzag_half, steps, q, q_pos, q_seg = _setup(plan, q, q_pos, q_seg)
    wire = jnp.dtype(plan.spec.dkv_dtype)
    kv = (k, v, q_pos, q_seg)
    if steps == 1:
        dq, dk, dv = kernel.flash_backward(q, k, v, out, lse, dout, q_pos, q_pos, q_seg, q_seg, **kw)
    else:
        def step(s, carry, send_kv=True):
            dq, kv, acc = carry  # kv: block s (received); acc: dK/dV of block s−1, this shard's part added
            nxt = _shift(kv, plan, size) if send_kv else kv
            dk, dv = _shift(jax.tree.map(lambda x: x.astype(wire), acc), plan, size)  # → the shard holding it
            dq, dk, dv = _backward_step(kernel, q, kv, (dq, dk.astype(jnp.float32), dv.astype(jnp.float32)),
                                        out, lse, dout, q_pos, q_seg, zigzag_half=zigzag_half,
                                        earlier=src_before(idx, s, ring), kw=kw)
            return dq, nxt, (dk, dv)

        first = _shift(kv, plan, size)  # in flight during the local block
        dq, dk, dv = kernel.flash_backward(q, k, v, out, lse, dout, q_pos, q_pos, q_seg, q_seg, **kw)
        carry = lax.fori_loop(1, steps - 1, step, (dq, first, (dk, dv)))
        dq, _, (dk, dv) = step(steps - 1, carry, send_kv=False)
        # one last hop brings each block's dK/dV home from steps−1 positions ahead
        dk, dv = _shift((dk.astype(wire), dv.astype(wire)), plan, size, hops=1 - steps)
    zeros_int = lambda x: jnp.zeros(x.shape, jax.dtypes.float0)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zeros_int(q_pos), zeros_int(q_seg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, q_pos, q_seg, plan):
    return _fwd(q, k, v, q_pos, q_seg, plan)[0]


_ring.defvjp(_fwd, _bwd)


def ring_attention(q, k, v, positions, segment_ids, *, axis_name, layout="zigzag", causal=True,
                   window=None, scale=None, block_q=None, block_k=None, kernel="xla", group=1,
                   dkv_dtype="float32"):
    """:func:`ring` with the spec's fields as keyword arguments (tests, benchmarks; the model passes its
    :class:`AttentionSpec` to :func:`ring` itself). ``layout``: "zigzag", "striped" or "contiguous";
    ``kernel``: a name of lcjax.kernels.flash_attention.api.KERNELS; the rest as :class:`AttentionSpec`."""
    spec = AttentionSpec(layout=layout, causal=causal, window=window, scale=scale, block_q=block_q,
                         block_k=block_k, kernel=kernel, dkv_dtype=dkv_dtype)
    return ring(q, k, v, positions, segment_ids, spec, axis_name=axis_name, group=group)


def ring(q, k, v, positions, segment_ids, spec: AttentionSpec, *, axis_name, group: int = 1):
    """Attention of this shard's queries to the whole sequence held across ``axis_name``.

    Args:
      q: [B, T/P, N', H]; k, v: [B, T/P, K', H] (N' divisible by K'; GQA query head n uses kv head n//G).
      positions, segment_ids: int32 [B, T/P], original token positions and document ids of this shard's
        tokens, in ``spec.layout`` order (masks come from them only; segment_ids None: one document).
      spec: the attention settings (layout: zigzag + causal uses the balanced half-block schedule; causal,
        window, scale as in lcjax.ops.attention.reference; block_q, block_k: the kernel's tiles, clipped to
        divisors of the local lengths; kernel; dkv_dtype: the dtype dK/dV accumulators travel in during the
        backward ring, "float32" or "bfloat16", which halves the backward's bytes and rounds the partial sums
        once per hop, docs/parallelism.md). ``spec.impl`` is not read here.
      axis_name: the mesh axis the sequence is sharded over (None: no sequence parallelism).
      group: run one ring per position inside consecutive groups of this many shards (hybrid
        Ulysses × ring); 1 for a plain ring over the whole axis.
    Returns:
      [B, T/P, N', H] in q's dtype.
    Raises:
      ValueError for a window without causal masking or an unknown ``dkv_dtype``.
    """
    if spec.window is not None and not spec.causal:
        raise ValueError("window requires causal attention")
    if spec.dkv_dtype not in DKV_DTYPES:
        raise ValueError(f"attention.dkv_dtype {spec.dkv_dtype!r} must be one of {', '.join(DKV_DTYPES)}")
    if segment_ids is None:
        segment_ids = jnp.zeros_like(positions)
    return _ring(q, k, v, positions, segment_ids, RingPlan(spec, axis_name, group))


def schedule(ring_pos: int, ring_size: int, local_len: int, *, layout: str, causal: bool,
             window: int | None):
    """The (step, query half, key half) triples the ring runs on ring position ``ring_pos`` (halves as in
    :func:`step_halves`), from the same functions the traced ring uses: for benchmarks and tests."""
    zigzag_half = layout == "zigzag" and causal and ring_size > 1
    steps = ring_steps(ring_size, local_len, layout=layout, causal=causal, window=window)
    return [(s, *((None, None) if s == 0 else step_halves(zigzag_half, src_before(ring_pos, s, ring_size))))
            for s in range(steps)]


def computed_area(positions, segment_ids, *, ring_size, layout, causal=True, window=None, block_q=512,
                  block_k=512):
    """Query–key pairs each ring position actually computes: int64 [ring_size].

    positions, segment_ids: numpy int [B, T] of the whole sequence in layout order (ring position r holds
    tokens [r·T/R, (r+1)·T/R)). Counts, for every step of :func:`schedule`, the (block_q × block_k) tiles
    the XLA kernel does not skip (its own ``fit_block`` and ``block_may_be_visible``), summed over the
    batch. The max/mean over positions is the ring's work balance.
    """
    import numpy as np

    from lcjax.kernels.flash_attention import xla

    n = positions.shape[1] // ring_size
    local = lambda x, r: x[:, r * n:(r + 1) * n]
    area = np.zeros(ring_size, np.int64)
    for r in range(ring_size):
        for s, qh, kh in schedule(r, ring_size, n, layout=layout, causal=causal, window=window):
            src = (r - s) % ring_size
            qp, qs = (np.asarray(_sel(local(x, r), qh)) for x in (positions, segment_ids))
            kp, ks = (np.asarray(_sel(local(x, src), kh)) for x in (positions, segment_ids))
            bq, bk = xla.fit_block(qp.shape[1], block_q), xla.fit_block(kp.shape[1], block_k)
            for b in range(qp.shape[0]):
                for i in range(0, qp.shape[1], bq):
                    for j in range(0, kp.shape[1], bk):
                        seen = xla.block_may_be_visible(qp[b:b + 1, i:i + bq], kp[b:b + 1, j:j + bk],
                                                        qs[b:b + 1, i:i + bq], ks[b:b + 1, j:j + bk], causal, window)
                        area[r] += bq * bk * bool(seen)
    return area
