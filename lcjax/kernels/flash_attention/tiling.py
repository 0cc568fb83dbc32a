"""Which key tiles a query tile can see, decided in XLA from the tiles' position and segment ranges.

The flash kernels loop only over the tiles that may hold a visible (query, key) pair, and evaluate the
mask only on tiles where some pair may be hidden. Both facts come from per-tile ranges (min/max of
positions and segment ids), computed here outside the kernels on [B, n_tiles] arrays — O(T/tile) work,
nothing next to the attention itself — and handed to the kernels as loop bounds (the "start/end" of
tokamax's and FlashAttention's block-sparse loops, here for any positions and segment ids):

- ``maybe[i, j]``: some query of tile i may see some key of tile j (a necessary condition from the
  ranges: segment ranges overlap; causal ⇒ min key position ≤ max query position; window W ⇒ max key
  position > min query position − W). False means certainly no visible pair.
- ``full[i, j]``: every query of tile i sees every key of tile j (a sufficient condition: both tiles
  hold one and the same segment id, causal ⇒ max key position ≤ min query position, window ⇒ max query
  position − min key position < W, and neither tile holds padding).

Per row i the bounds are ``lo ≤ flo ≤ fhi ≤ hi``: tiles outside [lo, hi) are never visible; tiles in
[flo, fhi) are all ``full`` (a plain matmul + online softmax); tiles in [lo, flo) and [fhi, hi) are
computed with the exact mask. Tiles inside [lo, hi) that are not visible at all (non-monotonic
positions, interleaved segments) are still masked exactly: the bounds are conservative, never wrong.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

INT_MIN, INT_MAX = jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max


class TileRanges(NamedTuple):
    """Per-tile statistics, each int32 or bool [B, n_tiles], over the tile's unpadded tokens."""

    pos_min: jnp.ndarray
    pos_max: jnp.ndarray
    seg_min: jnp.ndarray
    seg_max: jnp.ndarray
    any_valid: jnp.ndarray  # the tile holds at least one real (unpadded) token
    all_valid: jnp.ndarray  # the tile holds no padding


def tile_ranges(positions, segment_ids, tile: int, length: int) -> TileRanges:
    """Ranges of ``positions``/``segment_ids`` (int32 [B, L], L a multiple of ``tile``) per tile of
    ``tile`` tokens; tokens at index ≥ ``length`` are padding and left out. Raises ValueError when L is
    not a multiple of ``tile``."""
    b, padded = positions.shape
    if padded % tile:
        raise ValueError(f"length {padded} must be a multiple of the tile {tile}")
    n = padded // tile
    valid = (jnp.arange(padded, dtype=jnp.int32) < length).reshape(1, n, tile)
    pos, seg = positions.reshape(b, n, tile), segment_ids.reshape(b, n, tile)
    lo = lambda x: jnp.min(jnp.where(valid, x, INT_MAX), axis=-1)
    hi = lambda x: jnp.max(jnp.where(valid, x, INT_MIN), axis=-1)
    any_valid = jnp.broadcast_to(jnp.any(valid, axis=-1), (b, n))
    all_valid = jnp.broadcast_to(jnp.all(valid, axis=-1), (b, n))
    return TileRanges(lo(pos), hi(pos), lo(seg), hi(seg), any_valid, all_valid)


def tile_visibility(q: TileRanges, k: TileRanges, *, causal: bool, window: int | None):
    """(maybe, full), bool [B, n_q_tiles, n_k_tiles] (see the module docstring); full implies maybe."""
    qc = lambda x: x[:, :, None]
    kc = lambda x: x[:, None, :]
    maybe = qc(q.any_valid) & kc(k.any_valid)
    maybe &= (kc(k.seg_min) <= qc(q.seg_max)) & (kc(k.seg_max) >= qc(q.seg_min))
    one_segment = ((qc(q.seg_min) == qc(q.seg_max)) & (kc(k.seg_min) == kc(k.seg_max))
                   & (qc(q.seg_min) == kc(k.seg_min)))
    full = qc(q.all_valid) & kc(k.all_valid) & one_segment
    if causal:
        maybe &= kc(k.pos_min) <= qc(q.pos_max)
        full &= kc(k.pos_max) <= qc(q.pos_min)
    if window is not None:
        maybe &= kc(k.pos_max) > qc(q.pos_min) - window
        full &= qc(q.pos_max) - kc(k.pos_min) < window
    return maybe, full & maybe


def loop_bounds(maybe, full):
    """int32 [B, rows, 4] = (lo, flo, fhi, hi) per row of the [B, rows, cols] tile matrices.

    lo/hi: the first and one past the last ``maybe`` column (0, 0 for a row that sees nothing);
    [flo, fhi): the first run of consecutive ``full`` columns (empty, at hi, when there is none).
    """
    cols = maybe.shape[-1]
    idx = jnp.arange(cols, dtype=jnp.int32)
    first = lambda m: jnp.argmax(m, axis=-1).astype(jnp.int32)
    any_maybe, any_full = jnp.any(maybe, axis=-1), jnp.any(full, axis=-1)
    lo = jnp.where(any_maybe, first(maybe), 0)
    hi = jnp.where(any_maybe, cols - first(maybe[..., ::-1]), 0)
    flo = jnp.where(any_full, first(full), hi)
    gap = ~full & (idx >= flo[..., None])  # first column at or after flo that is not full
    fhi = jnp.where(any_full, jnp.where(jnp.any(gap, axis=-1), first(gap), cols), hi)
    return jnp.stack([lo, flo, jnp.minimum(fhi, hi), hi], axis=-1)


def bounds(q_pos, q_seg, k_pos, k_seg, *, tile_q: int, tile_k: int, t_len: int, s_len: int, causal: bool,
           window: int | None, by_key: bool = False):
    """Loop bounds for a kernel whose programs own query tiles (``by_key=False``: int32 [B, n_q, 4] over
    key tiles) or key tiles (``by_key=True``: int32 [B, n_k, 4] over query tiles).

    q_pos, q_seg: int32 [B, Tp]; k_pos, k_seg: int32 [B, Sp] (padded to multiples of the tiles; the first
    ``t_len``/``s_len`` tokens are real).
    """
    qr = tile_ranges(q_pos, q_seg, tile_q, t_len)
    kr = tile_ranges(k_pos, k_seg, tile_k, s_len)
    maybe, full = tile_visibility(qr, kr, causal=causal, window=window)
    if by_key:
        maybe, full = jnp.swapaxes(maybe, 1, 2), jnp.swapaxes(full, 1, 2)
    return loop_bounds(maybe, full)


NEG_INF = float("-inf")
LOG2E = 1.4426950408889634  # log2(e): the kernels' softmax runs in base 2 (exp2)


def round_up(x: int, m: int) -> int:
    """The least multiple of ``m`` that is >= ``x`` (padded lengths of the Pallas kernels)."""
    return -(-x // m) * m


def pad_to(x, axis: int, size: int, mode: str = "constant", value=0):
    """``x`` padded at the end of ``axis`` up to ``size`` with ``value`` (``mode`` "edge": repeating the
    last entry); a no-op when it already has that size."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    if mode == "edge":
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths, constant_values=value)


def lse2(lse):
    """float32 lse·log2(e) for the backward kernels' exp2, with +inf where lse = −inf (so every probability
    of a row that sees nothing is 0)."""
    lse = lse.astype(jnp.float32)
    return jnp.where(lse == NEG_INF, jnp.inf, lse * LOG2E)
