"""The LLaMA decoder (Touvron et al. 2023, arXiv:2302.13971) in Flax NNX, written in per-shard shapes.

The module is created with global parameter shapes on one logical device (so values depend only on the
seed, never on the mesh), then its state is sharded by ``lcjax.sharding.rules`` and merged back inside the
training ``shard_map``, where every parameter has its per-shard shape. The code reads local sizes off the
parameters and calls collectives explicitly through ``lcjax.parallel``:

- embedding: vocabulary-parallel over ``model`` (``V/tp`` rows per shard);
- attention: column-parallel Q/K/V (heads split over ``model``; kv heads replicated and stored once when
  K < tp), RoPE on true positions, ring attention over ``sequence``, row-parallel output + ``psum``;
- MLP (SwiGLU, Shazeer 2020 arXiv:2002.05202): column-parallel gate/up, row-parallel down + ``psum``;
- RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) weights replicated;
- loss: vocabulary-parallel cross-entropy; logits are never gathered.

Memory (docs/memory.md): with FSDP (``Axes.fsdp`` non-empty) every matrix arrives split along d_model and
is all-gathered in the compute dtype where it is used, inside the scanned layer body; the layer body can be
rematerialised (``MemorySpec.remat``) and the MLP and the loss computed over tiles of tokens so that the
[T, F] activations and [T, V] logits never exist whole.

The layer stack is stored stacked (leading axis L) and run with ``lax.scan``.
Shapes per shard: tokens [B/dp, T/sp]; hidden [B/dp, T/sp, D].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from lcjax.config import Config, ModelConfig, padded_vocab
from lcjax.model import offload
from lcjax.model.chunking import head_chunked
from lcjax.ops import rope
from lcjax.parallel import fsdp, tensor
from lcjax.parallel.sequence import sequence_parallel_attention


class Axes(NamedTuple):
    """Mesh axis names the per-shard model code communicates over."""

    data: str = "data"
    sequence: str = "sequence"
    model: str = "model"
    fsdp: tuple[str, ...] = ()  # axes the parameters are split over besides model (FSDP); () = none


class MemorySpec(NamedTuple):
    """Static memory settings: the layer body's remat policy (none, layer, full, attention, dots), where its
    saved residuals live (``offload``: none, layer, saved; lcjax.model.offload), the tiles, in tokens per
    shard, of the MLP and of the loss, and the sequence chunk of everything outside attention
    (``seq_chunk``: norms, QKV/RoPE, output projection, MLP; 0: untiled), and the number of head groups the
    attention runs in sequence (``head_chunks``, lcjax.model.chunking)."""

    remat: str = "none"
    mlp_tile: int = 0
    loss_tile: int = 0
    offload: str = "none"
    seq_chunk: int = 0
    head_chunks: int = 1


_RING_RESIDUALS = ("attention", "attention_lse")  # the ring's (out, lse), named in lcjax.parallel.ring
REMAT_POLICIES = {
    # save only the layer input: the backward re-runs the whole layer, the ring forward included
    "layer": jax.checkpoint_policies.nothing_saveable,
    # the layer input and the ring's (out, lse): the backward recomputes projections and MLP, never the ring
    "full": jax.checkpoint_policies.save_only_these_names(*_RING_RESIDUALS),
    # + q, k, v after RoPE: the attention backward needs nothing recomputed
    "attention": jax.checkpoint_policies.save_only_these_names(*_RING_RESIDUALS, "qkv"),
    # + every projection/MLP matmul output
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*_RING_RESIDUALS)),
}


class AttentionSpec(NamedTuple):
    """Static attention settings passed down to the per-shard attention (plain values, hashable)."""

    impl: str = "ring"
    layout: str = "zigzag"
    window: int | None = None
    block_q: int | None = None  # None: the kernel's own (tuned) tiles
    block_k: int | None = None
    kernel: str = "xla"
    dkv_dtype: str = "float32"
    ulysses_size: int | None = None


def attention_spec(cfg: Config) -> AttentionSpec:
    """The static attention settings of a config (``cfg.attention``), as training, generation and the
    evaluations pass them to :meth:`Llama.hidden`."""
    a = cfg.attention
    return AttentionSpec(impl=a.impl, layout=a.layout, window=a.window, block_q=a.block_q, block_k=a.block_k,
                         kernel=a.kernel, ulysses_size=a.ulysses_size,
                         dkv_dtype=a.dkv_dtype)


def _normal(rngs: nnx.Rngs, shape, std):
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def tiled_over_tokens(fn, *xs, tile: int):
    """``fn(*xs)`` computed over tiles of ``tile`` tokens along axis 1 ([B, T, ...] inputs; the output an
    array or a tuple of arrays, each [B, T, ...]).

    Each tile is rematerialised in the backward pass, so only one tile's intermediates are alive at a time
    (e.g. the [B, tile, F] MLP activations or [B, tile, V/tp] logits). ``fn`` must act on each token
    independently. ``tile`` 0, or >= T, calls ``fn`` once on the whole arrays.
    """
    b, t = xs[0].shape[:2]
    if not tile or t <= tile:
        return fn(*xs)
    tiles = [x.reshape(b, t // tile, tile, *x.shape[2:]).swapaxes(0, 1) for x in xs]
    _, ys = lax.scan(lambda carry, x: (carry, jax.checkpoint(fn)(*x)), None, tiles)
    return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(b, t, *y.shape[3:]), ys)


def swiglu(h, w_gate, w_up, w_down, axis: str):
    """SwiGLU MLP (Shazeer 2020) with column-parallel gate/up and row-parallel down: [B, T, D] -> [B, T, D]."""
    return tensor.row_parallel(jax.nn.silu(h @ w_gate) * (h @ w_up), w_down, axis)


def rms_norm(x, weight, eps):
    """RMSNorm in float32: x / sqrt(mean(x²) + eps) · weight; returns x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


