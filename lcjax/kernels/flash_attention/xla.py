"""Blockwise (flash) attention in plain jnp: forward returns (out, lse), backward recomputes the scores.

The per-device kernel under every sequence-parallel strategy. Queries are processed in blocks of
``block_q`` and keys in blocks of ``block_k`` with the online softmax of Dao et al. 2022 ("FlashAttention",
arXiv:2205.14135, Alg. 1; backward Alg. 2 / FlashAttention-2 arXiv:2307.08691 Alg. 2), so no [T, S] score
matrix exists at once. A (query block, key block) pair that no query can see — judged from the blocks'
position and segment ranges — is skipped with ``lax.cond``.

Shapes: q [B, T, N, H]; k, v [B, S, K, H] with N = K·G (GQA: query head n uses kv head n // G);
q_pos, q_seg int32 [B, T]; k_pos, k_seg int32 [B, S]. ``out`` float32 [B, T, N, H]; ``lse`` float32
[B, T, N] (natural log of the softmax denominator; −inf for a query that sees no key, whose ``out`` is 0).
Kernels take plain arrays and never a config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lcjax.ops.vma import vary_tree_like

NEG_INF = -jnp.inf
DEFAULT_BLOCK = 512  # the tile of block_q/block_k = None


def _blocks(block_q, block_k):
    """(block_q, block_k) with None replaced by DEFAULT_BLOCK; ValueError for a block < 1."""
    blocks = tuple(DEFAULT_BLOCK if b is None else int(b) for b in (block_q, block_k))
    if min(blocks) < 1:
        raise ValueError(f"block sizes {blocks} must be >= 1")
    return blocks


def fit_block(length: int, block: int) -> int:
    """The largest divisor of ``length`` that is <= ``block`` (so blocks tile the axis exactly)."""
    block = max(1, min(block, length))
    while length % block:
        block -= 1
    return block


def block_mask(q_pos, k_pos, q_seg, k_seg, causal, window):
    """Visibility [B, 1, 1, Tq, Tk] of keys to queries from positions and segment ids."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = q_seg[:, :, None] == k_seg[:, None, :]
    if causal:
        mask &= kp <= qp
    if window is not None:
        mask &= qp - kp < window
    return mask[:, None, None]


def block_may_be_visible(q_pos, k_pos, q_seg, k_seg, causal, window):
    """Scalar bool: False only when no key of the block can be visible to any query of the block."""
    ok = (jnp.min(k_seg) <= jnp.max(q_seg)) & (jnp.max(k_seg) >= jnp.min(q_seg))
    if causal:
        ok &= jnp.min(k_pos) <= jnp.max(q_pos)
    if window is not None:
        ok &= jnp.max(k_pos) > jnp.min(q_pos) - window
    return ok


