"""Flash attention as Pallas kernels for the Triton GPU backend; forward returns (out, lse).

The same contract as :mod:`lcjax.kernels.flash_attention.xla` (its oracle), written as three
``pallas_call`` kernels after FlashAttention-2 (Dao 2023, arXiv:2307.08691):

- forward (Alg. 1): grid (query block, batch, query head); each program keeps its query tile, runs the
  online softmax over the key tiles of its kv head and writes ``out`` and ``lse``;
- backward (Alg. 2), split in two kernels so that no atomics are needed: dK/dV with grid (key block,
  batch, kv head), looping over query tiles and over the G query heads that share the kv head (GQA is
  summed inside the kernel); dQ with grid (query block, batch, query head), looping over key tiles. Both
  recompute the probabilities from the given (final, possibly ring-merged) ``lse``, with
  delta = rowsum(dout · out).

GQA never copies K/V: the BlockSpec index maps send query head n to kv head n // G. Masks come from
positions and segment ids only; a (query tile, key tile) pair that no query can see — judged from the
tiles' position and segment ranges — is skipped with ``lax.cond`` inside the loop. Scores, softmax
statistics and all accumulators are float32; float32 inputs use IEEE float32 dots (not TF32).

Shapes: q [B, T, N, H]; k, v [B, S, K, H] with N = K·G; q_pos, q_seg int32 [B, T]; k_pos, k_seg int32
[B, S]. ``out`` float32 [B, T, N, H]; ``lse`` float32 [B, T, N] (−inf and ``out`` 0 for a query that sees
no key).

Tiles: Triton needs power-of-two tiles of at least 16. ``block_q``/``block_k`` are upper bounds: each is
rounded down to a power of two, clamped to [16, the kernel's cap] (``FWD_MAX_BLOCK``,
``BWD_DKV_MAX_BLOCK``, ``BWD_DQ_MAX_BLOCK``: larger tiles overflow shared memory or registers) and to
the padded length. Lengths that are not a multiple of the tile are padded (padded keys and queries are
masked by index inside the kernels); a head dim that is not a power of two >= 16 is zero-padded.
The padding costs one copy of the inputs, so prefer lengths that are multiples of 128.

``interpret=None`` compiles the kernels with Triton when the program is compiled for GPUs (decided from the
program's devices, so a deviceless compile for a GPU target builds the real kernel) and runs them in the
Pallas interpreter otherwise. Imports only JAX (the Triton backend ships with jaxlib); JAX 0.11 deprecates the Pallas
Triton backend in favour of Mosaic GPU, which would live in its own module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lcjax.kernels.flash_attention.platform import resolve_interpret
from lcjax.kernels.flash_attention.xla import block_may_be_visible

NEG_INF = float("-inf")
MIN_BLOCK = 16  # Triton dots need M, N, K >= 16
# (query tile cap, key tile cap) per kernel; checked against H100/H200 shared memory at H = 128 (bf16).
FWD_MAX_BLOCK = (128, 64)
BWD_DKV_MAX_BLOCK = (32, 64)
BWD_DQ_MAX_BLOCK = (64, 32)
NUM_STAGES = 2

_SQ = getattr(pl, "squeezed", None)  # a squeezed block dim; None on JAX versions without pl.squeezed


# ------------------------------------------------------------------------------------------------ sizes

def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _pow2_ceil(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _tile(requested: int, cap: int, length: int) -> int:
    """A power-of-two tile in [MIN_BLOCK, cap], no larger than needed to cover ``length``."""
    if int(requested) < 1:
        raise ValueError(f"block size {requested} must be >= 1")
    tile = min(_pow2_floor(requested), cap, _pow2_ceil(length))
    return max(tile, MIN_BLOCK)


def _head_dim(h: int) -> int:
    """Head dim as the kernels see it: the next power of two, at least 16."""
    return max(MIN_BLOCK, _pow2_ceil(h))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _num_warps(hp: int) -> int:
    """4 warps for head dims up to 64, 8 above (keeps the float32 accumulators in registers)."""
    return 4 if hp <= 64 else 8


def _check(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, N, H] / [B, S, K, H]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree in batch and head dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be divisible by kv heads {k.shape[2]}")


def _pad_to(x, axis: int, size: int, mode: str = "constant", value=0):
    """Pad ``x`` along ``axis`` up to ``size`` (a no-op when it already has that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    if mode == "edge":
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths, constant_values=value)


