"""Flash attention as Pallas kernels for the Triton GPU backend; forward returns (out, lse).

The same contract as :mod:`lcjax.kernels.flash_attention.xla` (its oracle), written as three
``pallas_call`` kernels after FlashAttention-2 (Dao 2023, arXiv:2307.08691):

- forward (Alg. 1): grid (query tile, batch, query head); each program keeps its query tile and runs the
  online softmax over the key tiles of its kv head, writing ``out`` and ``lse``;
- backward (Alg. 2), split in two kernels so that no atomics are needed: dK/dV with grid (key tile,
  batch, kv head), one loop over (query tile, query head of the kv head's group) pairs, so GQA is summed
  inside the kernel; dQ with grid (query tile, batch, query head), looping over key tiles. Both recompute
  the probabilities from the given (final, possibly ring-merged) ``lse``, with delta = rowsum(dout · out).
  dK/dV works on transposed scores (key rows × query columns), so every matmul has the key tile as M
  and needs no transposed register operand.

Block sparsity without branches: each program's loop runs only over the tiles that may hold a visible
pair, with bounds computed in XLA from the tiles' position and segment ranges
(:mod:`lcjax.kernels.flash_attention.tiling`; valid for any positions and segment ids). The loop is split
in three: masked tiles, then a run of tiles where every pair is visible (plain matmul + online softmax,
no mask), then masked tiles again. No ``lax.cond`` in a loop body, so Triton pipelines the tile loads
(``cp.async``) and uses Hopper's ``wgmma`` on full-size tiles.

Numerics: scores are scaled by scale·log2(e) and exponentiated with exp2 (as FlashAttention's Triton
kernels do); scores, softmax statistics and all accumulators are float32; float32 inputs use IEEE float32
dots (not TF32). The backward folds ``scale`` into dK and dQ once, after the loop.

Shapes: q [B, T, N, H]; k, v [B, S, K, H] with N = K·G; q_pos, q_seg int32 [B, T]; k_pos, k_seg int32
[B, S]. ``out`` float32 [B, T, N, H]; ``lse`` float32 [B, T, N] (−inf and ``out`` 0 for a query that sees
no key).

Tiles: ``block_q = block_k = None`` (the default) takes each pass's tiles, warps and pipeline stages from
the tuned table (:mod:`lcjax.kernels.flash_attention.triton_tiles`) for the GPU being compiled for;
integers override the tiles of every pass (a power of two in [16, 128], clamped to the lengths).
Lengths that are not a multiple of the tile are padded (padded rows and columns are masked by index on
the boundary tiles); a head dim that is not a power of two >= 16 is zero-padded. The padding costs one
copy of the inputs, so prefer lengths that are multiples of 128.

``interpret=None`` compiles the kernels with Triton when the program is compiled for GPUs (decided from the
program's devices, so a deviceless compile for a GPU target builds the real kernel) and runs them in the
Pallas interpreter otherwise. Imports only JAX (the Triton backend ships with jaxlib); JAX 0.11 deprecates
the Pallas Triton backend in favour of Mosaic GPU, which lives in its own module.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lcjax.kernels.flash_attention import tiling, triton_tiles
from lcjax.kernels.flash_attention.platform import resolve_interpret, target_device

PALLAS = True  # a Pallas kernel: a shard_map around it needs check_vma off (lcjax.kernels.flash_attention.api)

NEG_INF = float("-inf")
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MIN_BLOCK = triton_tiles.MIN_TILE

_SQ = getattr(pl, "squeezed", None)  # a squeezed block dim; None on JAX versions without pl.squeezed


# ------------------------------------------------------------------------------------------------ sizes

def _head_dim(h: int) -> int:
    """Head dim as the kernels see it: the next power of two, at least 16."""
    return max(MIN_BLOCK, 1 << max(0, h - 1).bit_length())


def _check(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, N, H] / [B, S, K, H]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree in batch and head dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be divisible by kv heads {k.shape[2]}")


def pass_configs(dtype, h: int, t_len: int, s_len: int, block_q=None, block_k=None, device=None,
                 configs=None) -> dict:
    """{"fwd" | "dkv" | "dq": PassConfig} for these inputs on the target devices (see triton_tiles).

    ``device``: (platform, device_kind); default the devices of the current trace
    (:func:`lcjax.kernels.flash_attention.platform.target_device`). ``configs``: {pass: PassConfig or
    [block_q, block_k, num_warps, num_stages]} used instead of the table and the blocks for those passes
    (for autotuning; tiles still clamped to the lengths). Raises ValueError for a block < 1.
    """
    family = triton_tiles.gpu_family(*(target_device() if device is None else device))
    hp, dtype = _head_dim(h), jnp.dtype(dtype)
    tuned = triton_tiles.tuned(family, hp, dtype.name)
    out = {}
    for name in triton_tiles.PASSES:
        explicit = (configs or {}).get(name)
        base = tuned[name] if explicit is None else triton_tiles.PassConfig(*map(int, explicit))
        blocks = (block_q, block_k) if explicit is None else (None, None)
        out[name] = triton_tiles.resolve(name, base, block_q=blocks[0], block_k=blocks[1], t_len=t_len,
                                         s_len=s_len, head_dim=hp, itemsize=dtype.itemsize, family=family)
    return out


def _pad_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, hp, tp, sp):
    """Zero-pad the head dim to ``hp``, queries to ``tp`` and keys to ``sp`` tokens; positions and
    segment ids are edge-padded (the kernels mask padded rows and columns by index)."""
    q_ = tiling.pad_to(tiling.pad_to(q, 3, hp), 1, tp)
    k_, v_ = (tiling.pad_to(tiling.pad_to(x, 3, hp), 1, sp) for x in (k, v))
    qp_, qs_ = (tiling.pad_to(x.astype(jnp.int32), 1, tp, "edge") for x in (q_pos, q_seg))
    kp_, ks_ = (tiling.pad_to(x.astype(jnp.int32), 1, sp, "edge") for x in (k_pos, k_seg))
    return q_, k_, v_, qp_, kp_, qs_, ks_


def _compiler_params(cfg: triton_tiles.PassConfig):
    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# --------------------------------------------------------------------------------------- kernel pieces

def _precision(dtype):
    """IEEE float32 dots for float32 inputs (Triton's default would be TF32); native for bf16/f16."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _dot(a, b, precision, *, tb=False):
    """float32 a @ b on 2-D tiles, b taken transposed when ``tb`` (a is never transposed: Hopper's wgmma
    reads a register operand only in its own layout)."""
    dims = (((1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _index_ok(start, size, length):
    """Bool [size]: which rows of a tile starting at ``start`` lie before ``length`` (unpadded)."""
    return start + lax.broadcasted_iota(jnp.int32, (size,), 0) < length


def _visible(qp, qs, kp, ks, causal, window, *, key_rows=False):
    """Bool [tq, tk] (or [tk, tq] with ``key_rows``): may the query see the key (same segment, causal,
    window)."""
    def qx(x):  # query ids/positions along the query axis of the mask
        return x[None, :] if key_rows else x[:, None]

    def kx(x):
        return x[:, None] if key_rows else x[None, :]

    mask = qx(qs) == kx(ks)
    if causal:
        mask &= kx(kp) <= qx(qp)
    if window is not None:
        mask &= qx(qp) - kx(kp) < window
    return mask


def _three_loops(bnd_ref, step, carry, expand=None):
    """Run ``step(j, carry, masked)`` over [lo, flo) masked, [flo, fhi) unmasked, [fhi, hi) masked
    (bounds from ``bnd_ref`` = (lo, flo, fhi, hi)). With ``expand`` = E each tile index is visited E
    times in one flat loop, as ``step((j, e), ...)`` for e in [0, E): one long loop pipelines better
    than a loop nest."""
    lo, flo, fhi, hi = (bnd_ref[i] for i in range(4))

    def loop(a, b, masked, carry):
        if expand is None:
            return lax.fori_loop(a, b, lambda j, c: step(j, c, masked), carry)

        def body(it, c):  # it >= 0: lax.div/rem are floor division and modulo
            if expand == 1:
                return step((a + it, jnp.int32(0)), c, masked)
            return step((a + lax.div(it, expand), lax.rem(it, expand)), c, masked)

        return lax.fori_loop(0, (b - a) * expand, body, carry)

    carry = loop(lo, flo, True, carry)
    carry = loop(flo, fhi, False, carry)
    return loop(fhi, hi, True, carry)


# -------------------------------------------------------------------------------------------- forward

def _fwd_kernel(bnd_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, o_ref, lse_ref, *, causal,
                window, scale, block_k, s_len, precision):
    """One query tile of one head: online softmax (FlashAttention-2 Alg. 1) in the base-2 domain."""
    bq, hp = q_ref.shape
    q = q_ref[...]
    qp, qs = qp_ref[...], qs_ref[...]
    c = scale * LOG2E

    def step(j, carry, masked):
        m, l, acc = carry
        start = pl.multiple_of(j * block_k, block_k)
        sl = pl.ds(start, block_k)
        s = _dot(q, k_ref[sl, :], precision, tb=True) * c
        if masked:
            mask = _visible(qp, qs, kp_ref[sl], ks_ref[sl], causal, window)
            mask &= _index_ok(start, block_k, s_len)[None, :]
            s = jnp.where(mask, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == NEG_INF, 0.0, m_new) if masked else m_new
        p = jnp.exp2(s - m_use[:, None])  # masked scores are −inf: p = 0
        corr = jnp.exp2(m - m_use)
        v = v_ref[sl, :]
        acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v, precision)
        return m_new, l * corr + jnp.sum(p, axis=1), acc

    init = (jnp.full((bq,), NEG_INF, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, hp), jnp.float32))
    m, l, acc = _three_loops(bnd_ref, step, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, NEG_INF)


def flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal=True, window=None, scale=None,
                  block_q=None, block_k=None, interpret=None, configs=None):
    """Flash attention forward (FlashAttention-2, arXiv:2307.08691, Alg. 1) as a Pallas Triton kernel.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H], float32, bf16 or f16, N divisible by K (query head n uses kv
        head n // (N/K)).
      q_pos, q_seg: int32 [B, T]; k_pos, k_seg: int32 [B, S] — positions and segment ids; key j is
        visible to query i when seg_j = seg_i, (causal ⇒ pos_j ≤ pos_i), (window W ⇒ pos_i − pos_j < W).
      scale: score scale, default 1/√H.
      block_q, block_k: None = the tuned tiles for the target GPU; integers override them (module docstring).
      interpret: run in the Pallas interpreter; None ⇒ True unless compiled for GPUs
        (:func:`lcjax.kernels.flash_attention.platform.resolve_interpret`).
      configs: explicit launch configurations per pass (:func:`pass_configs`; for autotuning).
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
    cfg = pass_configs(q.dtype, h, t, s_len, block_q, block_k, configs=configs)["fwd"]
    bq, bk = cfg.block_q, cfg.block_k
    hp, tp, sp = _head_dim(h), tiling.round_up(t, bq), tiling.round_up(s_len, bk)

    q_, k_, v_, qp_, kp_, qs_, ks_ = _pad_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, hp, tp, sp)
    bnd = tiling.bounds(qp_, qs_, kp_, ks_, tile_q=bq, tile_k=bk, t_len=t, s_len=s_len, causal=causal,
                        window=window)

    kernel = functools.partial(_fwd_kernel, causal=causal, window=window, scale=scale, block_k=bk,
                               s_len=s_len, precision=_precision(q.dtype))
    q_spec = pl.BlockSpec((_SQ, bq, _SQ, hp), lambda i, bi, ni: (bi, i, ni, 0))
    kv_spec = pl.BlockSpec((_SQ, sp, _SQ, hp), lambda i, bi, ni: (bi, 0, ni // g, 0))
    q_rows = pl.BlockSpec((_SQ, bq), lambda i, bi, ni: (bi, i))
    k_rows = pl.BlockSpec((_SQ, sp), lambda i, bi, ni: (bi, 0))
    out, lse = pl.pallas_call(
        kernel,
        grid=(tp // bq, b, n),
        in_specs=[pl.BlockSpec((_SQ, _SQ, 4), lambda i, bi, ni: (bi, i, 0)),
                  q_spec, kv_spec, kv_spec, q_rows, k_rows, q_rows, k_rows],
        out_specs=[q_spec, pl.BlockSpec((_SQ, _SQ, bq), lambda i, bi, ni: (bi, ni, i))],
        out_shape=[jax.ShapeDtypeStruct((b, tp, n, hp), jnp.float32),
                   jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
        compiler_params=_compiler_params(cfg),
        interpret=resolve_interpret(interpret),
        name="lcjax_flash_fwd",
    )(bnd, q_, k_, v_, qp_, kp_, qs_, ks_)
    return out[:, :t, :, :h], jnp.transpose(lse[:, :, :t], (0, 2, 1))


# ------------------------------------------------------------------------------------------- backward

def _dkv_kernel(bnd_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qp_ref, kp_ref, qs_ref, ks_ref,
                dk_ref, dv_ref, *, causal, window, scale, block_q, t_len, s_len, precision):
    """dK, dV of one key tile of one kv head (FlashAttention-2 Alg. 2, transposed: key rows).

    One flat loop over (query tile, head of the group) pairs; ``lse_ref`` holds lse·log2(e), +inf for a
    query that sees nothing (or is padding), so its probabilities are 0 on every tile.
    """
    bk, hp = k_ref.shape
    g = q_ref.shape[1]
    k_start = pl.program_id(0) * bk
    k, v = k_ref[...], v_ref[...]
    kp, ks = kp_ref[...], ks_ref[...]
    c = scale * LOG2E

    def step(idx, carry, masked):
        dk, dv = carry
        i, gi = idx
        start = pl.multiple_of(i * block_q, block_q)
        sl = pl.ds(start, block_q)
        q, do = q_ref[sl, gi, :], do_ref[sl, gi, :]
        st = _dot(k, q, precision, tb=True) * c  # [bk, bq]
        if masked:
            mask = _visible(qp_ref[sl], qs_ref[sl], kp, ks, causal, window, key_rows=True)
            mask &= _index_ok(k_start, bk, s_len)[:, None] & _index_ok(start, block_q, t_len)[None, :]
            st = jnp.where(mask, st, NEG_INF)
        pt = jnp.exp2(st - lse_ref[gi, sl][None, :])
        dv = dv + _dot(pt.astype(do.dtype), do, precision)
        dpt = _dot(v, do, precision, tb=True)
        dst = pt * (dpt - dl_ref[gi, sl][None, :])
        return dk + _dot(dst.astype(q.dtype), q, precision), dv

    zeros = jnp.zeros((bk, hp), jnp.float32)
    dk, dv = _three_loops(bnd_ref, step, (zeros, zeros), expand=g)
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


def _dq_kernel(bnd_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qp_ref, kp_ref, qs_ref, ks_ref, dq_ref,
               *, causal, window, scale, block_k, t_len, s_len, precision):
    """dQ of one query tile of one query head: loop over the key tiles of its kv head."""
    bq, hp = q_ref.shape
    q_start = pl.program_id(0) * bq
    q, do = q_ref[...], do_ref[...]
    lse2, delta = lse_ref[...], dl_ref[...]
    qp, qs = qp_ref[...], qs_ref[...]
    c = scale * LOG2E

    def step(j, dq, masked):
        start = pl.multiple_of(j * block_k, block_k)
        sl = pl.ds(start, block_k)
        k = k_ref[sl, :]
        s = _dot(q, k, precision, tb=True) * c
        if masked:
            mask = _visible(qp, qs, kp_ref[sl], ks_ref[sl], causal, window)
            mask &= _index_ok(q_start, bq, t_len)[:, None] & _index_ok(start, block_k, s_len)[None, :]
            s = jnp.where(mask, s, NEG_INF)
        p = jnp.exp2(s - lse2[:, None])
        ds = p * (_dot(do, v_ref[sl, :], precision, tb=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, precision)

    dq = _three_loops(bnd_ref, step, jnp.zeros((bq, hp), jnp.float32))
    dq_ref[...] = dq * scale


class _Dims(NamedTuple):
    """Sizes of one backward call: batch, query heads, kv heads, padded head dim, padded lengths."""
    b: int
    n: int
    kh: int
    hp: int
    tp: int
    sp: int

    @property
    def g(self) -> int:
        """Query heads per kv head."""
        return self.n // self.kh


def _bwd_rows(out, lse, dout, dtype, dims: _Dims):
    """The backward's per-query operands, padded: dout [B, Tp, N, Hp] in ``dtype``, lse·log2(e) and
    delta = rowsum(dout · out) as float32 [B, N, Tp] (padded queries get lse +inf, so p = 0 there)."""
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    lse_ = tiling.pad_to(jnp.transpose(tiling.lse2(lse), (0, 2, 1)), 2, dims.tp, value=jnp.inf)
    dl_ = tiling.pad_to(jnp.transpose(delta, (0, 2, 1)), 2, dims.tp)
    do_ = tiling.pad_to(tiling.pad_to(dout.astype(dtype), 3, dims.hp), 1, dims.tp)
    return do_, lse_, dl_


def _dkv_call(bnd, args, dims: _Dims, cfg: triton_tiles.PassConfig, static: dict, interpret: bool):
    """dK, dV float32 [B, Sp, K, Hp]: grid (key tile, batch, kv head); each program reads all G query
    heads of its kv head. ``args`` = (q, k, v, dout, lse2, delta, q_pos, k_pos, q_seg, k_seg), padded."""
    b, _, kh, hp, tp, sp = dims
    kq, kk = cfg.block_q, cfg.block_k
    qg_spec = pl.BlockSpec((_SQ, tp, dims.g, hp), lambda j, bi, hi: (bi, 0, hi, 0))
    kt_spec = pl.BlockSpec((_SQ, kk, _SQ, hp), lambda j, bi, hi: (bi, j, hi, 0))
    rows_spec = pl.BlockSpec((_SQ, dims.g, tp), lambda j, bi, hi: (bi, hi, 0))
    q_all = pl.BlockSpec((_SQ, tp), lambda j, bi, hi: (bi, 0))
    k_tile = pl.BlockSpec((_SQ, kk), lambda j, bi, hi: (bi, j))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=kq, **static),
        grid=(sp // kk, b, kh),
        in_specs=[pl.BlockSpec((_SQ, _SQ, 4), lambda j, bi, hi: (bi, j, 0)),
                  qg_spec, kt_spec, kt_spec, qg_spec, rows_spec, rows_spec, q_all, k_tile, q_all, k_tile],
        out_specs=[kt_spec, kt_spec],
        out_shape=[jax.ShapeDtypeStruct((b, sp, kh, hp), jnp.float32)] * 2,
        compiler_params=_compiler_params(cfg),
        interpret=interpret,
        name="lcjax_flash_bwd_dkv",
    )(bnd, *args)


def _dq_call(bnd, args, dims: _Dims, cfg: triton_tiles.PassConfig, static: dict, interpret: bool):
    """dQ float32 [B, Tp, N, Hp]: grid (query tile, batch, query head); K/V of kv head n // G.
    ``args`` as for :func:`_dkv_call`."""
    b, n, _, hp, tp, sp = dims
    qq, qk = cfg.block_q, cfg.block_k
    g = dims.g
    qt_spec = pl.BlockSpec((_SQ, qq, _SQ, hp), lambda i, bi, ni: (bi, i, ni, 0))
    kv_spec = pl.BlockSpec((_SQ, sp, _SQ, hp), lambda i, bi, ni: (bi, 0, ni // g, 0))
    row_spec = pl.BlockSpec((_SQ, _SQ, qq), lambda i, bi, ni: (bi, ni, i))
    q_tile = pl.BlockSpec((_SQ, qq), lambda i, bi, ni: (bi, i))
    k_all = pl.BlockSpec((_SQ, sp), lambda i, bi, ni: (bi, 0))
    return pl.pallas_call(
        functools.partial(_dq_kernel, block_k=qk, **static),
        grid=(tp // qq, b, n),
        in_specs=[pl.BlockSpec((_SQ, _SQ, 4), lambda i, bi, ni: (bi, i, 0)),
                  qt_spec, kv_spec, kv_spec, qt_spec, row_spec, row_spec, q_tile, k_all, q_tile, k_all],
        out_specs=qt_spec,
        out_shape=jax.ShapeDtypeStruct((b, tp, n, hp), jnp.float32),
        compiler_params=_compiler_params(cfg),
        interpret=interpret,
        name="lcjax_flash_bwd_dq",
    )(bnd, *args)


def flash_backward(q, k, v, out, lse, dout, q_pos, k_pos, q_seg, k_seg, *, causal=True, window=None,
                   scale=None, block_q=None, block_k=None, interpret=None, configs=None):
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
    scale = h ** -0.5 if scale is None else float(scale)
    cfgs = pass_configs(q.dtype, h, t, s_len, block_q, block_k, configs=configs)
    kv_cfg, dq_cfg = cfgs["dkv"], cfgs["dq"]
    # Pad both lengths to a multiple of every tile of the two kernels (all powers of two).
    dims = _Dims(b, n, kh, _head_dim(h), tiling.round_up(t, max(kv_cfg.block_q, dq_cfg.block_q)),
                 tiling.round_up(s_len, max(kv_cfg.block_k, dq_cfg.block_k)))

    q_, k_, v_, qp_, kp_, qs_, ks_ = _pad_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, dims.hp, dims.tp,
                                                 dims.sp)
    do_, lse_, dl_ = _bwd_rows(out, lse, dout, q.dtype, dims)
    args = (q_, k_, v_, do_, lse_, dl_, qp_, kp_, qs_, ks_)
    static = dict(causal=causal, window=window, scale=scale, t_len=t, s_len=s_len,
                  precision=_precision(q.dtype))
    interpret = resolve_interpret(interpret)
    bounds = functools.partial(tiling.bounds, qp_, qs_, kp_, ks_, t_len=t, s_len=s_len, causal=causal,
                               window=window)
    dk, dv = _dkv_call(bounds(tile_q=kv_cfg.block_q, tile_k=kv_cfg.block_k, by_key=True), args, dims,
                       kv_cfg, static, interpret)
    dq = _dq_call(bounds(tile_q=dq_cfg.block_q, tile_k=dq_cfg.block_k), args, dims, dq_cfg, static, interpret)
    return dq[:, :t, :, :h], dk[:, :s_len, :, :h], dv[:, :s_len, :, :h]
