"""Fully sharded data parallelism (FSDP / ZeRO-3) inside ``shard_map`` (per-shard code).

Rajbhandari et al. 2020, "ZeRO" (arXiv:1910.02054), §5 (stage 3): every parameter is split over the
data-parallel devices (here ``data`` × ``sequence``: both see different tokens with the same weights) and
all-gathered just before use, layer by layer inside the scanned layer body, so only one layer's full
weights are alive at a time. Autodiff transposes the tiled ``all_gather`` into a ``psum_scatter``: each
device receives the sum of its own slice of the gradient (a reduce-scatter, never an all-reduce then a
slice). Without FSDP or ZeRO, :func:`sum_grads_in_backward` puts the plain data-parallel all-reduce of
each layer's gradients at the same place, inside the backward's layer loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _sum_grad(w, axes: tuple[str, ...], wire_dtype: str):
    return w


def _sum_grad_fwd(w, axes, wire_dtype):
    return w, None


def _sum_grad_bwd(axes, wire_dtype, _, g):
    return (lax.psum(g.astype(jnp.dtype(wire_dtype)), axes).astype(g.dtype),)


_sum_grad.defvjp(_sum_grad_fwd, _sum_grad_bwd)


def sum_grads_in_backward(tree, axes_per_leaf: tuple[tuple[str, ...], ...], wire_dtype: str = "float32"):
    """``tree`` unchanged in the forward; in the backward each leaf's gradient is summed (``psum``) over its
    entry of ``axes_per_leaf`` (one tuple of mesh axes per leaf, in ``jax.tree.leaves`` order; () or an empty
    ``axes_per_leaf``: left alone) in ``wire_dtype`` and cast back.

    Called on one layer's weights inside the scanned layer body, it issues that layer's data/sequence
    gradient all-reduce inside the backward's layer loop, as soon as the layer's gradients exist, where XLA
    can run it under the next layer's backward — instead of one all-reduce of every layer's gradients after
    the loop. Only for a ``shard_map`` with ``check_vma=False`` (with it, autodiff places the sums itself).
    """
    if not axes_per_leaf:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    if len(leaves) != len(axes_per_leaf):
        raise ValueError(f"sum_grads_in_backward: {len(leaves)} leaves but {len(axes_per_leaf)} axes entries")
    return treedef.unflatten([_sum_grad(w, tuple(a), wire_dtype) if a else w for w, a in zip(leaves, axes_per_leaf)])
