"""Rotary position embedding (RoPE; Su et al. 2021, "RoFormer", arXiv:2104.09864, eq. 34).

Pairing follows Hugging Face's LLaMA ("rotate half"): dimension i is rotated together with i + H/2 by
the angle pos · θ_i, θ_i = base^(−2i/H), i < H/2.

Angles are exact far out: a float32 product pos · θ is wrong by up to 3e-2 rad at position 1M
(../shared/notes). We split pos = hi · C + lo (C = 1024), take cos/sin of hi·C·θ and lo·θ from small
float64-built tables, and combine them with the angle-addition formulas in float32.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

SPLIT = 1024


def inv_frequencies(head_dim: int, base: float) -> np.ndarray:
    """θ_i = base^(−2i/H) for i < H/2, float64 [H/2]."""
    return base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def rope_tables(max_position: int, head_dim: int, base: float) -> dict[str, np.ndarray]:
    """cos/sin tables for the split angle, float32: ``hi`` [⌈P/C⌉, H/2] and ``lo`` [C, H/2].

    ``max_position`` (P) bounds the positions the tables serve (exclusive).
    """
    inv = inv_frequencies(head_dim, base)
    hi = np.arange(-(-max_position // SPLIT), dtype=np.float64)[:, None] * SPLIT * inv
    lo = np.arange(SPLIT, dtype=np.float64)[:, None] * inv
    f32 = lambda a: a.astype(np.float32)
    return {"cos_hi": f32(np.cos(hi)), "sin_hi": f32(np.sin(hi)),
            "cos_lo": f32(np.cos(lo)), "sin_lo": f32(np.sin(lo))}


def cos_sin(positions, tables):
    """cos and sin of pos · θ, float32 [B, T, H/2], for int32 positions [B, T]."""
    hi, lo = positions // SPLIT, positions % SPLIT
    t = {k: jnp.asarray(v) for k, v in tables.items()}
    ch, sh = t["cos_hi"][hi], t["sin_hi"][hi]
    cl, sl = t["cos_lo"][lo], t["sin_lo"][lo]
    return ch * cl - sh * sl, sh * cl + ch * sl


def apply_rope(x, cos, sin):
    """Rotate x [B, T, heads, H] by the angles (cos, sin [B, T, H/2]); returns x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
