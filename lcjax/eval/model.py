"""A trained model for evaluation: parameters restored onto any mesh, and jitted forward functions that run
inside one ``shard_map`` exactly as training does (layout order, ring attention over ``sequence``,
vocabulary-parallel head over ``model``), returning small per-token results instead of logits.

The [B, T/sp, V/tp] float32 logits are never whole: the head and its reduction run over tiles of at most
``train.loss_tile`` tokens per shard (``EVAL_TILE`` when that is 0), so an evaluation batch of long
prompts holds one tile of logits at a time."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from lcjax.checkpoint import restore_params
from lcjax.config import Config
from lcjax.generate import abstract_params
from lcjax.model.llama import head_logits, tiled_over_tokens
from lcjax.model.sharded import model_settings, run_sharded
from lcjax.parallel import tensor
from lcjax.sharding import rules
from lcjax.sharding.mesh import make_mesh

FIELDS = ("tokens", "positions", "segment_ids")
EVAL_TILE = 1024  # tokens per shard whose logits are alive at once when train.loss_tile is 0


def load_params(cfg: Config, checkpoints: str | Path, step: int | None = None):
    """(graphdef, specs, params, mesh): the parameters of checkpoint ``step`` (default newest) under
    ``checkpoints``, placed on the mesh of ``cfg.mesh`` (any mesh: Orbax reshards) as generation places them
    (:func:`lcjax.generate.abstract_params`: ``train.param_dtype``, split over ``model`` only). Raises
    ValueError (one line) for a missing or foreign checkpoint."""
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model)
    graphdef, specs, abstract = abstract_params(cfg, mesh)
    return graphdef, specs, restore_params(checkpoints, abstract, step), mesh


def token_tile(tokens: int, cfg: Config) -> int:
    """Tile for ``tokens`` tokens per shard: the largest divisor of ``tokens`` not above ``train.loss_tile``
    (``EVAL_TILE`` when 0)."""
    target = min(cfg.train.loss_tile or EVAL_TILE, tokens)
    return next(d for d in range(target, 0, -1) if tokens % d == 0)


def _tiled_fn(graphdef, cfg: Config, reduce):
    """Per-shard (params, batch, *per_token) -> ``reduce(logits, *per_token)`` over token tiles, where logits
    are float32 [B/dp, tile, V/tp] and per_token arrays are [B/dp, T/sp]; a batch of any length."""
    run = model_settings(cfg)
    axes = run.axes

    def tiled(params, batch, *per_token):
        model = nnx.merge(graphdef, params)
        length = batch["tokens"].shape[1] * lax.axis_size(axes.sequence)
        h = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"],
                         max_position=max(length, cfg.data.seq_len), attn=run.attn, axes=axes, dtype=run.dtype)
        head = model.head(axes, run.dtype)
        fn = lambda h, *xs: reduce(head_logits(h, head), *xs)
        return tiled_over_tokens(fn, h, *per_token, tile=token_tile(h.shape[1], cfg))
    return tiled


def _specs(names) -> dict:
    return {k: rules.BATCH for k in names}


def make_answer_misses(graphdef, specs, mesh, cfg: Config):
    """Jitted (params, batch) -> int32 [B]: per sequence, how many masked labels are not the argmax of the
    logits (0: the whole answer is decoded greedily). batch: int32 [B, T] ``tokens``, ``labels``,
    ``positions``, ``segment_ids`` and ``loss_mask`` (the answer positions) in layout order, sharded
    P('data', 'sequence')."""
    v = cfg.model.vocab_size
    hits = _tiled_fn(graphdef, cfg, lambda logits, labels: tensor.vocab_parallel_label_is_argmax(
        logits, labels, vocab_size=v, axis="model"))

    def local(params, batch):
        hit = hits(params, batch, batch["labels"])
        miss = jnp.sum(jnp.where(hit, 0, batch["loss_mask"]), axis=1)
        return lax.psum(miss, "sequence")

    in_specs = (specs, _specs((*FIELDS, "labels", "loss_mask")))
    return jax.jit(run_sharded(local, mesh, in_specs=in_specs, out_specs=P("data"), kernel=cfg.attention.kernel))


def make_argmax(graphdef, specs, mesh, cfg: Config):
    """Jitted (params, batch) -> int32 [B, T]: the greedy next token at every position (layout order).
    batch: ``tokens``, ``positions``, ``segment_ids`` int32 [B, T] in layout order."""
    v = cfg.model.vocab_size
    local = _tiled_fn(graphdef, cfg, lambda logits: tensor.vocab_parallel_argmax(logits, vocab_size=v, axis="model"))
    return jax.jit(run_sharded(local, mesh, in_specs=(specs, _specs(FIELDS)), out_specs=rules.BATCH,
                               kernel=cfg.attention.kernel))
