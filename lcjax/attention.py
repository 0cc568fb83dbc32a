"""The public attention entry on global (sharded) arrays, usable outside the model.

It wraps the per-shard ring (lcjax.parallel.ring) in its own ``shard_map``: the batch is split over
``data``, the tokens over ``sequence`` (in the layout's order), the heads over ``model``.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from lcjax.kernels.flash_attention import cudnn
from lcjax.kernels.flash_attention.api import KERNELS, is_pallas
from lcjax.ops.layout import check_divisible, unpermute
from lcjax.parallel.ring import is_ordered
from lcjax.parallel.sequence import IMPLS, sequence_parallel
from lcjax.parallel.spec import AttentionSpec
from lcjax.parallel.ulysses import check_heads
from lcjax.sharding.mesh import AXES, make_mesh


def _check(q, k, positions, mesh, impl, kernel, ulysses_size):
    b, t, n, _ = q.shape
    kh = k.shape[2]
    if impl not in IMPLS:
        raise ValueError(f"attention.impl {impl!r} must be one of {', '.join(IMPLS)}")
    if kernel not in KERNELS:
        raise ValueError(f"attention.kernel {kernel!r} must be one of {', '.join(KERNELS)}")
    if positions.shape != (b, t) or positions.dtype != jax.numpy.int32:
        raise ValueError(f"positions must be int32 [B, T] = {(b, t)}, got {positions.dtype} {positions.shape}")
    if n % kh:
        raise ValueError(f"query heads {n} must be divisible by kv heads {kh} (GQA)")
    dp, sp, tp = (mesh.shape[a] for a in AXES)
    if impl == "local" and sp > 1:
        raise ValueError(f"attention.impl 'local' needs a sequence axis of size 1, got {sp}")
    if b % dp:
        raise ValueError(f"batch {b} must be divisible by the data axis size {dp}")
    if n % tp or kh % tp:
        raise ValueError(f"query heads {n} and kv heads {kh} must be divisible by the model axis size {tp}")
    if ulysses_size is not None and impl not in ("hybrid", "allgather"):
        raise ValueError(f"ulysses_size is only used by impl 'hybrid' and 'allgather' (impl is {impl!r}): the "
                         f"Ulysses group inside which a ring or an all-gather runs across the groups")
    if (impl == "hybrid" or ulysses_size is not None) and (ulysses_size is None or ulysses_size < 1
                                                           or sp % ulysses_size):
        raise ValueError(f"ulysses_size {ulysses_size} must divide the sequence axis size {sp} for {impl!r}")
    if impl in ("ulysses", "hybrid") or ulysses_size is not None:
        check_heads(n // tp, kh // tp, sp if impl == "ulysses" else ulysses_size)


def _check_window(window, causal: bool) -> None:
    if window is not None and window < 1:
        raise ValueError(f"window {window} must be >= 1")
    if window is not None and not causal:
        raise ValueError("window requires causal attention")


def _check_cudnn(q, k, v, positions, segment_ids, impl, layout, shards, window, ulysses_size) -> None:
    """What the cuDNN kernel cannot express, refused before anything runs (ValueError, one line): its
    dtypes and head dims, the impl/layout/window (cudnn.layout_refusal) and, for concrete arrays, the
    positions and segment ids in their original order (cudnn.positions_refusal; traced ones are checked
    per tile pair at run time, where a violation gives NaN)."""
    cudnn.check_arrays(q, k, v)
    reason = cudnn.layout_refusal(impl, layout, shards, window, ulysses_size)
    if reason is None:
        try:
            pos, seg = (unpermute(np.asarray(x), layout, shards) for x in (positions, segment_ids))
        except (ValueError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            return  # traced, or an order only the caller knows
        reason = cudnn.positions_refusal(pos, seg)
    if reason:
        raise ValueError(reason)


def _ordered(positions, segment_ids, impl, layout, shards, window) -> bool:
    """May the ring send only what a window needs (lcjax.parallel.ring.kv_sends)? Only for concrete
    positions that :func:`is_ordered` accepts in their original order (traced ones: no, every block is
    sent; exact either way)."""
    if window is None or impl not in ("ring", "hybrid") or layout not in ("contiguous", "zigzag"):
        return False
    try:
        pos, seg = (unpermute(np.asarray(x), layout, shards) for x in (positions, segment_ids))
    except (ValueError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return False  # traced, or a layout whose order only the caller knows
    return is_ordered(pos, seg)


PADDABLE = ("contiguous", "balanced")  # layouts whose order stays valid with tokens appended at the end


def pad_tokens(q, k, v, positions, segment_ids, extra: int):
    """q, k, v ([B, T, ·, H]), positions, segment_ids ([B, T]) with ``extra`` tokens appended that no real
    token sees and that see no real token: zeros, positions 0…extra−1, a segment id above every real one."""
    jnp = jax.numpy
    pad = lambda x: jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))
    b = positions.shape[0]
    fill_pos = jnp.broadcast_to(jnp.arange(extra, dtype=positions.dtype), (b, extra))
    above = (jnp.max(segment_ids, axis=1, keepdims=True) + 1).astype(segment_ids.dtype)
    fill_seg = jnp.broadcast_to(above, (b, extra))
    return (pad(q), pad(k), pad(v), jnp.concatenate([positions, fill_pos], axis=1),
            jnp.concatenate([segment_ids, fill_seg], axis=1))


def attention(q, k, v, *, positions, segment_ids=None, causal=True, window=None, scale=None, mesh=None,
              impl="ring", layout="zigzag", kernel="xla", ulysses_size=None, block_q=None, block_k=None,
              dkv_dtype="float32"):
    """Attention of q to k, v over a device mesh; arrays in ``layout`` token order.

    Args:
      q: [B, T, N, H]; k, v: [B, T, K, H] (GQA: query head n uses kv head n // (N/K)).
      positions: int32 [B, T] original token positions; segment_ids: optional int32 [B, T] document ids.
        Key j is visible to query i when (causal ⇒ pos_j ≤ pos_i), (window W ⇒ pos_i − pos_j < W) and
        (segments ⇒ seg_j = seg_i).
      scale: score scale (default 1/√H).
      mesh: a mesh with axes (data, sequence, model); None puts every device on ``sequence``.
      impl: "ring" (K/V travel around the ``sequence`` axis), "ulysses" (all-to-all: heads ⇄ sequence),
        "hybrid" (Ulysses inside groups of ``ulysses_size`` shards, ring across groups), "allgather" (K/V of
        all shards gathered, Llama 3 style; any layout; with ``ulysses_size``, all-to-all inside groups of
        that many shards and the K/V gathered across the groups) or "local". Every impl and layout is exact for any
        positions and segment ids; a ring with a window sends only the blocks the window can reach when the
        (concrete) positions are ordered (lcjax.parallel.ring.kv_sends), every block otherwise.
      layout: "zigzag", "striped" or "contiguous": how the T tokens are spread over ``sequence``.
      kernel: "xla" (blockwise jnp), "pallas_triton" (Pallas Triton-backend kernels; interpret mode when not
        compiled for GPUs), "pallas" (the best verified Pallas kernel for GPUs: today "pallas_triton"),
        "pallas_mosaic" (Pallas Mosaic GPU kernels for H100/H200, bf16/f16, H a multiple of 64; opt-in) or
        "cudnn" (cuDNN fused attention per block; bf16/fp16, GPUs with cuDNN only, one contiguous range
        of positions per sequence and layouts/impls whose blocks it can mask: see
        lcjax.kernels.flash_attention.cudnn).
      block_q, block_k: None (default) = the kernel's own tiles (512 for xla, the tuned table for the Triton
        kernels, lcjax.kernels.flash_attention.triton_tiles); integers override them for every kernel.
    Returns:
      [B, T, N, H] in q's dtype and the same token order.
    Any T: in the contiguous and balanced layouts (natural or arbitrary order) a T that ``sequence`` does not
    divide is padded at the end with tokens that neither attend nor are attended (:func:`pad_tokens`) and the
    output sliced back; zigzag and striped need T divisible by 2·P and P (their orders are defined only then).
    Raises:
      ValueError naming the argument and the rule (unknown impl/kernel/layout, sizes the mesh cannot
      split — T for zigzag and striped, heads —, window without causal, what kernel "cudnn" cannot express).
    """
    mesh = make_mesh(1, len(jax.devices()), 1) if mesh is None else mesh
    _check(q, k, positions, mesh, impl, kernel, ulysses_size)
    _check_window(window, causal)
    sp = mesh.shape["sequence"]
    if segment_ids is None:
        segment_ids = jax.numpy.zeros_like(positions)
    t = q.shape[1]
    if t % sp and layout in PADDABLE:  # natural or arbitrary order: pad at the end, slice the pad off
        args = pad_tokens(q, k, v, positions, segment_ids, -t % sp)
        return attention(*args[:3], positions=args[3], segment_ids=args[4], causal=causal, window=window,
                         scale=scale, mesh=mesh, impl=impl, layout=layout, kernel=kernel,
                         ulysses_size=ulysses_size, block_q=block_q, block_k=block_k, dkv_dtype=dkv_dtype)[:, :t]
    check_divisible(t, layout, sp)
    if kernel == "cudnn":
        _check_cudnn(q, k, v, positions, segment_ids, impl, layout, sp, window, ulysses_size)
    ordered = _ordered(positions, segment_ids, impl, layout, sp, window)
    tokens, heads = P("data", "sequence"), P("data", "sequence", "model", None)

    spec = AttentionSpec(impl=impl, layout=layout, window=window, block_q=block_q, block_k=block_k, kernel=kernel,
                         dkv_dtype=dkv_dtype, ulysses_size=ulysses_size, causal=causal, scale=scale, ordered=ordered)
    local = lambda q, k, v, pos, seg: sequence_parallel(q, k, v, pos, seg, spec, axis_name="sequence")
    fn = jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, tokens, tokens), out_specs=heads,
                       check_vma=not is_pallas(kernel))  # Pallas in interpret mode needs check_vma off
    return fn(q, k, v, positions, segment_ids)
