"""The papers' closed forms, kept verbatim for the documented checks (docs/planner.md) and tests.

Symbols as in each paper, mapped in docs/reference/formulas.md §0/§1. These describe GPT-style
blocks (LayerNorm, GeLU MLP of width 4h, dropout) and Li et al.'s Adam-in-Megatron weight accounting;
the lcjax-specific estimates live in lcjax.plan.memory.
"""

from __future__ import annotations

from fractions import Fraction


def li_mlp_mem(B: int, L: int, H: int, N: int, mode: str) -> int:
    """Li et al. 2021 (arXiv:2105.13120) Table 1, MLP block memory in *elements*.

    TP: 32H²/N + 4BLH/N + BLH; SP: 32H² + 5BLH/N (B batch, L sequence, H hidden, N devices).
    """
    if mode == "tp":
        return 32 * H * H // N + 4 * B * L * H // N + B * L * H
    if mode == "sp":
        return 32 * H * H + 5 * B * L * H // N
    raise ValueError(f"mode {mode!r} must be 'tp' or 'sp'")


def li_attn_mem(B: int, L: int, H: int, A: int, Z: int, N: int, mode: str) -> int:
    """Li et al. 2021 Table 2, attention block memory in *elements* (A head size, Z heads).

    TP: 16AZH/N + 4BLZA/N + BZL²/N + BLH; SP: 16AZH + 4BZLA/N + BZL²/N + BLH/N.
    """
    if mode == "tp":
        return 16 * A * Z * H // N + 4 * B * L * Z * A // N + B * Z * L * L // N + B * L * H
    if mode == "sp":
        return 16 * A * Z * H + 4 * B * Z * L * A // N + B * Z * L * L // N + B * L * H // N
    raise ValueError(f"mode {mode!r} must be 'tp' or 'sp'")


def crossover_T(P_block: int, k: float, c: float, D: int, B: int = 1) -> Fraction:
    """Sequence length above which SP stores less than TP for one block (formulas §1.5, derived from Li et
    al. Tables 1–2): SP wins iff c·B·T·D > k·P_block, i.e. T > k·P_block / (c·B·D).

    P_block: the block's parameters; k: stored copies per parameter in activation-element units (Li: 4 =
    weight, grad, Adam m, v); c: B×T×D tensors plain TP replicates (Li: 1, the block output). The device
    count cancels. Returns an exact Fraction of tokens.
    """
    return Fraction(k) * P_block / (Fraction(c) * B * D)


def korthikanti_act_per_layer(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                              selective: bool = False) -> Fraction:
    """Korthikanti et al. 2022 (arXiv:2205.05198) Table 2: activation bytes per GPT layer (16-bit).

    no parallelism sbh(34 + 5as/h) (eq. 1); TP sbh(10 + 24/t + 5as/(ht)) (eq. 2); TP+SP
    sbh(34/t + 5as/(ht)) (eq. 4); ``selective`` drops the 5as/h score term (eq. 6). Exact Fraction.
    """
    score = 0 if selective else Fraction(5 * a * s, h * t)
    body = Fraction(34, t) if (sp or t == 1) else 10 + Fraction(24, t)
    return s * b * h * (body + score)


def korthikanti_full_recompute(s: int, b: int, h: int) -> int:
    """Korthikanti et al. 2022 Table 2, full recomputation: 2sbh bytes per layer (the layer input)."""
    return 2 * s * b * h


def ring_min_block(peak_flops: float, link_bytes_per_s: float, *, w: int = 4, bytes_per: int = 2,
                   d_kv_over_D: float = 1.0) -> float:
    """Tokens per device above which a ring step's K/V transfer hides under its attention compute.

    Liu et al. 2023 (arXiv:2310.01889) §3: c ≥ F/B (w = 4, dense). Generalised (formulas §2.4):
    c ≥ (2·bytes/w)·(F/B)·(d_kv/D); w = 2 for balanced causal (striped/zigzag).
    """
    return (2 * bytes_per / w) * peak_flops / link_bytes_per_s * d_kv_over_D


def contiguous_causal_efficiency(P: int) -> Fraction:
    """Share of ideal causal work a contiguous-layout ring achieves: P/(2P−1) (formulas §6; 8 → 8/15)."""
    return Fraction(P, 2 * P - 1)