def _compiler_params(num_warps: int):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES)


# --------------------------------------------------------------------------------------- kernel pieces

def _precision(dtype):
    """IEEE float32 dots for float32 inputs (Triton's default would be TF32); native for bf16/f16."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _dot(a, b, precision, *, ta=False, tb=False):
    """float32 a @ b on 2-D tiles, with a (``ta``) or b (``tb``) taken transposed."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _index_valid(start, size, length, padded):
    """Bool [size]: which rows of a tile lie inside the unpadded length (None when nothing is padded)."""
    if not padded:
        return None
    return start + lax.broadcasted_iota(jnp.int32, (size,), 0) < length


def _visible(qp, qs, kp, ks, causal, window, q_ok=None, k_ok=None):
    """Bool [tq, tk] visibility of a key tile to a query tile."""
    mask = qs[:, None] == ks[None, :]
    if causal:
        mask &= kp[None, :] <= qp[:, None]
    if window is not None:
        mask &= qp[:, None] - kp[None, :] < window
    if q_ok is not None:
        mask &= q_ok[:, None]
    if k_ok is not None:
        mask &= k_ok[None, :]
    return mask


# -------------------------------------------------------------------------------------------- forward

def _fwd_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, o_ref, lse_ref, *, causal, window,
                scale, block_k, s_len, precision):
    bq, hp = q_ref.shape
    n_kblocks = k_ref.shape[0] // block_k
    q = q_ref[...]
    qp, qs = qp_ref[...], qs_ref[...]

    def body(j, carry):
        start = pl.multiple_of(j * block_k, block_k)
        sl = pl.ds(start, block_k)
        kp, ks = kp_ref[sl], ks_ref[sl]

        def compute(carry):
            m, l, acc = carry
            k, v = k_ref[sl, :], v_ref[sl, :]
            k_ok = _index_valid(start, block_k, s_len, k_ref.shape[0] != s_len)
            mask = _visible(qp, qs, kp, ks, causal, window, k_ok=k_ok)
            s = jnp.where(mask, _dot(q, k, precision, tb=True) * scale, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
            p = jnp.where(mask, jnp.exp(s - m_safe[:, None]), 0.0)
            corr = jnp.exp(m - m_safe)
            pv = _dot(p.astype(v.dtype), v, precision)
            return m_new, l * corr + jnp.sum(p, axis=1), acc * corr[:, None] + pv

        return lax.cond(block_may_be_visible(qp, kp, qs, ks, causal, window), compute, lambda c: c, carry)

    init = (jnp.full((bq,), NEG_INF, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, hp), jnp.float32))
    m, l, acc = lax.fori_loop(0, n_kblocks, body, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), NEG_INF)


def _pad_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, hp, tp, sp):
    """Zero-pad the head dim to ``hp``, queries to ``tp`` and keys to ``sp`` tokens; positions and
    segment ids are edge-padded (the kernels mask padded rows and columns by index)."""
    q_ = _pad_to(_pad_to(q, 3, hp), 1, tp)
    k_, v_ = (_pad_to(_pad_to(x, 3, hp), 1, sp) for x in (k, v))
    qp_, qs_ = (_pad_to(x.astype(jnp.int32), 1, tp, "edge") for x in (q_pos, q_seg))
    kp_, ks_ = (_pad_to(x.astype(jnp.int32), 1, sp, "edge") for x in (k_pos, k_seg))
    return q_, k_, v_, qp_, kp_, qs_, ks_


def flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal=True, window=None, scale=None,
                  block_q=512, block_k=512, interpret=None):
    """Flash attention forward (FlashAttention-2, arXiv:2307.08691, Alg. 1) as a Pallas Triton kernel.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H], float32 or bf16, N divisible by K (query head n uses kv head
        n // (N/K)).
      q_pos, q_seg: int32 [B, T]; k_pos, k_seg: int32 [B, S] — positions and segment ids; key j is
        visible to query i when seg_j = seg_i, (causal ⇒ pos_j ≤ pos_i), (window W ⇒ pos_i − pos_j < W).
      scale: score scale, default 1/√H.
      block_q, block_k: upper bounds on the tiles (see the module docstring: power of two, >= 16, capped).
      interpret: run in the Pallas interpreter; None ⇒ True unless compiled for GPUs
        (:func:`lcjax.kernels.flash_attention.platform.resolve_interpret`).
    Returns:
      (out float32 [B, T, N, H], lse float32 [B, T, N]); a query that sees no key gets out 0, lse −inf.
    Raises:
      ValueError for inconsistent shapes, N not divisible by K, or a block size < 1.
    """
    _check(q, k, v)
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = h ** -0.5 if scale is None else float(scale)
    bq, bk = _tile(block_q, FWD_MAX_BLOCK[0], t), _tile(block_k, FWD_MAX_BLOCK[1], s_len)
    hp, tp, sp = _head_dim(h), _round_up(t, bq), _round_up(s_len, bk)

    q_, k_, v_, qp_, kp_, qs_, ks_ = _pad_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, hp, tp, sp)

    kernel = functools.partial(_fwd_kernel, causal=causal, window=window, scale=scale, block_k=bk,
                               s_len=s_len, precision=_precision(q.dtype))
    q_spec = pl.BlockSpec((_SQ, bq, _SQ, hp), lambda i, bi, ni: (bi, i, ni, 0))
    kv_spec = pl.BlockSpec((_SQ, sp, _SQ, hp), lambda i, bi, ni: (bi, 0, ni // g, 0))
    out, lse = pl.pallas_call(
        kernel,
        grid=(tp // bq, b, n),
        in_specs=[q_spec, kv_spec, kv_spec,
                  pl.BlockSpec((_SQ, bq), lambda i, bi, ni: (bi, i)),
                  pl.BlockSpec((_SQ, sp), lambda i, bi, ni: (bi, 0)),
                  pl.BlockSpec((_SQ, bq), lambda i, bi, ni: (bi, i)),
                  pl.BlockSpec((_SQ, sp), lambda i, bi, ni: (bi, 0))],
        out_specs=[q_spec, pl.BlockSpec((_SQ, _SQ, bq), lambda i, bi, ni: (bi, ni, i))],
        out_shape=[jax.ShapeDtypeStruct((b, tp, n, hp), jnp.float32),
                   jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
        compiler_params=_compiler_params(_num_warps(hp)),
        interpret=resolve_interpret(interpret),
        name="lcjax_flash_fwd",
    )(q_, k_, v_, qp_, kp_, qs_, ks_)
    return out[:, :t, :, :h], jnp.transpose(lse[:, :, :t], (0, 2, 1))


# ------------------------------------------------------------------------------------------- backward

def _probs(q, k, lse, qp, qs, kp, ks, scale, precision, causal, window, q_ok, k_ok):
    """Recomputed probabilities p = exp(s − lse) [tq, tk], zero where masked (and for lse = −inf)."""
    mask = _visible(qp, qs, kp, ks, causal, window, q_ok=q_ok, k_ok=k_ok)
    lse_safe = jnp.where(lse == NEG_INF, 0.0, lse)
    s = _dot(q, k, precision, tb=True) * scale
    return jnp.where(mask, jnp.exp(s - lse_safe[:, None]), 0.0)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qp_ref, kp_ref, qs_ref, ks_ref,
                dk_ref, dv_ref, *, causal, window, scale, block_q, t_len, s_len, q_padded, k_padded,
                precision):
    """dK, dV of one key tile of one kv head: loop over query tiles, then over the G heads sharing it."""
    bk, hp = k_ref.shape
    n_qblocks, g = q_ref.shape[0] // block_q, q_ref.shape[1]
    k_start = pl.program_id(0) * bk
    k, v = k_ref[...], v_ref[...]
    kp, ks = kp_ref[...], ks_ref[...]
    k_ok = _index_valid(k_start, bk, s_len, k_padded)

    def q_block(i, carry):
        start = pl.multiple_of(i * block_q, block_q)
        sl = pl.ds(start, block_q)
        qp, qs = qp_ref[sl], qs_ref[sl]
        q_ok = _index_valid(start, block_q, t_len, q_padded)

        def head(gi, carry):
            dk, dv = carry
            q, do = q_ref[sl, gi, :], do_ref[sl, gi, :]
            lse, delta = lse_ref[gi, sl], dl_ref[gi, sl]
            p = _probs(q, k, lse, qp, qs, kp, ks, scale, precision, causal, window, q_ok, k_ok)
            dv = dv + _dot(p.astype(do.dtype), do, precision, ta=True)
            ds = p * (_dot(do, v, precision, tb=True) - delta[:, None]) * scale
            dk = dk + _dot(ds.astype(q.dtype), q, precision, ta=True)
            return dk, dv

        return lax.cond(block_may_be_visible(qp, kp, qs, ks, causal, window),
                        lambda c: lax.fori_loop(0, g, head, c), lambda c: c, carry)

    zeros = jnp.zeros((bk, hp), jnp.float32)
    dk, dv = lax.fori_loop(0, n_qblocks, q_block, (zeros, zeros))
    dk_ref[...] = dk
    dv_ref[...] = dv


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qp_ref, kp_ref, qs_ref, ks_ref, dq_ref, *,
               causal, window, scale, block_k, t_len, s_len, q_padded, k_padded, precision):
    """dQ of one query tile of one query head: loop over the key tiles of its kv head."""
    bq, hp = q_ref.shape
    n_kblocks = k_ref.shape[0] // block_k
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], dl_ref[...]
    qp, qs = qp_ref[...], qs_ref[...]
    q_ok = _index_valid(pl.program_id(0) * bq, bq, t_len, q_padded)

    def body(j, dq):
        start = pl.multiple_of(j * block_k, block_k)
        sl = pl.ds(start, block_k)
        kp, ks = kp_ref[sl], ks_ref[sl]

        def compute(dq):
            k, v = k_ref[sl, :], v_ref[sl, :]
            k_ok = _index_valid(start, block_k, s_len, k_padded)
            p = _probs(q, k, lse, qp, qs, kp, ks, scale, precision, causal, window, q_ok, k_ok)
            ds = p * (_dot(do, v, precision, tb=True) - delta[:, None]) * scale
            return dq + _dot(ds.astype(k.dtype), k, precision)

        return lax.cond(block_may_be_visible(qp, kp, qs, ks, causal, window), compute, lambda c: c, dq)

    dq_ref[...] = lax.fori_loop(0, n_kblocks, body, jnp.zeros((bq, hp), jnp.float32))


def flash_backward(q, k, v, out, lse, dout, q_pos, k_pos, q_seg, k_seg, *, causal=True, window=None,
                   scale=None, block_q=512, block_k=512, interpret=None):
    """Gradients of flash attention (FlashAttention-2, arXiv:2307.08691, Alg. 2) as Pallas Triton kernels.

    ``out`` and ``lse`` are the final output and log-sum-exp, which may already include other key blocks
    (ring attention): probabilities are recomputed as exp(s − lse) and delta = rowsum(dout · out).

    Args: as :func:`flash_forward`, plus out [B, T, N, H], lse float32 [B, T, N], dout [B, T, N, H].
    Returns:
      (dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, H]), float32; zero for queries/keys that see
      nothing (rows with lse = −inf).
    Raises:
      ValueError for inconsistent shapes, N not divisible by K, or a block size < 1.
    """
    _check(q, k, v)
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = h ** -0.5 if scale is None else float(scale)
    hp = _head_dim(h)
    # Pad both lengths to a multiple of every tile used by the two kernels (all powers of two).
    kv_q, kv_k = _tile(block_q, BWD_DKV_MAX_BLOCK[0], t), _tile(block_k, BWD_DKV_MAX_BLOCK[1], s_len)
    dq_q, dq_k = _tile(block_q, BWD_DQ_MAX_BLOCK[0], t), _tile(block_k, BWD_DQ_MAX_BLOCK[1], s_len)
    tp, sp = _round_up(t, max(kv_q, dq_q)), _round_up(s_len, max(kv_k, dq_k))
    q_padded, k_padded = tp != t, sp != s_len

    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    lse_, dl_ = (_pad_to(jnp.transpose(x.astype(jnp.float32), (0, 2, 1)), 2, tp) for x in (lse, delta))
    q_, k_, v_, qp_, kp_, qs_, ks_ = _pad_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, hp, tp, sp)
    do_ = _pad_to(_pad_to(dout.astype(q.dtype), 3, hp), 1, tp)
    args = (q_, k_, v_, do_, lse_, dl_, qp_, kp_, qs_, ks_)
    static = dict(causal=causal, window=window, scale=scale, t_len=t, s_len=s_len, q_padded=q_padded,
                  k_padded=k_padded, precision=_precision(q.dtype))
    interpret = resolve_interpret(interpret)

    # dK, dV: grid (key tile, batch, kv head); each program reads all G query heads of its kv head.
    qg_spec = pl.BlockSpec((_SQ, tp, g, hp), lambda j, bi, hi: (bi, 0, hi, 0))
    kt_spec = pl.BlockSpec((_SQ, kv_k, _SQ, hp), lambda j, bi, hi: (bi, j, hi, 0))
    rows_spec = pl.BlockSpec((_SQ, g, tp), lambda j, bi, hi: (bi, hi, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=kv_q, **static),
        grid=(sp // kv_k, b, kh),
        in_specs=[qg_spec, kt_spec, kt_spec, qg_spec, rows_spec, rows_spec,
                  pl.BlockSpec((_SQ, tp), lambda j, bi, hi: (bi, 0)),
                  pl.BlockSpec((_SQ, kv_k), lambda j, bi, hi: (bi, j)),
                  pl.BlockSpec((_SQ, tp), lambda j, bi, hi: (bi, 0)),
                  pl.BlockSpec((_SQ, kv_k), lambda j, bi, hi: (bi, j))],
        out_specs=[kt_spec, kt_spec],
        out_shape=[jax.ShapeDtypeStruct((b, sp, kh, hp), jnp.float32)] * 2,
        compiler_params=_compiler_params(_num_warps(hp)),
        interpret=interpret,
        name="lcjax_flash_bwd_dkv",
    )(*args)

    # dQ: grid (query tile, batch, query head); K/V of kv head n // G.
    qt_spec = pl.BlockSpec((_SQ, dq_q, _SQ, hp), lambda i, bi, ni: (bi, i, ni, 0))
    kv_spec = pl.BlockSpec((_SQ, sp, _SQ, hp), lambda i, bi, ni: (bi, 0, ni // g, 0))
    row_spec = pl.BlockSpec((_SQ, _SQ, dq_q), lambda i, bi, ni: (bi, ni, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=dq_k, **static),
        grid=(tp // dq_q, b, n),
        in_specs=[qt_spec, kv_spec, kv_spec, qt_spec, row_spec, row_spec,
                  pl.BlockSpec((_SQ, dq_q), lambda i, bi, ni: (bi, i)),
                  pl.BlockSpec((_SQ, sp), lambda i, bi, ni: (bi, 0)),
                  pl.BlockSpec((_SQ, dq_q), lambda i, bi, ni: (bi, i)),
                  pl.BlockSpec((_SQ, sp), lambda i, bi, ni: (bi, 0))],
        out_specs=qt_spec,
        out_shape=jax.ShapeDtypeStruct((b, tp, n, hp), jnp.float32),
        compiler_params=_compiler_params(_num_warps(hp)),
        interpret=interpret,
        name="lcjax_flash_bwd_dq",
    )(*args)
    return dq[:, :t, :, :h], dk[:, :s_len, :, :h], dv[:, :s_len, :, :h]
