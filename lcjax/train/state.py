"""Creating the sharded train state: parameters initialised from the seed as on one device (float32, then
stored in ``train.param_dtype``), placed on the mesh by the sharding table; float32 optimizer state
alongside, split over data × sequence under FSDP or ZeRO-1/2 (``train.fsdp``, ``train.shard_optimizer``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lcjax.config import Config
from lcjax.model.llama import Llama
from lcjax.sharding import rules
from lcjax.train.optim import make_optimizer
from lcjax.train.step import as_float32, grad_specs_of


class TrainState(NamedTuple):
    """The whole training state, one pytree: model parameters (nnx.State of global sharded arrays),
    optimizer state, the number of optimizer updates applied (int32 scalar), and the data iterator's state
    (dict of int64 scalars, passed through the step untouched; the loop refreshes it). Built here
    (:func:`init_state`, :func:`abstract_state`); the step (lcjax.train.step) maps it to its successor."""

    params: Any
    opt_state: Any
    step: Any
    data_state: Any


def model_graph(cfg: Config):
    """(graphdef, abstract params) of the model, without allocating anything."""
    abstract = nnx.eval_shape(lambda: Llama(cfg.model, nnx.Rngs(cfg.train.seed)))
    return nnx.split(abstract)


def param_shardings(cfg: Config, mesh, abstract_params):
    """(PartitionSpec tree, NamedSharding tree) of the parameters on ``mesh`` (split over data × sequence
    too under ``train.fsdp``)."""
    specs = rules.param_specs(abstract_params, n_kv_heads=cfg.model.n_kv_heads, tp=mesh.shape["model"],
                              zero=cfg.train.fsdp)
    return specs, _named(mesh, specs)


def _named(mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_params(cfg: Config, shardings):
    """Parameters from ``train.seed`` in ``train.param_dtype``, created directly in their shards (values
    independent of the mesh: drawn in float32, then cast)."""
    dtype = jnp.dtype(cfg.train.param_dtype)
    make = lambda: jax.tree.map(lambda x: x.astype(dtype),
                                nnx.split(Llama(cfg.model, nnx.Rngs(cfg.train.seed)))[1])
    return jax.jit(make, out_shardings=shardings)()


def abstract_params(cfg: Config):
    """The parameters' ShapeDtypeStructs (``train.param_dtype``), nothing allocated."""
    graphdef, abstract = model_graph(cfg)
    dtype = jnp.dtype(cfg.train.param_dtype)
    return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), abstract)


def data_state_arrays(state: dict) -> dict:
    """The data loader's JSON-like state as a flat dict of int64 numpy scalars (a checkpointable pytree)."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": np.int64(v) for k, v in value.items()})
        else:
            flat[key] = np.int64(value)
    return flat


def data_state_dict(arrays: dict) -> dict:
    """Inverse of :func:`data_state_arrays`."""
    state: dict = {}
    for key, value in arrays.items():
        head, _, tail = key.partition(".")
        if tail:
            state.setdefault(head, {})[tail] = int(value)
        else:
            state[head] = int(value)
    return state


def opt_state_shardings(optimizer, params, shardings):
    """Shardings of the optimizer state: moments like ``shardings`` (those of the gradients), scalars
    replicated on the mesh."""
    replicated = NamedSharding(next(iter(jax.tree.leaves(shardings))).mesh, PartitionSpec())
    abstract = jax.eval_shape(lambda p: optimizer.init(as_float32(p)), params)
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract, shardings,
                                 transform_non_params=lambda _: replicated)


def init_opt_state(cfg: Config, mesh, optimizer, params, specs):
    """The optimizer state of ``params``: float32, laid out like the gradients (:func:`grad_specs_of`)."""
    shardings = opt_state_shardings(optimizer, params, _named(mesh, grad_specs_of(specs, cfg, mesh)))
    return jax.jit(lambda p: optimizer.init(as_float32(p)), out_shardings=shardings)(params)


def abstract_state(cfg: Config, mesh):
    """(graphdef, specs, optimizer, TrainState of ShapeDtypeStructs with shardings): the state of a fresh
    run on ``mesh`` without allocating anything (for compiling ahead of time and for restoring)."""
    graphdef, abstract = abstract_params(cfg)
    specs, shardings = param_shardings(cfg, mesh, abstract)
    sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    params = jax.tree.map(sds, abstract, shardings)
    optimizer = make_optimizer(cfg.train, params)
    opt_shardings = opt_state_shardings(optimizer, params, _named(mesh, grad_specs_of(specs, cfg, mesh)))
    opt_state = jax.tree.map(sds, jax.eval_shape(lambda p: optimizer.init(as_float32(p)), params), opt_shardings)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    return graphdef, specs, optimizer, TrainState(params, opt_state, step, {})


def init_state(cfg: Config, mesh, data_state: dict):
    """(graphdef, specs, optimizer, TrainState) for a fresh run on ``mesh``."""
    graphdef, abstract = model_graph(cfg)
    specs, shardings = param_shardings(cfg, mesh, abstract)
    params = init_params(cfg, shardings)
    optimizer = make_optimizer(cfg.train, params)
    opt_state = init_opt_state(cfg, mesh, optimizer, params, specs)
    step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, PartitionSpec()))
    state = TrainState(params=params, opt_state=opt_state, step=step, data_state=data_state_arrays(data_state))
    return graphdef, specs, optimizer, state
