"""Ring attention over a mesh axis (per-shard code, run inside ``shard_map``).

Each of the P shards of the ``sequence`` axis holds T/P queries and the matching keys/values. K/V blocks
(only the K kv heads: GQA is never expanded before communication), with their positions and segment ids,
travel around the ring by ``ppermute`` in P−1 steps; every shard merges the partial (out, lse) of each
visiting block into a running float32 pair (Liu et al. 2023, "Ring Attention with Blockwise
Transformers", arXiv:2310.01889). The merge stays finite when a block is fully masked (lse = −inf).

The backward is a ``custom_vjp`` that runs the ring again: dq stays home, dK/dV accumulators travel with
their K/V block and take one last hop home, so memory stays O(T/P) (autodiff through the forward ring
would keep every visiting block).

What is computed comes from the data, never from the layout: every step attends the local queries to the
whole visiting block, and the kernel skips the (query tile, key tile) pairs that the tiles' actual position
and segment ranges rule out (lcjax.kernels.flash_attention.tiling / ``xla.block_may_be_visible``). So every
layout is exact for any positions and segment ids (the mask is only: same segment, key position ≤ query
position, within the window). With ordinary positions the zigzag layout still does half a block of work per
off-diagonal step (Brandon et al. 2023, arXiv:2311.09431): shard i holds chunks i and 2P−1−i of 2P, so for
a block from shard j < i only the early key chunk is visible and for j > i only the late query chunk sees
anything, and the kernel's tiles (fitted to the chunk) skip the rest. No ``lax.cond`` at the ring level.

Which K/V is sent (:func:`kv_sends`) is decided statically from the layout, the causal rule and the window.
Every block goes everywhere unless the caller vouches that positions are *ordered* (``ordered=True``: within
each segment, positions grow at least as fast as the token index in the original order, as the data
loader's packed documents do): then a causal sliding window W in the contiguous or zigzag layout needs only
the blocks (zigzag: the half blocks) within W−1 tokens, sent directly by that many hops, so the traffic is
proportional to W, not T. The striped layout spreads every window over all shards and always sends all.

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

from lcjax.choices import DKV_DTYPES
from lcjax.kernels.flash_attention import xla
from lcjax.kernels.flash_attention.api import get_kernel
from lcjax.parallel.spec import AttentionSpec

NEG_INF = -jnp.inf
PARTS = ("all", "early", "late")  # which part of a visiting block a send carries (zigzag: its two chunks)


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


def _chunks(layout: str, ring_size: int, r: int):
    """(chunk index, part) of ring position ``r``'s tokens in units of the layout's chunk: T/P tokens
    (contiguous) or T/2P (zigzag: chunks r and 2P−1−r, the "early" and "late" halves)."""
    if layout == "zigzag":
        return ((r, "early"), (2 * ring_size - 1 - r, "late"))
    return ((r, "all"),)


def kv_sends(ring_size: int, local_len: int, *, layout: str, causal: bool, window: int | None,
             ordered: bool) -> tuple:
    """The K/V each shard receives, decided statically: a tuple of (hops, part), part one of PARTS
    ("early"/"late": the first/second half of the block ``hops`` ring positions back).

    All blocks — ``(s, "all")`` for s = 1 … P−1, sent as a ring — unless ``ordered`` positions, a causal
    window W and the contiguous or zigzag layout: then query chunk c (chunks of C = T/P or T/2P tokens)
    can only see key chunks c−m … c with m = ⌈(W−1)/C⌉ (a key d ≥ m+1 chunks back is at least (d−1)·C+1
    ≥ W positions behind), and only the (hops, part) holding such a chunk for some shard are sent.
    """
    full = tuple((s, "all") for s in range(1, ring_size))
    if not (ordered and causal and window is not None and layout in ("contiguous", "zigzag")) or ring_size < 2:
        return full
    chunk = local_len // 2 if layout == "zigzag" else local_len
    m = -(-(window - 1) // chunk)
    need = set()
    for r in range(ring_size):
        for s in range(1, ring_size):
            for kc, part in _chunks(layout, ring_size, (r - s) % ring_size):
                if any(qc - m <= kc <= qc for qc, _ in _chunks(layout, ring_size, r)):
                    need.add((s, part))
    parts = lambda s: {p for s2, p in need if s2 == s}
    sends = tuple((s, "all" if len(parts(s)) > 1 else parts(s).pop()) for s in sorted({s for s, _ in need}))
    return full if is_full_ring(sends, ring_size) else sends


def is_full_ring(sends: tuple, ring_size: int) -> bool:
    """Whether ``sends`` is every whole block (run as the overlapped ring)."""
    return sends == tuple((s, "all") for s in range(1, ring_size))


def recv_tokens(ring_size: int, local_len: int, *, layout: str, causal: bool, window: int | None,
                ordered: bool = True) -> int:
    """Tokens of K/V each shard receives in one forward pass (the backward sends as many back as dK/dV
    and receives the K/V once more): the sum of :func:`kv_sends` parts."""
    sends = kv_sends(ring_size, local_len, layout=layout, causal=causal, window=window, ordered=ordered)
    return sum(local_len if part == "all" else local_len // 2 for _, part in sends)


def recv_bytes(ring_size: int, seq_len: int, *, layout: str, causal: bool = True, window: int | None = None,
               batch: int = 1, kv_heads: int = 8, head_dim: int = 128, itemsize: int = 2,
               ordered: bool = True) -> int:
    """Bytes of K/V (k and v of ``kv_heads`` × ``head_dim`` at ``itemsize`` bytes, plus int32 position and
    segment id per token) one shard receives in the forward of ring attention over ``seq_len`` tokens on
    ``ring_size`` shards: :func:`recv_tokens` × bytes per token. The striped layout always receives all."""
    tokens = recv_tokens(ring_size, seq_len // ring_size, layout=layout, causal=causal, window=window,
                         ordered=ordered)
    return batch * tokens * (2 * kv_heads * head_dim * itemsize + 2 * 4)


def _sel(x, half):
    """x, or its first (0) / second (1) half along the token axis 1."""
    if half is None:
        return x
    n = x.shape[1] // 2
    return x[:, :n] if half == 0 else x[:, n:]


def _place(x, fill, half):
    """The inverse of :func:`_sel`: ``x`` as half ``half`` of a twice-as-long array filled with ``fill``."""
    if half is None:
        return x
    pad = jnp.full_like(x, fill)
    return jnp.concatenate([x, pad] if half == 0 else [pad, x], axis=1)


def _part(x, part):
    """The ``part`` (PARTS) of ``x`` along the token axis 1."""
    return _sel(x, {"all": None, "early": 0, "late": 1}[part])


def _add_part(x, y, part):
    """``x`` with ``y`` added to its ``part`` along the token axis 1."""
    if part == "all":
        return x + y
    n = x.shape[1] // 2
    return x.at[:, :n].add(y) if part == "early" else x.at[:, n:].add(y)


def in_flight(done, received):
    """(done, received) with ``received`` — a block still in flight — usable only after ``done`` (this
    step's kernel results) exists: an optimization barrier, free at run time. Without it XLA may fuse the
    per-tile position/segment ranges this step's kernel needs with those of the received block into one
    multi-output fusion, making this step wait for the transfer it should hide (seen on H100 compiles of
    the demo at ring size 2: the ring permute's done scheduled right after its start; in the all-gather
    inside Ulysses groups, the local block's kernel scheduled after the gather's done)."""
    return lax.optimization_barrier((done, received))


def _ring_geometry(plan: RingPlan, q, q_pos, q_seg):
    """(ring position, ring size, axis size, q, q_pos, q_seg) — the position is tied to this layer's
    queries by an optimization barrier so XLA cannot hoist per-step masks out of a layer scan and keep
    them all alive (see notes)."""
    if plan.axis_name is None:
        return jnp.int32(0), 1, 1, q, q_pos, q_seg
    idx, q, q_pos, q_seg = lax.optimization_barrier((lax.axis_index(plan.axis_name), q, q_pos, q_seg))
    size = lax.axis_size(plan.axis_name)
    return idx // plan.group, size // plan.group, size, q, q_pos, q_seg


def tiles(kernel: str, layout: str, local_len: int, block_q, block_k):
    """(block_q, block_k) a ring step passes to ``kernel``: for the XLA and cuDNN kernels in the zigzag
    layout the tiles are fitted to the half block so that no tile straddles the two chunks (the XLA kernel
    then skips the invisible chunk pairs exactly; cuDNN's default tile is the half block itself, whose pairs
    are empty, full or diagonal); otherwise as given."""
    if kernel not in ("xla", "cudnn") or layout != "zigzag" or local_len % 2:
        return block_q, block_k
    default = xla.DEFAULT_BLOCK if kernel == "xla" else local_len // 2
    fit = lambda b: xla.fit_block(local_len // 2, default if b is None else int(b))
    return fit(block_q), fit(block_k)


def _setup(plan: RingPlan, q, q_pos, q_seg):
    """Kernel module, its keyword arguments, the ring geometry and the static sends shared by the forward
    and the backward."""
    idx, ring, size, q, q_pos, q_seg = _ring_geometry(plan, q, q_pos, q_seg)
    n = q.shape[1]
    # one ring position holds the whole sequence: the cuDNN kernel's tile is then all of it (a zigzag split
    # would cut a window at an offset from the diagonal)
    layout = "contiguous" if plan.spec.kernel == "cudnn" and ring == 1 else plan.spec.layout
    block_q, block_k = tiles(plan.spec.kernel, layout, n, plan.spec.block_q, plan.spec.block_k)
    kw = {**plan.spec.kernel_options(), "block_q": block_q, "block_k": block_k}
    sends = kv_sends(ring, n, layout=plan.spec.layout, causal=plan.spec.causal, window=plan.spec.window,
                     ordered=plan.spec.ordered)
    return get_kernel(plan.spec.kernel), kw, size, sends, is_full_ring(sends, ring), q, q_pos, q_seg


def _fwd(q, k, v, q_pos, q_seg, plan: RingPlan):
    """Forward ring: block s+1 is sent while block s is attended (every transfer hidden under a step).
    With a window and ordered positions, only :func:`kv_sends` travel, each directly by its hops.

    Residuals: (q, k, v, positions, segments, out in q's dtype, lse float32); ``out`` and ``lse`` carry the
    checkpoint names ``attention`` and ``attention_lse`` so a remat policy can keep them and the backward
    never re-runs this ring (lcjax.model.llama.REMAT_POLICIES).
    """
    kernel, kw, size, sends, ring, q, q_pos, q_seg = _setup(plan, q, q_pos, q_seg)
    kv = (k, v, q_pos, q_seg)
    attend = lambda kv, acc: merge(*acc, *kernel.flash_forward(q, *kv[:2], q_pos, kv[2], q_seg, kv[3], **kw))
    if not sends:
        out, lse = kernel.flash_forward(q, k, v, q_pos, q_pos, q_seg, q_seg, **kw)
    elif ring:
        def body(s, carry):
            acc, kv = carry
            nxt = _shift(kv, plan, size)  # sent while this step computes
            return in_flight(attend(kv, acc), nxt)

        first = _shift(kv, plan, size)  # in flight during the local block
        acc = kernel.flash_forward(q, k, v, q_pos, q_pos, q_seg, q_seg, **kw)
        acc, kv = lax.fori_loop(1, len(sends), body, in_flight(acc, first))
        out, lse = attend(kv, acc)
    else:
        received = [_shift(jax.tree.map(lambda x: _part(x, part), kv), plan, size, hops) for hops, part in sends]
        acc = kernel.flash_forward(q, k, v, q_pos, q_pos, q_seg, q_seg, **kw)
        for got in received:
            acc = attend(got, acc)
        out, lse = acc
    out = checkpoint_name(out.astype(q.dtype), "attention")
    lse = checkpoint_name(lse, "attention_lse")
    return out, (q, k, v, q_pos, q_seg, out, lse)


def _bwd(plan: RingPlan, res, dout):
    """Backward ring, double-buffered: at the start of step s each shard sends on the K/V block it holds
    (block s+1 of its successor) and the finished dK/dV accumulator of step s−1, computes step s's
    gradients, then receives; every transfer is hidden under a step's kernels except the last hop that
    brings each block's dK/dV home. dK/dV travel in ``plan.spec.dkv_dtype`` (float32 unless lowered). With
    sparse :func:`kv_sends`, each received part's dK/dV goes straight back by the same hops."""
    q, k, v, q_pos, q_seg, out, lse = res
    kernel, kw, size, sends, ring, q, q_pos, q_seg = _setup(plan, q, q_pos, q_seg)
    wire = jnp.dtype(plan.spec.dkv_dtype)
    kv = (k, v, q_pos, q_seg)
    grads = lambda kv: kernel.flash_backward(q, kv[0], kv[1], out, lse, dout, q_pos, kv[2], q_seg, kv[3], **kw)
    to_wire = lambda x: jax.tree.map(lambda a: a.astype(wire), x)
    if not sends:
        dq, dk, dv = grads(kv)
    elif ring:
        def step(s, carry, send_kv=True):
            dq, kv, acc = carry  # kv: block s (received); acc: dK/dV of block s−1, this shard's part added
            nxt = _shift(kv, plan, size) if send_kv else kv
            dk, dv = _shift(to_wire(acc), plan, size)  # → the shard holding it
            dq_s, dk_s, dv_s = grads(kv)
            if send_kv:
                (dq_s, dk_s, dv_s), nxt = in_flight((dq_s, dk_s, dv_s), nxt)
            return dq + dq_s, nxt, (dk.astype(jnp.float32) + dk_s, dv.astype(jnp.float32) + dv_s)

        first = _shift(kv, plan, size)  # in flight during the local block
        (dq, dk, dv), first = in_flight(grads(kv), first)
        carry = lax.fori_loop(1, len(sends), step, (dq, first, (dk, dv)))
        dq, _, (dk, dv) = step(len(sends), carry, send_kv=False)
        # one last hop brings each block's dK/dV home from P−1 positions ahead
        dk, dv = _shift(to_wire((dk, dv)), plan, size, hops=-len(sends))
    else:
        received = [_shift(jax.tree.map(lambda x: _part(x, part), kv), plan, size, hops) for hops, part in sends]
        dq, dk, dv = grads(kv)
        for (hops, part), got in zip(sends, received):
            dq_s, dk_s, dv_s = grads(got)
            dk_s, dv_s = _shift(to_wire((dk_s, dv_s)), plan, size, -hops)  # home to the block's owner
            dq, dk, dv = dq + dq_s, _add_part(dk, dk_s.astype(jnp.float32), part), _add_part(
                dv, dv_s.astype(jnp.float32), part)
    zeros_int = lambda x: jnp.zeros(x.shape, jax.dtypes.float0)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zeros_int(q_pos), zeros_int(q_seg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, q_pos, q_seg, plan):
    return _fwd(q, k, v, q_pos, q_seg, plan)[0]


_ring.defvjp(_fwd, _bwd)


def checked_segments(positions, segment_ids, *, causal: bool, window, dkv_dtype: str):
    """The options shared by the per-shard sequence-parallel entries, checked; returns the segment ids
    (zeros like ``positions`` when None: one document). Raises ValueError for a window without causal
    masking or an unknown ``dkv_dtype``."""
    if window is not None and not causal:
        raise ValueError("window requires causal attention")
    if dkv_dtype not in DKV_DTYPES:
        raise ValueError(f"attention.dkv_dtype {dkv_dtype!r} must be one of {', '.join(DKV_DTYPES)}")
    return jnp.zeros_like(positions) if segment_ids is None else segment_ids


def ring_attention(q, k, v, positions, segment_ids, *, axis_name, layout="zigzag", causal=True,
                   window=None, scale=None, block_q=None, block_k=None, kernel="xla", group=1,
                   dkv_dtype="float32", ordered=False):
    """:func:`ring` with the spec's fields as keyword arguments (tests, benchmarks; the model passes its
    :class:`AttentionSpec` to :func:`ring` itself). ``layout``: "zigzag", "striped", "contiguous" (or any
    other order: every block is then sent); ``kernel``: a name of lcjax.kernels.flash_attention.api.KERNELS;
    the rest as :class:`AttentionSpec`."""
    spec = AttentionSpec(layout=layout, causal=causal, window=window, scale=scale, block_q=block_q,
                         block_k=block_k, kernel=kernel, dkv_dtype=dkv_dtype, ordered=bool(ordered))
    return ring(q, k, v, positions, segment_ids, spec, axis_name=axis_name, group=group)


def ring(q, k, v, positions, segment_ids, spec: AttentionSpec, *, axis_name, group: int = 1):
    """Attention of this shard's queries to the whole sequence held across ``axis_name``.

    Args:
      q: [B, T/P, N', H]; k, v: [B, T/P, K', H] (N' divisible by K'; GQA query head n uses kv head n//G).
      positions, segment_ids: int32 [B, T/P], original token positions and document ids of this shard's
        tokens, in ``spec.layout`` order (masks come from them only; any values; segment_ids None: one
        document).
      spec: the attention settings (layout: zigzag + causal uses the balanced half-block schedule where the
        actual position ranges allow; causal, window, scale as in lcjax.ops.attention.reference; block_q,
        block_k: the kernel's tiles (None: the kernel's own); kernel; dkv_dtype: the dtype dK/dV accumulators
        travel in during the backward ring, "float32" or "bfloat16", which halves the backward's bytes and
        rounds the partial sums once per hop, docs/parallelism.md; ordered: the caller vouches that within
        each segment positions grow at least as fast as the token index in the original order (the
        loader's documents do) — only then does a window send less (:func:`kv_sends`); False is exact for
        any positions). ``spec.impl`` is not read here.
      axis_name: the mesh axis the sequence is sharded over (None: no sequence parallelism).
      group: run one ring per position inside consecutive groups of this many shards (hybrid
        Ulysses × ring); 1 for a plain ring over the whole axis.
    Returns:
      [B, T/P, N', H] in q's dtype.
    Raises:
      ValueError for a window without causal masking or an unknown ``dkv_dtype``.
    """
    segment_ids = checked_segments(positions, segment_ids, causal=spec.causal, window=spec.window,
                                   dkv_dtype=spec.dkv_dtype)
    return _ring(q, k, v, positions, segment_ids, RingPlan(spec, axis_name, group))


def is_ordered(positions, segment_ids) -> bool:
    """Host check (numpy int [B, T] in the original token order): within every segment, do positions grow
    at least as fast as the token index (pos_j − pos_i ≥ j − i for i < j, i.e. pos − index is
    non-decreasing per segment)? What ``ordered=True`` vouches for."""
    pos, seg = np.asarray(positions, np.int64), np.asarray(segment_ids, np.int64)
    lead = pos - np.arange(pos.shape[1])
    for p, s in zip(lead, seg):
        order = np.lexsort((np.arange(len(s)), s))
        same = s[order][1:] == s[order][:-1]
        if np.any(same & (np.diff(p[order]) < 0)):
            return False
    return True


def schedule(ring_pos: int, ring_size: int, local_len: int, *, layout: str, causal: bool,
             window: int | None, ordered: bool = True):
    """The (hops, query half, key half) triples ring position ``ring_pos`` computes: the local block
    (0, None, None), then one per :func:`kv_sends` entry (the block from ``hops`` positions back; key half
    0/1 for an early/late part, None for all of it). For benchmarks and tests; the kernel skips tiles."""
    half = {"all": None, "early": 0, "late": 1}
    sends = kv_sends(ring_size, local_len, layout=layout, causal=causal, window=window, ordered=ordered)
    return [(0, None, None)] + [(s, None, half[part]) for s, part in sends]


def computed_area(positions, segment_ids, *, ring_size, layout, causal=True, window=None, block_q=512,
                  block_k=512, ordered=True):
    """Query–key pairs each ring position actually computes: int64 [ring_size].

    positions, segment_ids: numpy int [B, T] of the whole sequence in layout order (ring position r holds
    tokens [r·T/R, (r+1)·T/R)). Counts, for every step of :func:`schedule`, the (block_q × block_k) tiles
    the XLA kernel does not skip (its own ``fit_block`` and ``block_may_be_visible``, with the ring's
    :func:`tiles`), summed over the batch. The max/mean over positions is the ring's work balance.
    """
    n = positions.shape[1] // ring_size
    block_q, block_k = tiles("xla", layout, n, block_q, block_k)
    local = lambda x, r: x[:, r * n:(r + 1) * n]
    area = np.zeros(ring_size, np.int64)
    for r in range(ring_size):
        for s, qh, kh in schedule(r, ring_size, n, layout=layout, causal=causal, window=window, ordered=ordered):
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
