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

Sequence-parallel TP (``Axes.sequence_tp``, ``train.sequence_parallel_tp``): between the TP regions the
hidden states are split over ``model`` along tokens too, [B, T/(sp·tp), D]: the embedding ends in a
reduce-scatter, each column-parallel projection all-gathers its normed input and each row-parallel one
reduce-scatters its output, both as collective matmuls (lcjax.parallel.tensor), and the final hidden states
are all-gathered before the head. :meth:`Llama.hidden` decides it (:func:`splits_tokens`) and returns the
gathered [B, T/sp, D] either way.

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
from lcjax.parallel.sequence import sequence_parallel
from lcjax.parallel.spec import AttentionSpec  # noqa: F401  (the model's attention settings: lcjax.parallel.spec)


class Axes(NamedTuple):
    """Mesh axis names the per-shard model code communicates over."""

    data: str = "data"
    sequence: str = "sequence"
    model: str = "model"
    fsdp: tuple[str, ...] = ()  # axes the parameters are split over besides model (FSDP); () = none
    sequence_tp: bool = False  # hidden states between TP regions split over model along tokens (see module doc)
    # per stacked layer weight (jax.tree.leaves order), the axes its gradient is summed over inside the
    # backward's layer loop (lcjax.parallel.fsdp.sum_grads_in_backward), and the dtype of that sum; () = after
    layer_grad_sum: tuple[tuple[str, ...], ...] = ()
    grad_wire: str = "float32"


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


def attention_spec(cfg: Config) -> AttentionSpec:
    """The static attention settings of a config (``cfg.attention``), as training, generation and the
    evaluations pass them to :meth:`Llama.hidden`. ``ordered``: the model's positions come from the loader,
    prompts or evaluations, which restart at each document and grow by one (a window then sends less)."""
    a = cfg.attention
    return AttentionSpec(impl=a.impl, layout=a.layout, window=a.window, block_q=a.block_q, block_k=a.block_k,
                         kernel=a.kernel, dkv_dtype=a.dkv_dtype, ulysses_size=a.ulysses_size, ordered=True)


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


def head_logits(h, head):
    """Logits float32 [..., V/tp] of hidden states h [..., D] through this shard's head [D, V/tp]
    (:meth:`Llama.head`), accumulated in float32 whatever the compute dtype."""
    return jnp.einsum("...d,dv->...v", h, head, preferred_element_type=jnp.float32)


def swiglu(h, w_gate, w_up, w_down, axis: str, split: bool = False):
    """SwiGLU MLP (Shazeer 2020) with column-parallel gate/up and row-parallel down: [B, T, D] -> [B, T, D].
    ``split``: h and the result are this shard's block of tokens [B, T/tp, D] (sequence-parallel TP: the
    collective matmuls of lcjax.parallel.tensor gather h and reduce-scatter the result)."""
    if split:
        gate, up = tensor.all_gather_matmul(h, (w_gate, w_up), axis)
        return tensor.matmul_reduce_scatter(jax.nn.silu(gate) * up, w_down, axis)
    return tensor.row_parallel(jax.nn.silu(h @ w_gate) * (h @ w_up), w_down, axis)


def splits_tokens(axes: Axes, tokens: int, tp: int, seq_chunk: int = 0) -> bool:
    """Whether the layers run sequence-parallel TP on ``tokens`` tokens per sequence shard: asked for
    (``axes.sequence_tp``), more than one model shard, tokens divisible by ``tp``, and no sequence chunks
    (``seq_chunk`` 0: the chunks' tokens would come back interleaved over the model shards)."""
    return axes.sequence_tp and tp > 1 and tokens % tp == 0 and not seq_chunk


