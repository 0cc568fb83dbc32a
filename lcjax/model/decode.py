"""The per-shard math of generation with a KV cache, beside the model it runs: prefill and decode both run
the model's own layers (:meth:`lcjax.model.llama.Llama.run_layers`, one :class:`~lcjax.model.llama.Block`),
and differ from training only in the attention call and what each layer keeps (docs/design.md, "The
decoder layer exists once"). The jitted global functions, the cache's placement and the public API are in
:mod:`lcjax.generate`.

Prefill attends like training (sequence-parallel, :func:`lcjax.parallel.sequence.sequence_parallel`) and
keeps each layer's roped keys and values where they were made: layout order, split over ``sequence`` and
``model`` (flash-decoding style). Decode feeds one new token per prompt (replicated over ``sequence``):
every sequence shard attends it to its slice of the prompt's cache, the partial results are merged across
``sequence`` by the log-sum-exp rule (one ``pmax``, one ``psum`` per layer), together with the keys of the
tokens generated so far (the "tail", replicated over ``sequence``).

Prefill and decode run the layers with the hidden states whole on every ``model`` shard
(``Axes.sequence_tp`` off): a decode step has one token per row, nothing to split.

Shapes per shard: tokens, positions [B/dp, T/sp]; lengths [B/dp]; cache keys/values [L, B/dp, T/sp, K', H]
(K' = K/tp, or the one kv head a shard's query heads use when K < tp); tail [L, B/dp, M, K', H] (M
generated tokens); logits float32 [B/dp, V/tp].
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx
from jax import lax

from lcjax.model.llama import Llama, head_logits, rms_norm
from lcjax.model.sharded import ModelSettings
from lcjax.ops import rope
from lcjax.parallel import tensor
from lcjax.parallel.sequence import sequence_parallel


def cos_sin(model: Llama, positions, max_position: int):
    """RoPE angles for int32 positions [B, T], called exactly as ``Llama.hidden`` calls them."""
    m = model.cfg
    return rope.cos_sin(positions, rope.rope_tables(max_position, m.d_model // m.n_heads, **vars(m.rope)))


def prefill_local(params, tokens, positions, lengths, *, graphdef, run: ModelSettings, max_position: int,
                  keep_cache: bool):
    """Per shard: tokens/positions [B/dp, T/sp] (layout order), lengths [B/dp] -> last-token logits float32
    [B/dp, V/tp] and (keep_cache) the layers' keys/values [L, B/dp, T/sp, K', H]."""
    axes, dtype = run.axes._replace(sequence_tp=False), run.dtype  # hidden states whole on every model shard
    model = nnx.merge(graphdef, params)
    segment_ids = jnp.ones_like(tokens)  # padding sits after each prompt: causality already hides it
    x = tensor.vocab_parallel_embed(tokens, model.embedding(axes, dtype), axes.model)
    cos, sin = cos_sin(model, positions, max_position)

    def attend(q, k, v, _):
        o = sequence_parallel(q, k, v, positions, segment_ids, run.attn, axis_name=axes.sequence)
        return o, ((k, v) if keep_cache else None)

    x, kv = model.run_layers(x, cos, sin, attend, axes=axes, dtype=dtype)
    last = positions == (lengths[:, None] - 1)  # each prompt's last token sits on exactly one shard
    x_last = lax.psum(jnp.sum(jnp.where(last[..., None], x, 0).astype(jnp.float32), axis=1), axes.sequence)
    h = rms_norm(x_last.astype(dtype), model.final_norm[...], model.cfg.norm_eps)
    logits = head_logits(h, model.head(axes, dtype))
    return (logits, *kv) if keep_cache else logits


def decode_attention(q, cache_k, cache_v, cache_pos, tail_k, tail_v, lengths, step, *, window, axis):
    """One query per row against this shard's prompt keys and the generated keys, merged over ``axis``.

    q [B, 1, N', H]; cache_k/v [B, T/sp, K', H] with positions cache_pos [B, T/sp] (valid: < lengths);
    tail_k/v [B, M, K', H] (valid: slots <= step). The query's position is lengths + step. Returns
    float32 [B, 1, N', H]. Softmax merge across shards: Milakov & Gimelshein 2018 (arXiv:1805.02867).
    """
    b, _, n, hd = q.shape
    kh = cache_k.shape[2]
    qg = q.reshape(b, kh, n // kh, hd).astype(jnp.float32) / math.sqrt(hd)
    q_pos = lengths + step  # [B]
    slots = jnp.arange(tail_k.shape[1])
    pre_ok = cache_pos < lengths[:, None]
    tail_ok = (slots <= step)[None, :] & jnp.ones((b, 1), bool)
    if window is not None:
        pre_ok &= (q_pos[:, None] - cache_pos) < window
        tail_ok &= (step - slots)[None, :] < window

    def scores(k, ok):
        s = jnp.einsum("bkgh,btkh->bkgt", qg, k.astype(jnp.float32))
        return jnp.where(ok[:, None, None, :], s, -jnp.inf)

    s_pre, s_tail = scores(cache_k, pre_ok), scores(tail_k, tail_ok)
    peak = jnp.maximum(lax.pmax(jnp.max(s_pre, axis=-1), axis), jnp.max(s_tail, axis=-1))  # tail: finite
    p_pre, p_tail = jnp.exp(s_pre - peak[..., None]), jnp.exp(s_tail - peak[..., None])
    weighted = lambda p, v: jnp.einsum("bkgt,btkh->bkgh", p, v.astype(jnp.float32))
    total = lax.psum(jnp.sum(p_pre, axis=-1), axis) + jnp.sum(p_tail, axis=-1)
    out = lax.psum(weighted(p_pre, cache_v), axis) + weighted(p_tail, tail_v)
    return (out / total[..., None]).reshape(b, 1, n, hd)


def decode_local(params, cache, tokens, *, graphdef, run: ModelSettings, max_position: int):
    """Per shard: tokens [B/dp] (replicated over sequence) and the cache (lcjax.generate.Cache of per-shard
    arrays) -> logits float32 [B/dp, V/tp] and the new tail keys/values [L, B/dp, M, K', H]."""
    axes, dtype = run.axes._replace(sequence_tp=False), run.dtype  # hidden states whole on every model shard
    model = nnx.merge(graphdef, params)
    x = tensor.vocab_parallel_embed(tokens[:, None], model.embedding(axes, dtype), axes.model)  # [B, 1, D]
    cos, sin = cos_sin(model, (cache.lengths + cache.step)[:, None], max_position)

    def attend(q, k, v, layer_cache):
        cache_k, cache_v, tail_k, tail_v = layer_cache
        tail_k = lax.dynamic_update_slice_in_dim(tail_k, k.astype(tail_k.dtype), cache.step, axis=1)
        tail_v = lax.dynamic_update_slice_in_dim(tail_v, v.astype(tail_v.dtype), cache.step, axis=1)
        o = decode_attention(q, cache_k, cache_v, cache.positions, tail_k, tail_v, cache.lengths, cache.step,
                             window=run.attn.window, axis=axes.sequence)
        return o.astype(dtype), (tail_k, tail_v)

    per_layer = (cache.k, cache.v, cache.tail_k, cache.tail_v)
    x, (tail_k, tail_v) = model.run_layers(x, cos, sin, attend, per_layer, axes=axes, dtype=dtype)
    h = rms_norm(x[:, 0], model.final_norm[...], model.cfg.norm_eps)
    return head_logits(h, model.head(axes, dtype)), tail_k, tail_v
