"""The optimizer: AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) with global-norm clipping, linear
warmup and cosine decay; no weight decay on norms and embeddings."""

from __future__ import annotations

import jax
import optax

from lcjax.config import TrainConfig

NO_DECAY = ("embed", "attn_norm", "mlp_norm", "final_norm")


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Learning rate of update ``count`` (0-based): linear warmup lr·(count+1)/warmup_steps, reaching ``lr``
    at update ``warmup_steps`` (so the first update already moves), then cosine decay to
    ``lr · min_lr_ratio`` at the last step. It depends on ``train.steps``: resuming with more steps
    stretches the decay from there on."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    base = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
                                              end_value=cfg.lr * cfg.min_lr_ratio)
    return lambda count: base(count + 1) if warmup else base(count)


def decay_mask(params):
    """True for parameters that get weight decay (matrices other than the embedding)."""
    def keep(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return not any(n in NO_DECAY for n in names)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) then AdamW(schedule, b1, b2, weight_decay masked)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=decay_mask(params)),
    )
