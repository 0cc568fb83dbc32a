"""Per-device memory of one lcjax training step: parameters, gradients, optimizer state, activations.

Everything is in bytes on one device. Parameters are float32 (``param_bytes``), split over ``model``
exactly as lcjax.sharding.rules splits them (lcjax.plan.shapes.param_elements_per_device). Gradients are
float32 like the parameters; AdamW keeps two float32 moments. ``optimizer_sharding`` models ZeRO
(Rajbhandari et al. 2020, arXiv:1910.02054) over the data × sequence group (g = dp·sp devices):

- ``none``   parameters, gradients and moments replicated over data and sequence (what lcjax does today);
- ``zero1``  moments / g;  ``zero2`` moments and gradients / g;
- ``fsdp``   moments, gradients and parameters / g, plus one layer gathered whole (compute dtype).

Activations, two estimates (flash attention keeps no T×T scores in either):

- ``formulas``: the LLaMA-adapted count of formulas §1.3 (ours, not from a paper): per layer and token, in
  the compute dtype, attention-norm input D, QKV input D, Q D, K d_kv, V d_kv, O D, MLP-norm input D, MLP
  input D, gate F, up F, silu(gate)·up F (7B: 32.125·sbh bytes at bf16).
- ``lcjax`` (default): what JAX's autodiff of lcjax's ``Block`` actually keeps per layer, read off
  ``jax.ad_checkpoint.print_saved_residuals`` (docs/planner.md): in the compute dtype the inputs of the
  QKV and gate/up matmuls (2D), the attention output (input of Wo), Q, K, V and six F-wide SwiGLU tensors;
  in float32 the two RMSNorms' internals (4D), RoPE cos/sin for Q and K (2H), the ring's float32 output and
  lse, four per-token norm scalars; int32 positions and segment ids; and, when the compute dtype is not
  float32, a compute-dtype copy of the layer's weight matrices (the cast is saved for the backward).
  Outside the layers: embedding and final-norm outputs, float32 logits and their gradient, and the
  backward's working set, taken as one more layer's residuals. ≈ 2× ``formulas`` for LLaMA-2-7B.

lcjax has TP without Megatron sequence parallelism, so D-wide tensors are replicated over ``model`` and
head/F-wide ones split; tokens are split over data and sequence. ``stored_bytes`` = 4 models XLA's CPU
backend, which keeps bfloat16 tensors as float32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lcjax.plan.flops import REMAT_POLICIES
from lcjax.plan.shapes import Shape, layer_matrix_elements_per_device, local_heads, param_elements_per_device

OPTIMIZER_SHARDINGS = ("none", "zero1", "zero2", "fsdp")
ACTIVATION_MODELS = ("lcjax", "formulas")
ADAM_MOMENTS = 2


@dataclass(frozen=True)
class MemoryBytes:
    """Bytes on one device. ``total`` = params + grads + optimizer + activations."""

    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _check_sharding(optimizer_sharding: str) -> None:
    if optimizer_sharding not in OPTIMIZER_SHARDINGS:
        raise ValueError(f"optimizer sharding {optimizer_sharding!r} must be one of "
                         f"{', '.join(OPTIMIZER_SHARDINGS)}")


def state_bytes(s: Shape, tp: int, group: int, optimizer_sharding: str = "none",
                param_bytes: int = 4, compute_bytes: int = 2) -> tuple[int, int, int]:
    """(params, grads, optimizer) bytes per device. ``group``: devices of the data × sequence group."""
    _check_sharding(optimizer_sharding)
    local = param_elements_per_device(s, tp) * param_bytes
    level = OPTIMIZER_SHARDINGS.index(optimizer_sharding)
    optimizer = ADAM_MOMENTS * local // (group if level >= 1 else 1)
    grads = local // (group if level >= 2 else 1)
    params = local // (group if level >= 3 else 1)
    if level >= 3:  # one layer gathered whole for its forward/backward (compute dtype)
        params += (param_elements_per_device(s, tp) // s.L) * compute_bytes
    return params, grads, optimizer


def layer_activation_elements_per_token(s: Shape, tp: int = 1, split: int = 1) -> int:
    """Stored activation elements per token of one layer on one ``model`` shard (formulas §1.3):
    4D replicated + Q, O (N/tp·H each) + K, V (kv heads on the shard) + 3F/tp. tp=1: 6D + 2d_kv + 3F.
    ``split``: the 4D outside the TP regions split over that many shards (sequence-parallel TP: tp;
    Korthikanti et al. 2022 §4.2.2, every term ÷ t)."""
    n_loc, k_loc = local_heads(s, tp)
    return 4 * s.D // split + 2 * n_loc * s.H + 2 * k_loc * s.H + 3 * s.F // tp


def layer_activation_bytes(s: Shape, tokens: int, tp: int = 1, compute_bytes: int = 2, split: int = 1) -> int:
    """Activation bytes one layer stores for ``tokens`` tokens on one device (formulas §1.3, estimate;
    ``split``: :func:`layer_activation_elements_per_token`). LLaMA-2-7B, 32768 tokens, bf16, tp=1:
    4,311,744,512 (= 32.125·sbh)."""
    return compute_bytes * tokens * layer_activation_elements_per_token(s, tp, split)


def lcjax_layer_residual_bytes(s: Shape, tokens: int, tp: int = 1, compute_bytes: int = 2,
                               stored_bytes: int | None = None, mlp_tokens: int | None = None,
                               chunk_tokens: int | None = None, head_chunks: int = 1, split: int = 1) -> int:
    """Bytes of the per-token residuals JAX keeps for one lcjax layer (``lcjax`` model, module doc):
    stored·(2D + (2N' + 2K')·H + 6F/tp) + 4·(4D + 2H + N'·H + N' + 4) + 8 per token (N', K' heads on the
    shard). LLaMA-2-7B, tp=1, bf16: 264,344 bytes per token (2.01× formulas §1.3). ``mlp_tokens``: with a
    tiled MLP (``train.mlp_tile``) only that many tokens' six F-wide tensors exist at a time.
    ``chunk_tokens``: with ``train.seq_chunk`` the per-token terms outside attention (the matmul inputs 2D,
    the float32 norm internals 4D, RoPE 2H, the norm scalars, the MLP) exist for one chunk; Q, K, V, O
    stay whole. ``head_chunks``: the ring's float32 output and lse exist for N'/head_chunks heads.
    ``split``: sequence-parallel TP (tp; 1 off): the float32 norm internals (4D) and scalars live on
    1/split of the tokens; the matmul inputs (2D) stay whole — the collective matmul keeps every gathered
    block for the weight gradient."""
    n_loc, k_loc = local_heads(s, tp)
    stored = stored_bytes or compute_bytes
    c = tokens if chunk_tokens is None else min(chunk_tokens, tokens)
    whole = stored * (2 * n_loc + 2 * k_loc) * s.H + 4 * (n_loc * s.H + n_loc) // head_chunks + 8
    chunked = stored * 2 * s.D + 4 * (4 * s.D // split + 2 * s.H + 4 // split)
    mlp = (c if mlp_tokens is None else min(mlp_tokens, c)) * stored * 6 * s.F // tp
    return tokens * whole + c * chunked + mlp


def cast_weight_bytes(s: Shape, tp: int = 1, compute_bytes: int = 2, param_bytes: int = 4,
                      stored_bytes: int | None = None) -> int:
    """The compute-dtype copy of one layer's weight matrices that autodiff keeps (0 if no cast)."""
    if compute_bytes == param_bytes:
        return 0
    return layer_matrix_elements_per_device(s, tp) * (stored_bytes or compute_bytes)


