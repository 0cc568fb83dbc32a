"""The pure, jitted training step: forward and backward in one ``shard_map`` over the whole mesh, then
the optax update on the sharded state.

Gradients. Inside the ``shard_map`` every shard differentiates its *local* loss (its tokens' summed
cross-entropy divided by the global target-token count) with respect to its parameter shards cast to
"varying" over every mesh axis the parameter is replicated over, then sums each gradient over exactly
those axes once (``psum``). With ``check_vma=True`` JAX transposes the TP ``psum``s exactly; with
``check_vma=False`` (needed around Pallas kernels in interpret mode) a ``psum`` transposes to a ``psum``,
so the objective becomes the sum over the ``model`` axis of identical local losses and the local loss is
divided by the TP size to compensate. Both settings give the single-device gradient (tests/test_model.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from lcjax.config import Config
from lcjax.model.llama import AttentionSpec, Axes
from lcjax.sharding import rules
from lcjax.sharding.mesh import AXES
from lcjax.train.optim import schedule

BATCH_FIELDS = ("tokens", "labels", "positions", "segment_ids", "loss_mask")


class TrainState(NamedTuple):
    """The whole training state, one pytree: model parameters (nnx.State of global sharded arrays),
    optimizer state, the number of optimizer updates applied (int32 scalar), and the data iterator's state
    (dict of int64 scalars, passed through the step untouched; the loop refreshes it)."""

    params: Any
    opt_state: Any
    step: Any
    data_state: Any


def attention_spec(cfg: Config) -> AttentionSpec:
    """The static attention settings of a config."""
    a = cfg.attention
    return AttentionSpec(impl=a.impl, layout=a.layout, window=a.window, block_q=a.block_q, block_k=a.block_k,
                         kernel=a.kernel, ulysses_size=a.ulysses_size)


def needs_check_vma(cfg: Config) -> bool:
    """check_vma for the training shard_map: on, except around Pallas kernels (interpret mode needs it off)."""
    return cfg.attention.kernel != "pallas"


def compute_dtype(cfg: Config):
    """jnp dtype of activations and matmuls (``train.dtype``); parameters stay float32."""
    return jnp.dtype(cfg.train.dtype)


def _over_replicated_axes(op, tree, specs):
    """Apply ``op(x, axes)`` to each leaf with the mesh axes its parameter is replicated over (if any)."""
    def apply(x, spec):
        axes = rules.replicated_axes(spec)
        return op(x, axes) if axes else x
    return jax.tree.map(apply, tree, specs)


def _vary(tree, specs):
    """Cast each parameter shard to vary over the mesh axes it is replicated over."""
    return _over_replicated_axes(lambda x, axes: lax.pcast(x, axes, to="varying"), tree, specs)


def _sum_replicated(tree, specs):
    """Sum each gradient over the mesh axes its parameter is replicated over (exactly once)."""
    return _over_replicated_axes(lax.psum, tree, specs)


def make_loss_and_grads(graphdef, specs, mesh, cfg: Config, *, check_vma: bool | None = None):
    """A function (params, batch) -> (mean loss, grads, target-token count) on global sharded arrays.

    params: the model's nnx.State (sharded by ``specs``); batch: dict of int32 [B, T] arrays in layout order
    (sharded P('data', 'sequence')). loss: float32 scalar, mean cross-entropy per target token (nats).
    """
    axes, attn, dtype = Axes(*AXES), attention_spec(cfg), compute_dtype(cfg)
    check_vma = needs_check_vma(cfg) if check_vma is None else check_vma
    seq_len = cfg.data.seq_len
    tp_correction = 1.0 if check_vma else 1.0 / mesh.shape[axes.model]

    def local(params, batch):
        mask = batch["loss_mask"].astype(jnp.float32)
        count = lax.psum(jnp.sum(mask), (axes.data, axes.sequence))

        def loss_fn(p):
            model = nnx.merge(graphdef, p)
            losses = model.token_losses(batch["tokens"], batch["labels"], batch["positions"],
                                        batch["segment_ids"], max_position=seq_len, attn=attn, axes=axes,
                                        dtype=dtype)
            return jnp.sum(losses * mask) / jnp.maximum(count, 1.0)

        p = _vary(params, specs) if check_vma else params
        loss, grads = jax.value_and_grad(lambda q: loss_fn(q) * tp_correction)(p)
        grads = _sum_replicated(grads, specs)
        loss = lax.psum(loss, (axes.data, axes.sequence)) / tp_correction
        return loss, grads, count

    batch_specs = {k: rules.BATCH for k in BATCH_FIELDS}
    return jax.shard_map(local, mesh=mesh, in_specs=(specs, batch_specs), out_specs=(P(), specs, P()),
                         check_vma=check_vma)


def make_train_step(graphdef, specs, mesh, cfg: Config, optimizer: optax.GradientTransformation, *,
                    check_vma: bool | None = None):
    """The step (state, batch) -> (state, metrics). Arrays of ``state`` are donated to the update.

    The jitted part maps (params, opt_state, step) and the batch to their new values and the metrics;
    ``data_state`` stays on the host and passes through. metrics: float32 scalars ``loss`` (nats per
    target token), ``grad_norm`` (global L2 norm before clipping), ``lr`` (the rate used for this update)
    and ``tokens`` (target tokens in the batch). ``step.lower(state, batch)`` gives the XLA lowering,
    ``step.compile(state, batch)`` compiles ahead of the first call.
    """
    loss_and_grads = make_loss_and_grads(graphdef, specs, mesh, cfg, check_vma=check_vma)
    lr_at = schedule(cfg.train)

    def update(arrays, batch):
        """One update. Non-finite guard: when the loss or the gradient norm is NaN or infinite, params,
        opt_state and step come back unchanged and metrics["skipped"] is 1.0 (else 0.0)."""
        params, opt_state, step = arrays
        loss, grads, count = loss_and_grads(params, batch)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new = (optax.apply_updates(params, updates), new_opt_state, step + 1)
        # the non-finite guard: a step whose loss or gradient norm is NaN or infinite changes nothing
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_at(step), "tokens": count,
                   "skipped": (~ok).astype(jnp.float32)}
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, arrays), metrics

    jitted = jax.jit(update, donate_argnums=0)
    executable = [jitted]

    def run(state: TrainState, batch):
        (params, opt_state, step), metrics = executable[0]((state.params, state.opt_state, state.step), batch)
        return TrainState(params, opt_state, step, state.data_state), metrics

    def lower(state: TrainState, batch):
        return jitted.lower((state.params, state.opt_state, state.step), batch)

    def compile_for(state: TrainState, batch):
        """Compile ahead of the first step (so step times exclude compilation); returns the executable."""
        executable[0] = lower(state, batch).compile()
        return executable[0]

    run.lower, run.compile = lower, compile_for
    return run


def batch_sharding(mesh) -> NamedSharding:
    """Sharding of [B, T] batch arrays: B over ``data``, T over ``sequence``."""
    return NamedSharding(mesh, rules.BATCH)
