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

from lcjax.kernels.flash_attention.api import get_kernel

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
    """Static description of one ring (hashable: a non-differentiable argument of the custom VJP).

    ``group`` > 1 runs one ring per position inside consecutive groups of that size (hybrid Ulysses ×
    ring: shard d = g·group + u is at ring position g of ring u).
    """

    axis_name: str | None
    layout: str
    causal: bool
    window: int | None
    scale: float | None
    block_q: int
    block_k: int
    kernel: str = "xla"
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
    shard: the second (late) query chunk, every key. Otherwise the whole block.
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


def _place(x, fill, half):
    """Inverse of :func:`_sel`: a half-length result placed into a full-length array filled with ``fill``."""
    if half is None:
        return x
    other = jnp.full_like(x, fill)
    return jnp.concatenate([x, other] if half == 0 else [other, x], axis=1)


def _forward_step(kernel, q, kv, q_pos, q_seg, *, zigzag_half, earlier, kw):
    """Attention of local queries to one visiting block. Returns (out, lse) for all local queries."""
    k, v, k_pos, k_seg = kv

    def branch(earlier_static):
        qh, kh = step_halves(zigzag_half, earlier_static)
        out, lse = kernel.flash_forward(_sel(q, qh), _sel(k, kh), _sel(v, kh), _sel(q_pos, qh), _sel(k_pos, kh),
                                        _sel(q_seg, qh), _sel(k_seg, kh), **kw)
        return _place(out, 0.0, qh), _place(lse, NEG_INF, qh)

    if not zigzag_half:
        return branch(False)
    return lax.cond(earlier, lambda _: branch(True), lambda _: branch(False), None)


def _backward_step(kernel, q, kv, out, lse, dout, q_pos, q_seg, *, zigzag_half, earlier, kw):
    """Gradient contributions of one visiting block: (dq for local queries, dk, dv for the block)."""
    k, v, k_pos, k_seg = kv

    def branch(earlier_static):
        qh, kh = step_halves(zigzag_half, earlier_static)
        dq, dk, dv = kernel.flash_backward(_sel(q, qh), _sel(k, kh), _sel(v, kh), _sel(out, qh), _sel(lse, qh),
                                           _sel(dout, qh), _sel(q_pos, qh), _sel(k_pos, kh), _sel(q_seg, qh),
                                           _sel(k_seg, kh), **kw)
        return _place(dq, 0.0, qh), _place(dk, 0.0, kh), _place(dv, 0.0, kh)

    if not zigzag_half:
        return branch(False)
    return lax.cond(earlier, lambda _: branch(True), lambda _: branch(False), None)


def _ring_geometry(plan: RingPlan, q, q_pos, q_seg):
    """(ring position, ring size, axis size, q, q_pos, q_seg) — the position is tied to this layer's
    queries by an optimization barrier so XLA cannot hoist per-step masks out of a layer scan and keep
    them all alive (see notes)."""
    if plan.axis_name is None:
        return jnp.int32(0), 1, 1, q, q_pos, q_seg
    idx, q, q_pos, q_seg = lax.optimization_barrier((lax.axis_index(plan.axis_name), q, q_pos, q_seg))
    size = lax.axis_size(plan.axis_name)
    return idx // plan.group, size // plan.group, size, q, q_pos, q_seg


def _kw(plan: RingPlan):
    return dict(causal=plan.causal, window=plan.window, scale=plan.scale, block_q=plan.block_q,
                block_k=plan.block_k)


