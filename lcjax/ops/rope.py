"""Rotary position embedding (RoPE; Su et al. 2021, "RoFormer", arXiv:2104.09864, eq. 34) and its
context-extension scalings.

Pairing follows Hugging Face's LLaMA ("rotate half"): dimension i is rotated together with i + H/2 by
the angle pos · θ_i, i < H/2. Unscaled, θ_i = b^(−2i/H) with b the base.

Scaling (``type``; s = ``factor``, L = ``original_max_position``, the pre-training context). Every type is a
change of the inverse frequencies θ_i (computed in float64), plus, for YaRN, a factor on cos and sin; each
matches transformers' ``modeling_rope_utils`` (v5) of the same name, see docs/rope.md:

- ``default``: θ_i = b^(−2i/H). Changing b alone is "ABF" (adjusted base frequency; Xiong et al. 2023,
  arXiv:2309.16039 §4.1: 10,000 → 500,000).
- ``linear``: position interpolation (Chen et al. 2023, arXiv:2306.15595 eq. 4), pos → pos/s, i.e. θ_i/s.
- ``ntk``: NTK-aware (bloc97 2023; YaRN Def. 1), static base change b' = b · s^(H/(H−2)).
- ``dynamic``: dynamic NTK (transformers "dynamic"), b' = b · (s·ℓ/L − (s − 1))^(H/(H−2)) with
  ℓ = max(P, L), P the tables' ``max_position`` (transformers uses the longest position of the batch + 1).
- ``yarn``: YaRN (Peng et al. 2023, arXiv:2309.00071 §3.2–3.4), "NTK-by-parts" plus attention temperature:
  correction dims d(n) = H·ln(L/(2πn)) / (2 ln b), low = ⌊d(β_fast)⌋, high = ⌈d(β_slow)⌉ clipped to
  [0, H−1]; ramp γ_i = clip((i − low)/(high − low), 0, 1); θ'_i = θ_i·(1 − γ_i) + (θ_i/s)·γ_i
  (fast pairs i < low keep θ_i, slow pairs i > high are interpolated); cos and sin are multiplied by
  ``attention_factor`` (default 0.1·ln s + 1, so attention logits scale by its square).
- ``llama3``: LLaMA 3.1's frequency bands (meta-llama/llama-models ``apply_scaling``): wavelength
  λ_i = 2π/θ_i; λ < L/``high_freq_factor``: θ_i; λ > L/``low_freq_factor``: θ_i/s; in between
  θ'_i = (1 − m)·θ_i/s + m·θ_i with m = (L/λ − low_freq_factor) / (high_freq_factor − low_freq_factor).

Angles are exact far out: a float32 product pos · θ is wrong by up to 3e-2 rad at position 1M
(float32's spacing at 1e6 is 6.25e-2, so rounding alone errs by up to 3.1e-2 for θ₀ = 1).
We split pos = hi · C + lo (C = 1024), take cos/sin of hi·C·θ and lo·θ from small
float64-built tables, and combine them with the angle-addition formulas in float32. The YaRN factor is
folded into the ``lo`` tables, so it scales the combined cos and sin once. Angles are never bf16.
"""

from __future__ import annotations

import math

import numpy as np
import jax.numpy as jnp

from lcjax.choices import ROPE_TYPES  # noqa: F401  (re-exported: lcjax.ops.rope.ROPE_TYPES)

SPLIT = 1024


def yarn_correction_range(head_dim: int, base: float, original_max_position: int, beta_fast: float = 32.0,
                          beta_slow: float = 1.0) -> tuple[int, int]:
    """YaRN's ramp bounds (low, high) over pair indices: pairs below ``low`` keep θ, above ``high`` get θ/s.

    d(n) = H·ln(L/(2πn)) / (2 ln b) is the pair index whose wavelength fits n times into L.
    """
    dim = lambda n: head_dim * math.log(original_max_position / (n * 2 * math.pi)) / (2 * math.log(base))
    return max(math.floor(dim(beta_fast)), 0), min(math.ceil(dim(beta_slow)), head_dim - 1)