class Block(nnx.Module):
    """One decoder layer: pre-norm attention and SwiGLU MLP, both residual."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h = cfg.d_model, cfg.d_model // cfg.n_heads
        std = cfg.init_std
        self.attn_norm = nnx.Param(jnp.ones((d,), jnp.float32))
        self.wq = nnx.Param(_normal(rngs, (d, cfg.n_heads * h), std))
        self.wk = nnx.Param(_normal(rngs, (d, cfg.n_kv_heads * h), std))
        self.wv = nnx.Param(_normal(rngs, (d, cfg.n_kv_heads * h), std))
        self.wo = nnx.Param(_normal(rngs, (cfg.n_heads * h, d), std))
        self.mlp_norm = nnx.Param(jnp.ones((d,), jnp.float32))
        self.w_gate = nnx.Param(_normal(rngs, (d, cfg.d_ff), std))
        self.w_up = nnx.Param(_normal(rngs, (d, cfg.d_ff), std))
        self.w_down = nnx.Param(_normal(rngs, (cfg.d_ff, d), std))

    def __call__(self, x, cos, sin, positions, segment_ids, *, cfg: ModelConfig, attn: AttentionSpec,
                 axes: Axes, dtype, mlp_tile: int = 0, seq_chunk: int = 0, head_chunks: int = 1,
                 unroll_heads: bool = False):
        """x [B, T/sp, D] -> [B, T/sp, D] (replicated over ``model``). ``seq_chunk``: tokens per chunk of
        everything but the attention (norm + QKV + RoPE before it; output projection + residual + norm +
        MLP after it), each chunk rematerialised; 0: whole. ``head_chunks``: the attention over that many
        groups of heads in sequence (lcjax.model.chunking; ``unroll_heads``: unrolled rather than a loop)."""
        b, t, _ = x.shape
        hd = cfg.d_model // cfg.n_heads
        w = lambda p, dim: fsdp.gather(p[...].astype(dtype), axes.fsdp, dim)  # dim: the d_model dimension
        kv = lambda p: tensor.kv_columns(w(p, 0), n_kv_heads=cfg.n_kv_heads, n_heads=cfg.n_heads,
                                         head_dim=hd, axis=axes.model)

        def qkv(x, cos, sin):  # [B, c, D] -> q [B, c, N/tp, H], k, v [B, c, K', H]
            c = x.shape[1]
            h = rms_norm(x, self.attn_norm[...], cfg.norm_eps)
            q = (h @ w(self.wq, 0)).reshape(b, c, -1, hd)
            k = (h @ kv(self.wk)).reshape(b, c, -1, hd)
            v = (h @ kv(self.wv)).reshape(b, c, -1, hd)
            return rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin), v

        q, k, v = tiled_over_tokens(qkv, x, cos, sin, tile=seq_chunk)
        q, k, v = (checkpoint_name(x, "qkv") for x in (q, k, v))
        attend = lambda q, k, v: sequence_parallel_attention(
            q, k, v, positions, segment_ids, impl=attn.impl, axis_name=axes.sequence, layout=attn.layout,
            causal=True, window=attn.window, block_q=attn.block_q, block_k=attn.block_k, kernel=attn.kernel,
            ulysses_size=attn.ulysses_size, dkv_dtype=attn.dkv_dtype,
            ordered=True)  # the loader's positions (a window then sends less)
        o = head_chunked(attend, q, k, v, groups=head_chunks, unroll=unroll_heads)
        if head_chunks == 1:  # (with head chunks the ring names each group's output itself)
            o = checkpoint_name(o, "attention")  # Ulysses: the output after its all-to-all back
        mlp = lambda h: swiglu(h, w(self.w_gate, 0), w(self.w_up, 0), w(self.w_down, 1), axes.model)

        def out(x, o):  # [B, c, D], [B, c, N/tp, H] -> [B, c, D]
            x = x + tensor.row_parallel(o.reshape(*o.shape[:2], -1), w(self.wo, 1), axes.model)
            return x + tiled_over_tokens(mlp, rms_norm(x, self.mlp_norm[...], cfg.norm_eps), tile=mlp_tile)

        return tiled_over_tokens(out, x, o, tile=seq_chunk)


class Llama(nnx.Module):
    """LLaMA decoder with a stacked, scanned layer stack. Global shapes at creation (see module doc)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        vp = padded_vocab(cfg.vocab_size)
        self.embed = nnx.Param(_normal(rngs, (vp, cfg.d_model), cfg.init_std))
        keys = jax.random.split(rngs.params(), cfg.n_layers)
        self.layers = _stacked_blocks(cfg, keys)
        self.final_norm = nnx.Param(jnp.ones((cfg.d_model,), jnp.float32))
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(_normal(rngs, (cfg.d_model, vp), cfg.init_std))

    def hidden(self, tokens, positions, segment_ids, *, max_position: int, attn: AttentionSpec,
               axes: Axes, dtype=jnp.float32, mem: MemorySpec = MemorySpec()):
        """Final-norm hidden states [B, T/sp, D] for per-shard tokens/positions/segment ids [B, T/sp]."""
        cfg = self.cfg
        hd = cfg.d_model // cfg.n_heads
        x = tensor.vocab_parallel_embed(tokens, self._embedding(axes, dtype), axes.model)
        cos, sin = rope.cos_sin(positions, rope.rope_tables(max_position, hd, **vars(cfg.rope)))
        graphdef, stacked = nnx.split(self.layers)

        def layer(x, state):
            block = nnx.merge(graphdef, state)
            if mem.offload != "none":  # every use of the input goes through the (offloaded) named copy
                x = checkpoint_name(x, offload.LAYER_INPUT)
            return block(x, cos, sin, positions, segment_ids, cfg=cfg, attn=attn, axes=axes, dtype=dtype,
                         mlp_tile=mem.mlp_tile, seq_chunk=mem.seq_chunk, head_chunks=mem.head_chunks,
                         unroll_heads=mem.offload == "saved"), None  # XLA offloads no residual from a loop

        if mem.remat != "none":
            policy = (REMAT_POLICIES[mem.remat] if mem.offload == "none"
                      else offload.offload_policy(mem.remat, mem.offload))
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
        x, _ = lax.scan(layer, x, stacked)
        final = lambda x: rms_norm(x, self.final_norm[...], cfg.norm_eps)
        return tiled_over_tokens(final, x, tile=mem.seq_chunk)

    def _embedding(self, axes: Axes, dtype):
        """This shard's embedding rows [V/tp, D] in ``dtype`` (gathered along D under FSDP)."""
        return fsdp.gather(self.embed[...].astype(dtype), axes.fsdp, 1)

    def token_losses(self, tokens, labels, positions, segment_ids, *, max_position: int,
                     attn: AttentionSpec, axes: Axes, dtype=jnp.float32, mem: MemorySpec = MemorySpec()):
        """Per-token cross-entropy float32 [B, T/sp] (nats), from vocabulary-parallel logits computed in
        tiles of ``mem.loss_tile`` tokens (the [B, T/sp, V/tp] logits never exist whole when tiled)."""
        h = self.hidden(tokens, positions, segment_ids, max_position=max_position, attn=attn, axes=axes,
                        dtype=dtype, mem=mem)
        if self.cfg.tie_embeddings:
            head = self._embedding(axes, dtype).T
        else:
            head = fsdp.gather(self.lm_head[...].astype(dtype), axes.fsdp, 0)

        def losses(h, labels):
            logits = jnp.einsum("btd,dv->btv", h, head, preferred_element_type=jnp.float32)
            return tensor.vocab_parallel_cross_entropy(logits, labels, vocab_size=self.cfg.vocab_size,
                                                       axis=axes.model)
        return tiled_over_tokens(losses, h, labels, tile=mem.loss_tile)


def _stacked_blocks(cfg: ModelConfig, keys) -> Block:
    """L blocks initialised from ``keys`` [L] and stored as one Block whose params have a leading L axis."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0))))
    states = jax.vmap(lambda key: nnx.split(Block(cfg, nnx.Rngs(params=key)))[1])(keys)
    return nnx.merge(graphdef, states)


def count_params(cfg: ModelConfig) -> int:
    """Parameter count with the true (unpadded) vocabulary, embeddings and output head included."""
    d, f, h = cfg.d_model, cfg.d_ff, cfg.d_model // cfg.n_heads
    per_layer = 2 * d + d * cfg.n_heads * h * 2 + d * cfg.n_kv_heads * h * 2 + 3 * d * f
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return cfg.n_layers * per_layer + cfg.vocab_size * d + head + d
