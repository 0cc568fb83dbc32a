"""Fully sharded data parallelism (FSDP / ZeRO-3) inside ``shard_map`` (per-shard code).

Rajbhandari et al. 2020, "ZeRO" (arXiv:1910.02054), §5 (stage 3): every parameter is split over the
data-parallel devices (here ``data`` × ``sequence``: both see different tokens with the same weights) and
all-gathered just before use, layer by layer inside the scanned layer body, so only one layer's full
weights are alive at a time. Autodiff transposes the tiled ``all_gather`` into a ``psum_scatter``: each
device receives the sum of its own slice of the gradient (a reduce-scatter, never an all-reduce then a
slice).
"""

from __future__ import annotations

from jax import lax


def gather(w, axes: tuple[str, ...], dim: int):
    """The full parameter from this device's shard: ``w`` [..., X/fs, ...] -> [..., X, ...] along ``dim``.

    ``axes``: the mesh axes the parameter is sharded over (their product fs); empty means not sharded
    and ``w`` is returned as is. Cast ``w`` to the compute dtype first so the payload is that dtype.
    """
    return lax.all_gather(w, axes, axis=dim, tiled=True) if axes else w


def reduce_scatter(g, axes: tuple[str, ...], dim: int):
    """Sum ``g`` over ``axes`` and keep this device's slice along ``dim`` (ZeRO-1/2 gradient sharding):
    [..., X, ...] -> [..., X/fs, ...]."""
    return lax.psum_scatter(g, axes, scatter_dimension=dim, tiled=True) if axes else g