def yarn_attention_factor(factor: float) -> float:
    """YaRN's default factor on cos and sin, √(1/t) = 0.1·ln s + 1 (1 when s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def scaled_frequencies(head_dim: int, base: float = 10000.0, *, type: str = "default", factor: float = 1.0,
                       original_max_position: int | None = None, beta_fast: float = 32.0,
                       beta_slow: float = 1.0, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                       attention_factor: float | None = None, max_position: int | None = None
                       ) -> tuple[np.ndarray, float]:
    """(θ' float64 [H/2], factor on cos and sin) of a RoPE scaling (module docstring).

    Raises ValueError for an unknown ``type`` or a missing ``original_max_position``.
    """
    s, big_l = float(factor), original_max_position
    exponent = head_dim / (head_dim - 2)
    if type in ("dynamic", "yarn", "llama3") and not big_l:
        raise ValueError(f"rope type {type!r} needs original_max_position")
    theta = inv_frequencies(head_dim, base)
    if type == "default":
        return theta, 1.0
    if type == "linear":
        return theta / s, 1.0
    if type == "ntk":
        return inv_frequencies(head_dim, base * s ** exponent), 1.0
    if type == "dynamic":
        ell = max(max_position or 0, big_l)
        return inv_frequencies(head_dim, base * (s * ell / big_l - (s - 1)) ** exponent), 1.0
    if type == "yarn":
        low, high = yarn_correction_range(head_dim, base, big_l, beta_fast, beta_slow)
        ramp = np.clip((np.arange(head_dim // 2) - low) / ((high - low) or 0.001), 0, 1)  # 0.001: as HF
        mscale = yarn_attention_factor(s) if attention_factor is None else float(attention_factor)
        return theta * (1 - ramp) + theta / s * ramp, mscale
    if type == "llama3":
        wavelength = 2 * np.pi / theta
        smooth = (big_l / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        middle = (1 - smooth) * theta / s + smooth * theta
        out = np.where(wavelength > big_l / low_freq_factor, theta / s, theta)
        return np.where((wavelength >= big_l / high_freq_factor) & (wavelength <= big_l / low_freq_factor),
                        middle, out), 1.0
    raise ValueError(f"rope type {type!r} must be one of {', '.join(ROPE_TYPES)}")


def inv_frequencies(head_dim: int, base: float) -> np.ndarray:
    """θ_i = base^(−2i/H) for i < H/2, float64 [H/2] (no scaling)."""
    return base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def rope_tables(max_position: int, head_dim: int, base: float = 10000.0, **scaling) -> dict[str, np.ndarray]:
    """cos/sin tables for the split angle, float32: ``hi`` [⌈P/C⌉, H/2] and ``lo`` [C, H/2].

    ``max_position`` (P) bounds the positions the tables serve (exclusive). ``scaling``: the keyword
    arguments of :func:`scaled_frequencies` (``type``, ``factor``, ...; the fields of lcjax's RopeConfig).
    """
    inv, mscale = scaled_frequencies(head_dim, base, max_position=max_position, **scaling)
    hi = np.arange(-(-max_position // SPLIT), dtype=np.float64)[:, None] * SPLIT * inv
    lo = np.arange(SPLIT, dtype=np.float64)[:, None] * inv
    f32 = lambda a: a.astype(np.float32)
    return {"cos_hi": f32(np.cos(hi)), "sin_hi": f32(np.sin(hi)),
            "cos_lo": f32(mscale * np.cos(lo)), "sin_lo": f32(mscale * np.sin(lo))}


def cos_sin(positions, tables):
    """cos and sin of pos · θ (times the YaRN factor), float32 [B, T, H/2], for int32 positions [B, T]."""
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
