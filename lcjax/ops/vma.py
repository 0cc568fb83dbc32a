"""Varying-manual-axes helpers for code that may run inside a ``jax.shard_map`` with ``check_vma=True``.

Under ``check_vma`` a value built from constants (``jnp.zeros``) is *invariant* over the mesh axes, while
one derived from a sharded input is *varying*; ``scan``/``cond`` carries must agree. Kernels take plain
arrays and no axis names, so they read the varying axes off their inputs' types. Outside ``shard_map``
(or with ``check_vma=False``) these are no-ops.
"""

from __future__ import annotations

import jax
from jax import lax


def varying_axes(x) -> frozenset:
    """The mesh axes over which ``x`` varies (empty outside ``shard_map`` or without check_vma)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # newer JAX
    if vma is None:
        mat = getattr(aval, "manual_axis_type", None)  # jax 0.10
        vma = getattr(mat, "varying", frozenset())
    return frozenset(vma)


def vary_like(x, *refs):
    """``x`` cast to vary over every axis any of ``refs`` varies over (no data movement)."""
    missing = frozenset().union(*(varying_axes(r) for r in refs)) - varying_axes(x)
    return lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def vary_tree_like(tree, *refs):
    """:func:`vary_like` applied to every leaf of ``tree``."""
    return jax.tree.map(lambda leaf: vary_like(leaf, *refs), tree)