def _split(x, n_blocks, axis=1):
    """[B, T, ...] -> [n_blocks, B, T/n_blocks, ...]."""
    shape = x.shape[:axis] + (n_blocks, x.shape[axis] // n_blocks) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _merge_blocks(x, axis=1):
    """Inverse of :func:`_split`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _scores(qb, kb, scale):
    """qb [B, bq, K, G, H], kb [B, bk, K, H] -> float32 scores [B, K, G, bq, bk]."""
    return jnp.einsum("bqkgh,bskh->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale


def flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal=True, window=None, scale=None,
                  block_q=None, block_k=None):
    """Blockwise attention forward. Returns (out float32 [B, T, N, H], lse float32 [B, T, N]).

    block_q, block_k: tiles (None: DEFAULT_BLOCK), clipped to divisors of the lengths (:func:`fit_block`).
    """
    block_q, block_k = _blocks(block_q, block_k)
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    scale = h ** -0.5 if scale is None else scale
    nq, nk = t // fit_block(t, block_q), k.shape[1] // fit_block(k.shape[1], block_k)
    qs = _split(q.reshape(b, t, kh, g, h), nq)
    qps, qss = _split(q_pos, nq), _split(q_seg, nq)
    ks, vs, kps, kss = _split(k, nk), _split(v, nk), _split(k_pos, nk), _split(k_seg, nk)

    refs = (q, k, v, q_pos, k_pos, q_seg, k_seg)

    def one_q_block(args):
        qb, qp, qsg = args
        bq = qb.shape[1]

        def step(carry, kargs):
            kb, vb, kp, ksg = kargs

            def compute(carry):
                m, l, acc = carry
                mask = block_mask(qp, kp, qsg, ksg, causal, window)
                s = jnp.where(mask, _scores(qb, kb, scale), NEG_INF)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
                p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
                corr = jnp.exp(m - m_safe)
                pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(vb.dtype), vb,
                                preferred_element_type=jnp.float32)
                return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

            visible = block_may_be_visible(qp, kp, qsg, ksg, causal, window)
            return lax.cond(visible, compute, lambda c: c, carry), None

        init = vary_tree_like((jnp.full((b, kh, g, bq), NEG_INF, jnp.float32),
                               jnp.zeros((b, kh, g, bq), jnp.float32),
                               jnp.zeros((b, kh, g, bq, h), jnp.float32)), *refs)
        (m, l, acc), _ = lax.scan(step, init, (ks, vs, kps, kss))
        out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), NEG_INF)
        # [B, K, G, bq, H] -> [B, bq, N, H]; [B, K, G, bq] -> [B, bq, N]
        return (jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, bq, n, h),
                jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, bq, n))

    out, lse = lax.map(one_q_block, (qs, qps, qss))
    return _merge_blocks(out), _merge_blocks(lse)


def _block_grads(qb, kb, vb, dob, lb, db, mask, scale):
    """One (query block, key block) pair's gradient contributions (Dao et al. 2022, FlashAttention, Alg. 4):
    P = exp(S − lse) under ``mask``, dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − Δ) · scale, dK = dSᵀ Q, dQ = dS K.
    qb, dob [B, bq, K, G, H]; kb, vb [B, bk, K, H]; lb, db (lse, Δ) [B, K, G, bq]; mask [.., bq, bk].
    Returns (dk [B, bk, K, H], dv [B, bk, K, H], dq [B, bq, K, G, H]), float32."""
    lse_safe = jnp.where(lb == NEG_INF, 0.0, lb)
    p = jnp.where(mask, jnp.exp(_scores(qb, kb, scale) - lse_safe[..., None]), 0.0)
    dv = jnp.einsum("bkgqs,bqkgh->bskh", p.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bqkgh,bskh->bkgqs", dob, vb, preferred_element_type=jnp.float32)
    ds = p * (dp - db[..., None]) * scale
    dk = jnp.einsum("bkgqs,bqkgh->bskh", ds.astype(qb.dtype), qb, preferred_element_type=jnp.float32)
    dq = jnp.einsum("bkgqs,bskh->bqkgh", ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)
    return dk, dv, dq


def flash_backward(q, k, v, out, lse, dout, q_pos, k_pos, q_seg, k_seg, *, causal=True, window=None,
                   scale=None, block_q=None, block_k=None):
    """Gradients of blockwise attention given the final ``out`` and ``lse`` (which may already include
    other key blocks, as in ring attention: the softmax is normalised by the global lse).

    Args: as :func:`flash_forward`, plus out [B, T, N, H], lse [B, T, N], dout [B, T, N, H].
    Returns: (dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, H]), float32.
    """
    block_q, block_k = _blocks(block_q, block_k)
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = h ** -0.5 if scale is None else scale
    nq, nk = t // fit_block(t, block_q), s_len // fit_block(s_len, block_k)
    bq = t // nq
    refs = (q, k, v, out, lse, dout, q_pos, k_pos, q_seg, k_seg)

    def heads_major(x):  # [B, T, N] -> [B, K, G, T]
        return jnp.transpose(x.reshape(b, -1, kh, g), (0, 2, 3, 1))

    delta = heads_major(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1))
    lse_h = heads_major(lse)
    qs = _split(q.reshape(b, t, kh, g, h), nq)
    dos = _split(dout.reshape(b, t, kh, g, h), nq)
    lses, deltas = _split(lse_h, nq, axis=3), _split(delta, nq, axis=3)
    qps, qss = _split(q_pos, nq), _split(q_seg, nq)

    def one_k_block(dq, kargs):
        kb, vb, kp, ksg = kargs

        def step(carry, qargs):
            qb, dob, lb, db, qp, qsg = qargs

            def compute(carry):
                dk, dv = carry
                mask = block_mask(qp, kp, qsg, ksg, causal, window)
                dk_b, dv_b, dqb = _block_grads(qb, kb, vb, dob, lb, db, mask, scale)
                return (dk + dk_b, dv + dv_b), dqb

            visible = block_may_be_visible(qp, kp, qsg, ksg, causal, window)
            zero_dq = vary_tree_like(jnp.zeros((b, bq, kh, g, h), jnp.float32), *refs)
            return lax.cond(visible, compute, lambda c: (c, zero_dq), carry)

        init = vary_tree_like((jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32)),
                              *refs)
        (dk, dv), dq_parts = lax.scan(step, init, (qs, dos, lses, deltas, qps, qss))
        return dq + dq_parts, (dk, dv)

    dq0 = vary_tree_like(jnp.zeros((nq, b, bq, kh, g, h), jnp.float32), *refs)
    dq, (dk, dv) = lax.scan(one_k_block, dq0, (_split(k, nk), _split(v, nk), _split(k_pos, nk),
                                                _split(k_seg, nk)))
    return _merge_blocks(dq).reshape(b, t, n, h), _merge_blocks(dk), _merge_blocks(dv)
