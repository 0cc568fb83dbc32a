"""The pure, jitted training step: forward and backward in one ``shard_map`` over the whole mesh, then
the optax update on the sharded state.

Gradients. Inside the ``shard_map`` every shard differentiates its *local* loss (its tokens' summed
cross-entropy divided by the global target-token count) with respect to its parameter shards cast to
"varying" over every mesh axis the parameter is replicated over, then sums each gradient over exactly
those axes once (``psum``). With ``check_vma=True`` JAX transposes the TP ``psum``s exactly; with
``check_vma=False`` (needed around Pallas kernels in interpret mode) a ``psum`` transposes to a ``psum``,
so the objective becomes the sum over the ``model`` axis of identical local losses and the local loss is
divided by the TP size to compensate. Both settings give the single-device gradient (tests/model/test_model.py).

ZeRO (docs/memory.md). With ``train.fsdp`` the parameters arrive split along d_model over data × sequence
and are all-gathered per layer inside the model; the transpose of that all-gather reduce-scatters their
gradients. With ``train.shard_optimizer`` alone the parameters are replicated, and each gradient is
reduce-scattered (``psum_scatter``) over data × sequence here; the optimizer state lives in the same
split layout, XLA updates each slice where it lives and all-gathers the new parameters. Either way no
gradient is all-reduced over data × sequence and then sliced.

Mixed precision. ``train.dtype`` is the compute dtype (activations, matmuls, parameter all-gathers);
``train.param_dtype`` the stored parameters'. The optimizer always sees float32 (its moments are float32),
and the loss, the softmax statistics and the ring's accumulators are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from lcjax.config import Config
from lcjax.model import sharded
from lcjax.model.sharded import ModelSettings, model_settings
from lcjax.parallel import fsdp
from lcjax.sharding import rules
from lcjax.train.optim import schedule

BATCH_FIELDS = ("tokens", "labels", "positions", "segment_ids", "loss_mask")
BATCH_SPECS = {k: rules.BATCH for k in BATCH_FIELDS}


def zero_grads(cfg: Config) -> bool:
    """Whether gradients and optimizer state are split over data × sequence (FSDP or ZeRO-1/2)."""
    return cfg.train.fsdp or cfg.train.shard_optimizer


def _over_replicated_axes(op, tree, specs):
    """Apply ``op(x, axes)`` to each leaf with the mesh axes its parameter is replicated over (if any)."""
    def apply(x, spec):
        axes = rules.replicated_axes(spec)
        return op(x, axes) if axes else x
    return jax.tree.map(apply, tree, specs)


def _vary(tree, specs):
    """Cast each parameter shard to vary over the mesh axes it is replicated over."""
    return _over_replicated_axes(lambda x, axes: lax.pcast(x, axes, to="varying"), tree, specs)


def _reduce_grads(grads, specs, grad_specs, wire_dtype=jnp.float32, *, layers_done: bool = False):
    """Sum each gradient over the mesh axes its parameter is replicated over, exactly once: by a
    reduce-scatter over data × sequence along d_model where ``grad_specs`` splits what ``specs`` does not
    (ZeRO-1/2), by a ``psum`` over the remaining replicated axes. The sums run in ``wire_dtype``
    (``train.grad_reduce_dtype``); the result is in the gradient's own dtype. ``layers_done``: the stacked
    layer weights' gradients were already summed inside the backward's layer loop (:func:`in_loop_grad_axes`)."""
    def reduce(path, g, spec, grad_spec):
        if layers_done and rules.is_stacked(path):
            return g
        dtype, g = g.dtype, g.astype(wire_dtype)
        dim = rules.zero_dim(spec, grad_spec)
        if dim is not None:
            g = fsdp.reduce_scatter(g, rules.ZERO_AXES, dim)
        axes = rules.replicated_axes(grad_spec)
        return (lax.psum(g, axes) if axes else g).astype(dtype)
    return jax.tree_util.tree_map_with_path(reduce, grads, specs, grad_specs)


def in_loop_grad_axes(specs, cfg: Config, check_vma: bool) -> tuple[tuple[str, ...], ...]:
    """Per stacked layer weight, the axes its gradient is summed over inside the backward's layer loop
    (``Axes.layer_grad_sum``; lcjax.parallel.fsdp.sum_grads_in_backward), or () to sum after the loop: the
    sums move into the loop when they are plain all-reduces (no FSDP or ZeRO, whose reduce-scatters are the
    weight gathers' transposes or change the gradient's shape) and ``check_vma`` is off."""
    if check_vma or zero_grads(cfg):
        return ()
    return rules.layer_grad_axes(specs)


def grad_specs_of(params, cfg: Config, mesh):
    """PartitionSpecs of the gradients (and optimizer state) of ``params``: split over data × sequence
    along d_model under FSDP or ZeRO-1/2, else like the parameters."""
    return rules.param_specs(params, n_kv_heads=cfg.model.n_kv_heads, tp=mesh.shape["model"],
                             zero=zero_grads(cfg))


def make_loss_and_grads(graphdef, specs, mesh, cfg: Config, *, check_vma: bool | None = None):
    """A function (params, batch) -> (mean loss, grads, target-token count) on global sharded arrays.

    params: the model's nnx.State (sharded by ``specs``); batch: dict of int32 [B, T] arrays in layout order
    (sharded P('data', 'sequence')). loss: float32 scalar, mean cross-entropy per target token (nats).
    grads: like params, sharded by :func:`grad_specs_of` (split over data × sequence under ZeRO).
    """
    grad_specs = grad_specs_of(specs, cfg, mesh)
    check_vma = sharded.check_vma(cfg.attention.kernel) if check_vma is None else check_vma
    run = model_settings(cfg, fsdp=cfg.train.fsdp)
    in_loop = in_loop_grad_axes(specs, cfg, check_vma)
    run = run._replace(axes=run.axes._replace(layer_grad_sum=in_loop, grad_wire=cfg.train.grad_reduce_dtype))
    axes = run.axes
    tp_correction = 1.0 if check_vma else 1.0 / mesh.shape[axes.model]

    def local(params, batch):
        mask = batch["loss_mask"].astype(jnp.float32)
        count = lax.psum(jnp.sum(mask), (axes.data, axes.sequence))

        def loss_fn(p):
            losses = _token_losses(nnx.merge(graphdef, p), batch, cfg.data.seq_len, run)
            return jnp.sum(losses * mask) / jnp.maximum(count, 1.0)

        p = _vary(params, specs) if check_vma else params
        loss, grads = jax.value_and_grad(lambda q: loss_fn(q) * tp_correction)(p)
        grads = _reduce_grads(grads, specs, grad_specs, jnp.dtype(cfg.train.grad_reduce_dtype),
                              layers_done=bool(in_loop))
        loss = lax.psum(loss, (axes.data, axes.sequence)) / tp_correction
        return loss, grads, count

    return sharded.run_sharded(local, mesh, in_specs=(specs, BATCH_SPECS), out_specs=(P(), grad_specs, P()),
                               kernel=cfg.attention.kernel, vma=check_vma)


def _token_losses(model, batch: dict, seq_len: int, run: ModelSettings):
    """Per-token cross-entropy float32 [B/dp, T/sp] of a per-shard batch (:meth:`Llama.token_losses`)."""
    return model.token_losses(batch["tokens"], batch["labels"], batch["positions"], batch["segment_ids"],
                              max_position=seq_len, attn=run.attn, axes=run.axes, dtype=run.dtype, mem=run.mem)


def make_eval_loss(graphdef, specs, mesh, cfg: Config):
    """A jitted function (params, batch) -> (summed cross-entropy in nats, target-token count), float32
    scalars over the whole global batch: the forward pass only (validation)."""
    run = model_settings(cfg, fsdp=cfg.train.fsdp)
    axes = run.axes

    def local(params, batch):
        losses = _token_losses(nnx.merge(graphdef, params), batch, cfg.data.seq_len, run)
        mask = batch["loss_mask"].astype(jnp.float32)
        reduce = lambda x: lax.psum(jnp.sum(x), (axes.data, axes.sequence))
        return reduce(losses * mask), reduce(mask)

    return jax.jit(sharded.run_sharded(local, mesh, in_specs=(specs, BATCH_SPECS), out_specs=(P(), P()),
                                       kernel=cfg.attention.kernel))


def micro_batches(batch: dict, accum: int) -> dict:
    """Split every [B, T] array of ``batch`` into ``accum`` micro-batches [accum, B/accum, T].

    Micro-batch a holds rows a, a + accum, a + 2·accum, …: with B split over ``data`` in contiguous blocks
    whose size accum divides, every micro-batch keeps an equal share of each data shard's rows, so the split
    moves no data between devices.
    """
    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)
    return {k: split(v) for k, v in batch.items()}


def accumulate(loss_and_grads, params, batch: dict, accum: int):
    """(mean loss, grads, target-token count) of the whole ``batch`` from ``accum`` micro-batches run one
    after another (``lax.scan``): each micro-batch's mean loss and gradients are weighted by its token
    count, so the result equals one pass over the whole batch (up to float32 rounding)."""
    if accum == 1:
        return loss_and_grads(params, batch)

    def body(carry, micro):
        loss_sum, grad_sum, count_sum = carry
        loss, grads, count = loss_and_grads(params, micro)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32) * count, grad_sum, grads)
        return (loss_sum + loss * count, grad_sum, count_sum + count), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (jnp.zeros((), jnp.float32), zeros, jnp.zeros((), jnp.float32))
    (loss_sum, grad_sum, count), _ = lax.scan(body, init, micro_batches(batch, accum))
    total = jnp.maximum(count, 1.0)
    return loss_sum / total, jax.tree.map(lambda g: g / total, grad_sum), count


def make_train_step(graphdef, specs, mesh, cfg: Config, optimizer: optax.GradientTransformation, *,
                    check_vma: bool | None = None):
    """The step (state, batch) -> (state, metrics). Arrays of ``state`` are donated to the update.

    The jitted part maps (params, opt_state, step) and the batch to their new values and the metrics;
    ``data_state`` stays on the host and passes through. metrics: float32 scalars ``loss`` (nats per
    target token), ``grad_norm`` (global L2 norm before clipping), ``lr`` (the rate used for this update)
    and ``tokens`` (target tokens in the batch). With ``train.grad_accum`` > 1 the batch is run as that many
    micro-batches (:func:`accumulate`). ``step.lower(state, batch)`` gives the XLA lowering,
    ``step.compile(state, batch)`` compiles ahead of the first call.
    """
    loss_and_grads = make_loss_and_grads(graphdef, specs, mesh, cfg, check_vma=check_vma)
    lr_at = schedule(cfg.train)

    def update(arrays, batch):
        """One update. Non-finite guard: when the loss or the gradient norm is NaN or infinite, params,
        opt_state and step come back unchanged and metrics["skipped"] is 1.0 (else 0.0)."""
        params, opt_state, step = arrays
        loss, grads, count = accumulate(loss_and_grads, params, batch, cfg.train.grad_accum)
        grads = as_float32(grads)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, as_float32(params))
        new = (apply_updates(params, updates), new_opt_state, step + 1)
        # the non-finite guard: a step whose loss or gradient norm is NaN or infinite changes nothing
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_at(step), "tokens": count,
                   "skipped": (~ok).astype(jnp.float32)}
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, arrays), metrics

    def jitted(arrays):
        """The jitted update, its outputs pinned to the inputs' shardings (under ZeRO-1/2 XLA must
        all-gather the updated parameter slices back to the replicated layout)."""
        shardings = jax.tree.map(lambda x: x.sharding, arrays)
        return jax.jit(update, donate_argnums=0, out_shardings=(shardings, None))

    executable = [None]

    def arrays_of(state):
        return state.params, state.opt_state, state.step

    def run(state, batch):
        if executable[0] is None:
            executable[0] = jitted(arrays_of(state))
        (params, opt_state, step), metrics = executable[0](arrays_of(state), batch)
        return state._replace(params=params, opt_state=opt_state, step=step), metrics

    def lower(state, batch):
        return jitted(arrays_of(state)).lower(arrays_of(state), batch)

    def compile_for(state, batch):
        """Compile ahead of the first step (so step times exclude compilation); returns the executable."""
        executable[0] = lower(state, batch).compile()
        return executable[0]

    run.lower, run.compile = lower, compile_for
    return run


def as_float32(tree):
    """Every floating array of ``tree`` as float32 (what the optimizer sees, whatever the parameters' dtype)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def apply_updates(params, updates):
    """params + updates, added in float32 and stored back in each parameter's dtype."""
    return jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u).astype(p.dtype), params, updates)


def batch_sharding(mesh) -> NamedSharding:
    """Sharding of [B, T] batch arrays: B over ``data``, T over ``sequence``."""
    return NamedSharding(mesh, rules.BATCH)