def head_activation_bytes(s: Shape, tokens: int, tp: int = 1, compute_bytes: int = 2,
                          stored_bytes: int | None = None, loss_tokens: int | None = None, split: int = 1) -> int:
    """Outside the layers (estimate): embedding output and final-norm output (D each, compute dtype) and
    the float32 vocabulary-parallel logits with their gradient (2 × Vp/tp); Korthikanti et al. §4.3 note
    the fp32 logits term 4sbv/t is not negligible at long T. ``loss_tokens``: with a tiled loss
    (``train.loss_tile``) only that many tokens' logits exist at a time. ``split``: sequence-parallel TP
    (tp; 1 off): the embedding output lives on 1/split of the tokens (the final norm's is gathered)."""
    logits = tokens if loss_tokens is None else min(loss_tokens, tokens)
    return (tokens * s.D + tokens * s.D // split) * (stored_bytes or compute_bytes) + logits * 2 * 4 * s.Vp // tp


@dataclass(frozen=True)
class ActivationSpec:
    """How one step keeps its activations, for :func:`activation_bytes` and :func:`memory_per_device`.

    Fields:
      remat: ``none``: every layer keeps its residuals; ``layer``: each layer keeps only its input
        (Korthikanti Table 2, 2sbh) and one layer is rematerialised whole at a time during the backward;
        ``full``: the input and the attention's output and float32 lse (the ring's residuals, so the ring
        never runs twice).
      model: the estimate, ``lcjax`` or ``formulas`` (module doc).
      compute_bytes, param_bytes: bytes per element of the compute and parameter dtypes.
      stored_bytes: bytes per compute-dtype element as the backend stores it (None: ``compute_bytes``).
      mlp_tokens, loss_tokens: tokens per tile of a tiled MLP / loss (None: untiled); a tiled MLP keeps
        only its input per layer, its F-wide tensors exist for one tile of one layer at a time.
      chunk_tokens, head_chunks: :func:`lcjax_layer_residual_bytes` (the ``lcjax`` model only).
      split: sequence-parallel TP (tp; 1 off): the hidden states between TP regions — the layer inputs
        remat keeps, the norms' internals, the embedding output — on 1/split of the tokens.
    """

    remat: str = "none"
    model: str = "lcjax"
    compute_bytes: int = 2
    param_bytes: int = 4
    stored_bytes: int | None = None
    mlp_tokens: int | None = None
    loss_tokens: int | None = None
    chunk_tokens: int | None = None
    head_chunks: int = 1
    split: int = 1


def activation_bytes(s: Shape, tokens: int, tp: int = 1, spec: ActivationSpec = ActivationSpec()) -> int:
    """All activation bytes of one device for ``tokens`` local tokens split over ``tp`` model shards
    (estimate; module doc): the L layers as ``spec.remat`` keeps them, plus the head's activations (and,
    for the ``lcjax`` model, the working set). Raises ValueError for an unknown remat policy or model."""
    sp, cb = spec, spec.compute_bytes
    if sp.remat not in REMAT_POLICIES:
        raise ValueError(f"remat {sp.remat!r} must be one of {', '.join(REMAT_POLICIES)}")
    if sp.model not in ACTIVATION_MODELS:
        raise ValueError(f"activation model {sp.model!r} must be one of {', '.join(ACTIVATION_MODELS)}")
    stored = sp.stored_bytes or cb
    if sp.model == "formulas":
        layer, working = layer_activation_bytes(s, tokens, tp, stored, sp.split), 0
    else:
        working = lcjax_layer_residual_bytes(s, tokens, tp, cb, stored, sp.mlp_tokens, sp.chunk_tokens,
                                             sp.head_chunks, sp.split)
        kept = working if sp.mlp_tokens is None and sp.chunk_tokens is None else lcjax_layer_residual_bytes(
            s, tokens, tp, cb, stored, 0, sp.chunk_tokens, sp.head_chunks, sp.split)
        layer = kept + cast_weight_bytes(s, tp, cb, sp.param_bytes, stored)
    if sp.remat == "none":
        layers = s.L * layer
    else:
        kept = tokens * s.D * stored // sp.split
        if sp.remat == "full":
            kept += tokens * (s.N * s.H // tp * stored + s.N // tp * 4)
        layers = s.L * kept + layer
    return layers + working + head_activation_bytes(s, tokens, tp, cb, stored, sp.loss_tokens, sp.split)


def gathered_kv_bytes(s: Shape, tokens: int, sp: int, tp: int = 1, compute_bytes: int = 2,
                      ulysses_size: int | None = None) -> int:
    """Working set of all-gather attention (lcjax.parallel.allgather) in one layer's backward, the larger
    pass: the other P−1 shards' K and V (compute dtype), their float32 dK, dV, and the P-block float32
    buffer reduce-scattered home: 2·tokens·d_kv'·((P−1)·(cb + 4) + 4·P), d_kv' = local kv heads × H.
    Inside Ulysses groups of U = ``ulysses_size``: the same over P/U groups of U·tokens tokens with
    max(local kv heads, U)/U kv heads."""
    if sp == 1:
        return 0
    kv = local_heads(s, tp)[1] * s.H
    if ulysses_size not in (None, 1):
        kv = max(local_heads(s, tp)[1], ulysses_size) // ulysses_size * s.H
        tokens, sp = tokens * ulysses_size, sp // ulysses_size
        if sp == 1:
            return 0
    return 2 * tokens * kv * ((sp - 1) * (compute_bytes + 4) + 4 * sp)


def memory_per_device(s: Shape, tokens: int, tp: int, group: int, spec: ActivationSpec = ActivationSpec(), *,
                      optimizer_sharding: str = "none", attention_working: int = 0) -> MemoryBytes:
    """The per-device :class:`MemoryBytes` of one step (``tokens`` = (B/dp)·(T/sp); ``group``: devices of
    the data × sequence group; ``spec``: the activations and dtypes, :class:`ActivationSpec`).
    ``attention_working``: bytes an attention impl holds beyond its residuals while one layer runs
    (:func:`gathered_kv_bytes`), counted with the activations. Raises ValueError for an unknown optimizer
    sharding, remat policy or activation model."""
    params, grads, optimizer = state_bytes(s, tp, group, optimizer_sharding, spec.param_bytes, spec.compute_bytes)
    return MemoryBytes(params, grads, optimizer, activation_bytes(s, tokens, tp, spec) + attention_working)