def _fwd(q, k, v, q_pos, q_seg, plan: RingPlan):
    kernel, kw = get_kernel(plan.kernel), _kw(plan)
    idx, ring, size, q, q_pos, q_seg = _ring_geometry(plan, q, q_pos, q_seg)
    zigzag_half = plan.layout == "zigzag" and plan.causal and ring > 1
    steps = ring_steps(ring, q.shape[1], layout=plan.layout, causal=plan.causal, window=plan.window)
    kv = (k, v, q_pos, q_seg)
    out, lse = kernel.flash_forward(q, k, v, q_pos, q_pos, q_seg, q_seg, **kw)
    if steps == 1:
        return out.astype(q.dtype), (q, k, v, q_pos, q_seg, out, lse)

    def attend(s, kv, acc):
        o, l = _forward_step(kernel, q, kv, q_pos, q_seg, zigzag_half=zigzag_half,
                             earlier=src_before(idx, s, ring), kw=kw)
        return merge(*acc, o, l)

    def body(s, carry):
        acc, kv = carry
        nxt = _shift(kv, plan, size)  # sent while this step computes
        return attend(s, kv, acc), nxt

    acc, kv = lax.fori_loop(1, steps - 1, body, ((out, lse), _shift(kv, plan, size)))
    out, lse = attend(steps - 1, kv, acc)
    return out.astype(q.dtype), (q, k, v, q_pos, q_seg, out, lse)


def _bwd(plan: RingPlan, res, dout):
    q, k, v, q_pos, q_seg, out, lse = res
    kernel, kw = get_kernel(plan.kernel), _kw(plan)
    idx, ring, size, q, q_pos, q_seg = _ring_geometry(plan, q, q_pos, q_seg)
    zigzag_half = plan.layout == "zigzag" and plan.causal and ring > 1
    steps = ring_steps(ring, q.shape[1], layout=plan.layout, causal=plan.causal, window=plan.window)
    dq, dk, dv = kernel.flash_backward(q, k, v, out, lse, dout, q_pos, q_pos, q_seg, q_seg, **kw)
    if steps > 1:
        def step(s, carry):
            dq, kv, (dk, dv) = carry
            kv, (dk, dv) = _shift((kv, (dk, dv)), plan, size)
            dq_s, dk_s, dv_s = _backward_step(kernel, q, kv, out, lse, dout, q_pos, q_seg,
                                              zigzag_half=zigzag_half, earlier=src_before(idx, s, ring), kw=kw)
            return dq + dq_s, kv, (dk + dk_s, dv + dv_s)

        dq, _, (dk, dv) = lax.fori_loop(1, steps, step, (dq, (k, v, q_pos, q_seg), (dk, dv)))
        # one last hop brings each block's dK/dV home from steps−1 positions ahead
        dk, dv = _shift((dk, dv), plan, size, hops=1 - steps)
    zeros_int = lambda x: jnp.zeros(x.shape, jax.dtypes.float0)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zeros_int(q_pos), zeros_int(q_seg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, q_pos, q_seg, plan):
    return _fwd(q, k, v, q_pos, q_seg, plan)[0]


_ring.defvjp(_fwd, _bwd)


def ring_attention(q, k, v, positions, segment_ids, *, axis_name, layout="zigzag", causal=True,
                   window=None, scale=None, block_q=None, block_k=None, kernel="xla", group=1):
    """Attention of this shard's queries to the whole sequence held across ``axis_name``.

    Args:
      q: [B, T/P, N', H]; k, v: [B, T/P, K', H] (N' divisible by K'; GQA query head n uses kv head n//G).
      positions, segment_ids: int32 [B, T/P], original token positions and document ids of this shard's
        tokens, in ``layout`` order (masks come from them only).
      axis_name: the mesh axis the sequence is sharded over (None: no sequence parallelism).
      layout: "zigzag", "striped" or "contiguous"; zigzag + causal uses the balanced half-block schedule.
      causal, window, scale: as in lcjax.ops.attention.reference (scale None = 1/√H).
      block_q, block_k: the kernel's tile sizes (clipped to divisors of the local lengths).
      kernel: the per-device kernel, "xla" or "pallas" (lcjax.kernels.flash_attention.api).
      group: run one ring per position inside consecutive groups of this many shards (hybrid
        Ulysses × ring); 1 for a plain ring over the whole axis.
    Returns:
      [B, T/P, N', H] in q's dtype.
    Raises:
      ValueError for a window without causal masking.
    """
    if window is not None and not causal:
        raise ValueError("window requires causal attention")
    if segment_ids is None:
        segment_ids = jnp.zeros_like(positions)
    plan = RingPlan(axis_name, layout, causal, window, scale, block_q, block_k, kernel, group)
    return _ring(q, k, v, positions, segment_ids, plan)


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
