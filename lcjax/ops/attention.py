"""The dense attention reference: THE oracle every attention implementation is tested against.

Masks come from positions and segment ids only (docs/design.md, "Attention"): key j is visible to query i when
(causal ⇒ pos_j ≤ pos_i), (window W ⇒ pos_i − pos_j < W) and (segments ⇒ seg_j = seg_i). It materialises
the [T, S] score matrix, so it is for tests and short sequences only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible(q_pos, k_pos, q_seg=None, k_seg=None, *, causal=True, window=None):
    """Boolean mask [B, T, S]: may query i (positions ``q_pos`` [B, T]) see key j (``k_pos`` [B, S])?

    ``window=W`` (causal only) keeps keys with pos_i − pos_j < W. Segment ids (int32 [B, T] / [B, S]) keep
    keys of the same segment only.
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), dtype=bool)
    if causal:
        mask &= kp <= qp
    if window is not None:
        mask &= qp - kp < window
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask


def reference(q, k, v, *, positions, segment_ids=None, causal=True, window=None, scale=None):
    """Dense softmax attention with GQA, computed in float32.

    Args:
      q: [B, T, N, H]; k, v: [B, T, K, H] with N divisible by K (query head n uses kv head n // (N/K)).
      positions: int32 [B, T], the tokens' original positions (any layout order).
      segment_ids: optional int32 [B, T]; tokens attend within their own segment only.
      causal, window: see :func:`visible`; ``window`` requires ``causal``.
      scale: score scale, default 1/√H.
    Returns:
      [B, T, N, H] in q's dtype. A query that sees no key gets zeros.
    Raises:
      ValueError for a window without causal masking or N not divisible by K.
    """
    if window is not None and not causal:
        raise ValueError("window requires causal attention")
    n, kh = q.shape[2], k.shape[2]
    if n % kh:
        raise ValueError(f"query heads {n} must be divisible by kv heads {kh}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = jnp.repeat(k, n // kh, axis=2).astype(jnp.float32)
    v = jnp.repeat(v, n // kh, axis=2).astype(jnp.float32)
    s = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k, precision="highest") * scale
    mask = visible(positions, positions, segment_ids, segment_ids, causal=causal, window=window)[:, None]
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1, where=mask)
    p = jnp.where(mask, p, 0.0)
    return jnp.einsum("bnts,bsnh->btnh", p, v, precision="highest").astype(q.dtype)