def split_tile(tile: int, tokens: int, tp: int) -> int:
    """The MLP tile on a shard's block of ``tokens`` split tokens under sequence-parallel TP: the largest
    divisor of ``tokens`` not above tile / tp (tile: tokens per sequence shard, as ``train.mlp_tile``), so
    the gathered tile holds about ``tile`` tokens; 0 stays 0 (untiled)."""
    if not tile:
        return 0
    return next(d for d in range(max(min(tile // tp, tokens), 1), 0, -1) if tokens % d == 0)


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

    def qkv(self, x, cos, sin, *, cfg: ModelConfig, axes: Axes, dtype, seq_chunk: int = 0):
        """The roped queries [B, T, N/tp, H] and keys [B, T, K', H] and the values [B, T, K', H] of this
        shard's heads, from the layer input x [B, T, D] (K' = K/tp, or the one kv head its query heads use
        when K < tp). cos, sin: RoPE angles of the tokens' positions (lcjax.ops.rope.cos_sin).
        ``seq_chunk``: computed over chunks of that many tokens, each rematerialised (0: whole). With
        ``axes.sequence_tp`` x is this shard's block [B, T/tp, D] and the normed input is all-gathered over
        ``model`` by the projections' collective matmul (lcjax.parallel.tensor.all_gather_matmul)."""
        hd = cfg.d_model // cfg.n_heads
        kv = lambda p: tensor.kv_columns(_gathered(p, axes, dtype, 0), n_kv_heads=cfg.n_kv_heads,
                                         n_heads=cfg.n_heads, head_dim=hd, axis=axes.model)
        if axes.sequence_tp:
            h = rms_norm(x, self.attn_norm[...], cfg.norm_eps)
            ws = (_gathered(self.wq, axes, dtype, 0), kv(self.wk), kv(self.wv))
            q, k, v = (y.reshape(*y.shape[:2], -1, hd) for y in tensor.all_gather_matmul(h, ws, axes.model))
            return rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin), v

        def chunk(x, cos, sin):  # [B, c, D] -> q [B, c, N/tp, H], k, v [B, c, K', H]
            b, c, _ = x.shape
            h = rms_norm(x, self.attn_norm[...], cfg.norm_eps)
            q = (h @ _gathered(self.wq, axes, dtype, 0)).reshape(b, c, -1, hd)
            k = (h @ kv(self.wk)).reshape(b, c, -1, hd)
            v = (h @ kv(self.wv)).reshape(b, c, -1, hd)
            return rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin), v

        return tiled_over_tokens(chunk, x, cos, sin, tile=seq_chunk)

    def finish(self, x, o, *, cfg: ModelConfig, axes: Axes, dtype, mlp_tile: int = 0, seq_chunk: int = 0):
        """The layer output [B, T, D] from its input x and the attention output o [B, T, N/tp, H] (in
        ``dtype``): row-parallel output projection (``psum`` over ``model``), then the residual SwiGLU MLP
        over tiles of ``mlp_tile`` tokens (0: untiled); all of it over chunks of ``seq_chunk`` tokens, each
        rematerialised (0: whole). With ``axes.sequence_tp`` x and the result are this shard's block
        [B, T/tp, D]: the projections reduce-scatter and all-gather over ``model`` by collective matmuls
        (lcjax.parallel.tensor), the MLP tiles hold about ``mlp_tile`` gathered tokens (:func:`split_tile`)."""
        w = lambda p, dim: _gathered(p, axes, dtype, dim)  # dim: the d_model dimension
        split = axes.sequence_tp
        mlp = lambda h: swiglu(h, w(self.w_gate, 0), w(self.w_up, 0), w(self.w_down, 1), axes.model, split)
        if split:
            out = tensor.matmul_reduce_scatter(o.reshape(*o.shape[:2], -1), w(self.wo, 1), axes.model)
            x = x + out
            tile = split_tile(mlp_tile, x.shape[1], lax.axis_size(axes.model))
            return x + tiled_over_tokens(mlp, rms_norm(x, self.mlp_norm[...], cfg.norm_eps), tile=tile)

        def chunk(x, o):  # [B, c, D], [B, c, N/tp, H] -> [B, c, D]
            x = x + tensor.row_parallel(o.reshape(*o.shape[:2], -1), w(self.wo, 1), axes.model)
            return x + tiled_over_tokens(mlp, rms_norm(x, self.mlp_norm[...], cfg.norm_eps), tile=mlp_tile)

        return tiled_over_tokens(chunk, x, o, tile=seq_chunk)

    def __call__(self, x, cos, sin, attend, *, cfg: ModelConfig, axes: Axes, dtype, mlp_tile: int = 0,
                 seq_chunk: int = 0):
        """x [B, T/sp, D] -> ([B, T/sp, D] replicated over ``model``, aux); with ``axes.sequence_tp`` x and
        the result are this shard's block of tokens [B, T/(sp·tp), D] (attention still sees all T/sp). ``attend(q, k, v)`` -> (o, aux):
        the attention of this shard's roped queries to keys and values (:meth:`qkv`), o [B, T/sp, N/tp, H]
        in ``dtype``; training attends over the sequence shards, the KV-cache decode over the cache, and aux
        carries what the caller keeps (the cache) or None. ``mlp_tile``, ``seq_chunk``: :meth:`finish`."""
        q, k, v = self.qkv(x, cos, sin, cfg=cfg, axes=axes, dtype=dtype, seq_chunk=seq_chunk)
        q, k, v = (checkpoint_name(a, "qkv") for a in (q, k, v))
        o, aux = attend(q, k, v)
        return self.finish(x, o, cfg=cfg, axes=axes, dtype=dtype, mlp_tile=mlp_tile, seq_chunk=seq_chunk), aux


def _gathered(p, axes: Axes, dtype, dim: int):
    """Parameter ``p`` in ``dtype``, all-gathered along its d_model dimension ``dim`` under FSDP."""
    return fsdp.gather(p[...].astype(dtype), axes.fsdp, dim)


def sequence_attend(positions, segment_ids, attn: AttentionSpec, axes: Axes, head_chunks: int = 1,
                    unroll_heads: bool = False):
    """The training attention of a layer, ``attend(q, k, v, _) -> (o, None)`` for :meth:`Llama.run_layers`:
    sequence-parallel attention (lcjax.parallel.sequence) of this shard's tokens, over ``head_chunks``
    groups of heads in sequence (lcjax.model.chunking; ``unroll_heads``: unrolled rather than a loop), the
    output named ``attention`` for the remat policies (with head groups the ring names each group's own)."""
    def attend(q, k, v, _):
        one = lambda q, k, v: sequence_parallel(q, k, v, positions, segment_ids, attn, axis_name=axes.sequence)
        o = head_chunked(one, q, k, v, groups=head_chunks, unroll=unroll_heads)
        if head_chunks == 1:
            o = checkpoint_name(o, "attention")  # Ulysses: the output after its all-to-all back
        return o, None
    return attend


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
        """Final-norm hidden states [B, T/sp, D] (replicated over ``model``) for per-shard tokens/positions/
        segment ids [B, T/sp] (``mem``: remat, offload, tiles and chunks, :class:`MemorySpec`). With
        ``axes.sequence_tp`` (where :func:`splits_tokens` allows) the layers run on token blocks
        [B, T/(sp·tp), D] and the final states are all-gathered over ``model`` at the end."""
        cfg = self.cfg
        hd = cfg.d_model // cfg.n_heads
        split = splits_tokens(axes, tokens.shape[1], lax.axis_size(axes.model), mem.seq_chunk)
        axes = axes._replace(sequence_tp=split)
        x = tensor.vocab_parallel_embed(tokens, self.embedding(axes, dtype), axes.model, scatter=split)
        cos, sin = rope.cos_sin(positions, rope.rope_tables(max_position, hd, **vars(cfg.rope)))
        attend = sequence_attend(positions, segment_ids, attn, axes, mem.head_chunks,
                                 unroll_heads=mem.offload == "saved")  # XLA offloads no residual from a loop
        x, _ = self.run_layers(x, cos, sin, attend, axes=axes, dtype=dtype, mem=mem)
        final = lambda x: rms_norm(x, self.final_norm[...], cfg.norm_eps)
        if split:
            return lax.all_gather(final(x), axes.model, axis=1, tiled=True)
        return tiled_over_tokens(final, x, tile=mem.seq_chunk)

    def run_layers(self, x, cos, sin, attend, per_layer=None, *, axes: Axes, dtype, mem: MemorySpec = MemorySpec()):
        """The L layers run in turn (``lax.scan`` over the stacked layer parameters) on x [B, T, D]: layer l
        calls ``attend(q, k, v, per_layer[l])`` -> (o, aux_l) (see :meth:`Block.__call__`; ``per_layer``: a
        pytree with a leading L axis, e.g. that layer's KV cache, or None). Returns (x after the last layer,
        the aux_l stacked along a leading L axis). ``mem.remat`` rematerialises each layer's body, keeping
        its saved residuals where ``mem.offload`` says (lcjax.model.offload)."""
        graphdef, stacked = nnx.split(self.layers)

        def layer(x, xs):
            state, extra = xs
            state = fsdp.sum_grads_in_backward(state, axes.layer_grad_sum, axes.grad_wire)
            block = nnx.merge(graphdef, state)
            if mem.offload != "none":  # every use of the input goes through the (offloaded) named copy
                x = checkpoint_name(x, offload.LAYER_INPUT)
            return block(x, cos, sin, lambda q, k, v: attend(q, k, v, extra), cfg=self.cfg, axes=axes, dtype=dtype,
                         mlp_tile=mem.mlp_tile, seq_chunk=mem.seq_chunk)

        if mem.remat != "none":
            policy = (REMAT_POLICIES[mem.remat] if mem.offload == "none"
                      else offload.offload_policy(mem.remat, mem.offload))
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
        return lax.scan(layer, x, (stacked, per_layer))

    def head(self, axes: Axes = Axes(), dtype=jnp.float32):
        """This shard's output head [D, V/tp] in ``dtype``, vocabulary-parallel over ``model``: the
        embedding's transpose when ``model.tie_embeddings``, else ``lm_head`` (gathered along D under
        FSDP). Every caller (loss, evaluation, generation, conversion) takes the head from here."""
        if self.cfg.tie_embeddings:
            return self.embedding(axes, dtype).T
        return fsdp.gather(self.lm_head[...].astype(dtype), axes.fsdp, 0)

    def embedding(self, axes: Axes = Axes(), dtype=jnp.float32):
        """This shard's embedding rows [V/tp, D] in ``dtype`` (gathered along D under FSDP)."""
        return fsdp.gather(self.embed[...].astype(dtype), axes.fsdp, 1)

    def token_losses(self, tokens, labels, positions, segment_ids, *, max_position: int,
                     attn: AttentionSpec, axes: Axes, dtype=jnp.float32, mem: MemorySpec = MemorySpec()):
        """Per-token cross-entropy float32 [B, T/sp] (nats), from vocabulary-parallel logits computed in
        tiles of ``mem.loss_tile`` tokens (the [B, T/sp, V/tp] logits never exist whole when tiled)."""
        h = self.hidden(tokens, positions, segment_ids, max_position=max_position, attn=attn, axes=axes,
                        dtype=dtype, mem=mem)
        head = self.head(axes, dtype)

        def losses(h, labels):
            return tensor.vocab_parallel_cross_entropy(head_logits(h, head), labels,
                                                       vocab_size=self.cfg.vocab_size, axis=axes.model)
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
