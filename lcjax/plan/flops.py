"""Training FLOPs per token (forward + backward, matmuls only, a multiply-add = 2 FLOPs).

Sources: PaLM (Chowdhery et al. 2022, arXiv:2204.02311, App. B): 6N + 12·L·n_h·d_h·T, no causal
discount (torchtitan's ``get_num_flop_per_token``); causal-honest: 6N + 6·L·n_h·d_h·T, keys per query
averaged as T/2 (formulas §3.3). N = non-embedding parameters (head kept). Hardware FLOPs add what is
computed twice: flash attention's backward recomputes the scores QKᵀ (FlashAttention-2, arXiv:2307.08691
§4: backward ≈ 2.5× forward), and rematerialisation runs each layer's forward again: all of it under
``layer`` remat, all but the attention (whose ring output and lse are saved) under ``full``.
"""

from __future__ import annotations

from lcjax.plan.shapes import Shape, non_embedding_params

REMAT_POLICIES = ("none", "layer", "full")


def attention_flops(s: Shape, T: int) -> int:
    """12·L·n_h·d_h·T: the dense QKᵀ and PV matmuls of forward + backward per token (PaLM App. B)."""
    return 12 * s.L * s.N * s.H * T


def flops_per_token(s: Shape, T: int, *, causal: bool) -> int:
    """Model FLOPs per trained token at sequence length T: 6N + 12·L·n_h·d_h·T (PaLM) or, with
    ``causal``, 6N + 6·L·n_h·d_h·T. LLaMA-2-7B at 32k: 91,183,669,248 / 65,413,865,472."""
    attn = attention_flops(s, T)
    return 6 * non_embedding_params(s) + (attn // 2 if causal else attn)


def hardware_flops_per_token(s: Shape, T: int, remat: str = "none") -> int:
    """FLOPs a device actually executes per token (causal): model FLOPs + the flash backward's recomputed
    QKᵀ (L·n_h·d_h·T) + one more forward of the matmuls (2N) under ``full`` remat, and of the attention too
    (2·L·n_h·d_h·T) under ``layer`` remat."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} must be one of {', '.join(REMAT_POLICIES)}")
    extra = s.L * s.N * s.H * T
    if remat in ("layer", "full"):
        extra += 2 * non_embedding_params(s)
    if remat == "layer":
        extra += 2 * s.L * s.N * s.H * T
    return flops_per_token(s, T, causal=True) + extra


def attention_forward_flops_per_token(s: Shape, T: int) -> int:
    """One layer's causal attention forward (QKᵀ and PV, T/2 keys on average): 2·n_h·d_h·T per token."""
    return 2 * s.N * s.H * T
