"""Token layouts for sequence parallelism: zigzag, striped and contiguous.

A layout is a permutation of the T tokens of a sequence such that shard ``i`` of ``P`` (the ``sequence``
mesh axis) holds the ``i``-th contiguous slice of T/P tokens of the permuted array.

- ``contiguous``: the identity; shard i holds tokens [i·T/P, (i+1)·T/P).
- ``zigzag``: the sequence is cut into 2·P chunks; shard i holds chunks i and 2·P−1−i, so every shard gets
  the same amount of causal attention work (Brandon et al. 2023, "Striped Attention", discuss the
  imbalance; the zigzag form is the one used by ring-flash-attention and Megatron context parallelism).
- ``striped``: token t goes to shard t mod P (Brandon et al. 2023, arXiv:2311.09431, §3).
- ``balanced``: decided per window by the data loader from the documents it packed
  (lcjax.data.balance.balanced_permutation); the attention schedules treat it as an arbitrary order.
  Without a window to balance (generation, PassKey prompts) :func:`permutation` keeps the natural order.

For 16 tokens on 4 shards: zigzag gives 0 1 14 15 | 2 3 12 13 | 4 5 10 11 | 6 7 8 9; striped gives
0 4 8 12 | 1 5 9 13 | 2 6 10 14 | 3 7 11 15.

The functions work on numpy and JAX arrays alike (they only index with a static integer permutation).
"""

from __future__ import annotations

import numpy as np

from lcjax.choices import LAYOUTS  # noqa: F401  (re-exported: lcjax.ops.layout.LAYOUTS)


def check_divisible(length: int, layout: str, num_shards: int) -> None:
    """Raise ValueError unless ``length`` tokens can be laid out on ``num_shards`` shards.

    Zigzag needs T divisible by 2·P, striped, contiguous and balanced by P.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"attention.layout {layout!r} must be one of {', '.join(LAYOUTS)}")
    if num_shards < 1:
        raise ValueError(f"num_shards {num_shards} must be >= 1")
    unit = 2 * num_shards if layout == "zigzag" else num_shards
    if length % unit:
        raise ValueError(
            f"data.seq_len {length} must be divisible by "
            f"{'2 x ' if layout == 'zigzag' else ''}mesh.sequence = {unit} for the {layout} layout")


def permutation(length: int, layout: str, num_shards: int) -> np.ndarray:
    """Indices ``perm`` (int64 [T]) with ``permuted = x[perm]``: position k of the layout holds token perm[k].

    ``balanced`` has no fixed permutation (the loader computes one per window): the natural order here.
    Raises ValueError for an unknown layout or a length the layout cannot split evenly.
    """
    check_divisible(length, layout, num_shards)
    idx = np.arange(length)
    if layout in ("contiguous", "balanced") or num_shards == 1:
        return idx
    if layout == "striped":
        return idx.reshape(length // num_shards, num_shards).T.reshape(-1)
    if layout != "zigzag":
        raise ValueError(f"attention.layout {layout!r} has no fixed permutation")
    chunks = idx.reshape(2 * num_shards, length // (2 * num_shards))
    order = [c for i in range(num_shards) for c in (i, 2 * num_shards - 1 - i)]
    return chunks[order].reshape(-1)


def inverse_permutation(length: int, layout: str, num_shards: int) -> np.ndarray:
    """Indices ``inv`` with ``x == permuted[inv]`` (the inverse of :func:`permutation`)."""
    perm = permutation(length, layout, num_shards)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(length)
    return inv


def permute(x, layout: str, num_shards: int, axis: int = 1):
    """Reorder ``x`` along ``axis`` (default 1, the T axis of [B, T, ...]) from natural order into ``layout``.

    Works for numpy and JAX arrays. Raises ValueError when the axis length does not fit the layout.
    """
    perm = permutation(x.shape[axis], layout, num_shards)
    return x.take(perm, axis=axis) if isinstance(x, np.ndarray) else _take(x, perm, axis)


def unpermute(x, layout: str, num_shards: int, axis: int = 1):
    """Inverse of :func:`permute`: from ``layout`` order back to natural token order."""
    inv = inverse_permutation(x.shape[axis], layout, num_shards)
    return x.take(inv, axis=axis) if isinstance(x, np.ndarray) else _take(x, inv, axis)


def _take(x, idx, axis):
    import jax.numpy as jnp  # local: numpy callers (the data loader) never need JAX

    return jnp.take(x, jnp.asarray(idx), axis=axis)
