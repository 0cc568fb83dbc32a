"""Model shape and parameter counts of the lcjax LLaMA decoder, in plain integers (no JAX).

Shape letters (docs/design.md): L layers, D model width, N query heads, K kv heads, H = D/N head dim,
F MLP width, V vocabulary (true), Vp vocabulary padded to a multiple of 128 (what lcjax stores).
Counts follow docs/reference/formulas.md §0 (LLaMA-2-7B: 6,738,415,616 parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

from lcjax.config import ModelConfig, padded_vocab


@dataclass(frozen=True)
class Shape:
    """A LLaMA decoder's shape. ``tied``: the output head reuses the embedding."""

    L: int
    D: int
    N: int
    K: int
    F: int
    V: int
    tied: bool = False

    @property
    def H(self) -> int:
        """Head dim D/N."""
        return self.D // self.N

    @property
    def d_kv(self) -> int:
        """K/V width K·H (elements per token)."""
        return self.K * self.H

    @property
    def Vp(self) -> int:
        """Vocabulary padded to a multiple of 128 (lcjax.config.padded_vocab)."""
        return padded_vocab(self.V)

    @classmethod
    def from_model_config(cls, m: ModelConfig) -> "Shape":
        return cls(L=m.n_layers, D=m.d_model, N=m.n_heads, K=m.n_kv_heads, F=m.d_ff, V=m.vocab_size,
                   tied=m.tie_embeddings)


def attn_params(s: Shape) -> int:
    """Attention weights of one layer: Wq, Wo [D, D] and Wk, Wv [D, K·H] → 2D² + 2D·d_kv (formulas §0)."""
    return 2 * s.D * s.N * s.H + 2 * s.D * s.d_kv


def mlp_params(s: Shape) -> int:
    """SwiGLU weights of one layer: gate, up [D, F], down [F, D] → 3DF (formulas §0)."""
    return 3 * s.D * s.F


def layer_params(s: Shape) -> int:
    """One decoder layer: attention + MLP + two RMSNorm weights (2D). LLaMA-2-7B: 202,383,360."""
    return attn_params(s) + mlp_params(s) + 2 * s.D


def total_params(s: Shape, vocab: int | None = None) -> int:
    """All parameters: L layers + embedding V·D + untied head V·D + final norm D.

    ``vocab``: defaults to the true V (the docs/design.md convention); pass ``s.Vp`` for what is stored.
    LLaMA-2-7B: 6,738,415,616.
    """
    v = s.V if vocab is None else vocab
    head = 0 if s.tied else v * s.D
    return s.L * layer_params(s) + v * s.D + head + s.D


def non_embedding_params(s: Shape) -> int:
    """N_par of the FLOP formulas: total minus the input embedding, the head kept (torchtitan convention,
    formulas §0; for a tied head the shared matrix is counted once, as the head). 7B: 6,607,343,616."""
    return total_params(s) - (0 if s.tied else s.V * s.D)


def local_heads(s: Shape, tp: int) -> tuple[int, int]:
    """(query heads, kv heads) one ``model`` shard computes: N/tp and max(K/tp, 1) (kv heads are
    replicated when K < tp; lcjax.sharding.rules)."""
    return s.N // tp, max(s.K // tp, 1)


def layer_matrix_elements_per_device(s: Shape, tp: int) -> int:
    """Elements of one layer's weight matrices on one ``model`` shard: Wq, Wo, gate, up, down split by tp;
    Wk, Wv split by kv heads when K ≥ tp and stored whole (replicated) when K < tp."""
    wk_wv = 2 * s.D * (s.d_kv // tp if s.K >= tp else s.d_kv)
    return (2 * s.D * s.N * s.H + 3 * s.D * s.F) // tp + wk_wv


def param_elements_per_device(s: Shape, tp: int) -> int:
    """Parameter elements one device stores, as lcjax shards them over ``model`` (lcjax.sharding.rules):
    embedding and head split over the padded vocabulary, Wq/Wo/gate/up/down split by tp, Wk/Wv split by kv
    heads when K ≥ tp and stored whole (replicated) when K < tp, norms replicated."""
    per_layer = layer_matrix_elements_per_device(s, tp) + 2 * s.D
    vocab = s.Vp * s.D // tp * (1 if s.tied else 2)
    return s.L * per_layer + vocab + s.D
