"""The public attention entry on global (sharded) arrays, usable outside the model.

It wraps the per-shard ring (lcjax.parallel.ring) in its own ``shard_map``: the batch is split over
``data``, the tokens over ``sequence`` (in the layout's order), the heads over ``model``.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from lcjax.ops.layout import check_divisible
from lcjax.parallel.ring import ring_attention
from lcjax.sharding.mesh import AXES, make_mesh

IMPLS = ("local", "ring")
KERNELS = ("xla",)


def _check(q, k, mesh, impl, kernel):
    b, t, n, _ = q.shape
    kh = k.shape[2]
    if impl not in IMPLS:
        raise ValueError(f"attention.impl {impl!r} must be one of {', '.join(IMPLS)} (others not built yet)")
    if kernel not in KERNELS:
        raise ValueError(f"attention.kernel {kernel!r} must be one of {', '.join(KERNELS)}")
    if n % kh:
        raise ValueError(f"query heads {n} must be divisible by kv heads {kh} (GQA)")
    dp, sp, tp = (mesh.shape[a] for a in AXES)
    if impl == "local" and sp > 1:
        raise ValueError(f"attention.impl 'local' needs a sequence axis of size 1, got {sp}")
    if b % dp:
        raise ValueError(f"batch {b} must be divisible by the data axis size {dp}")
    if n % tp or kh % tp:
        raise ValueError(f"query heads {n} and kv heads {kh} must be divisible by the model axis size {tp}")


def attention(q, k, v, *, positions, segment_ids=None, causal=True, window=None, scale=None, mesh=None,
              impl="ring", layout="zigzag", kernel="xla", ulysses_size=None, block_q=512, block_k=512):
    """Attention of q to k, v over a device mesh; arrays in ``layout`` token order.

    Args:
      q: [B, T, N, H]; k, v: [B, T, K, H] (GQA: query head n uses kv head n // (N/K)).
      positions: int32 [B, T] original token positions; segment_ids: optional int32 [B, T] document ids.
        Key j is visible to query i when (causal ⇒ pos_j ≤ pos_i), (window W ⇒ pos_i − pos_j < W) and
        (segments ⇒ seg_j = seg_i).
      scale: score scale (default 1/√H).
      mesh: a mesh with axes (data, sequence, model); None puts every device on ``sequence``.
      impl: "ring" (K/V travel around the ``sequence`` axis) or "local" (no sequence parallelism).
      layout: "zigzag", "striped" or "contiguous": how the T tokens are spread over ``sequence``.
      kernel: "xla" (blockwise jnp). ulysses_size: reserved for the Ulysses/hybrid impls (must be None).
    Returns:
      [B, T, N, H] in q's dtype and the same token order.
    Raises:
      ValueError naming the argument and the rule (unknown impl/kernel/layout, sizes the mesh cannot
      split, window without causal).
    """
    mesh = make_mesh(1, len(jax.devices()), 1) if mesh is None else mesh
    _check(q, k, mesh, impl, kernel)
    if ulysses_size is not None:
        raise ValueError("ulysses_size must be None: the Ulysses impls are not built yet")
    if window is not None and not causal:
        raise ValueError("window requires causal attention")
    sp = mesh.shape["sequence"]
    check_divisible(q.shape[1], layout, sp)
    if segment_ids is None:
        segment_ids = jax.numpy.zeros_like(positions)
    tokens, heads = P("data", "sequence"), P("data", "sequence", "model", None)

    def local(q, k, v, pos, seg):
        return ring_attention(q, k, v, pos, seg, axis_name="sequence" if sp > 1 else None, layout=layout,
                              causal=causal, window=window, scale=scale, block_q=block_q, block_k=block_k)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, tokens, tokens), out_specs=heads)
    return fn(q, k, v, positions, segment_ids)
