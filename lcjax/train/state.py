"""Creating the sharded train state: parameters initialised from the seed as on one device, then placed
on the mesh by the sharding table; optimizer state alongside."""

from __future__ import annotations

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
from lcjax.train.step import TrainState


def model_graph(cfg: Config):
    """(graphdef, abstract params) of the model, without allocating anything."""
    abstract = nnx.eval_shape(lambda: Llama(cfg.model, nnx.Rngs(cfg.train.seed)))
    return nnx.split(abstract)


def param_shardings(cfg: Config, mesh, abstract_params):
    """(PartitionSpec tree, NamedSharding tree) of the parameters on ``mesh``."""
    specs = rules.param_specs(abstract_params, n_kv_heads=cfg.model.n_kv_heads, tp=mesh.shape["model"])
    return specs, jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def init_params(cfg: Config, shardings):
    """Parameters from ``train.seed``, created directly in their shards (values independent of the mesh)."""
    return jax.jit(lambda: nnx.split(Llama(cfg.model, nnx.Rngs(cfg.train.seed)))[1],
                   out_shardings=shardings)()


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
    """Shardings of the optimizer state: moments like their parameters, scalars replicated on the mesh."""
    replicated = NamedSharding(next(iter(jax.tree.leaves(shardings))).mesh, PartitionSpec())
    abstract = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract, shardings,
                                 transform_non_params=lambda _: replicated)


def init_state(cfg: Config, mesh, data_state: dict):
    """(graphdef, specs, optimizer, TrainState) for a fresh run on ``mesh``."""
    graphdef, abstract = model_graph(cfg)
    specs, shardings = param_shardings(cfg, mesh, abstract)
    params = init_params(cfg, shardings)
    optimizer = make_optimizer(cfg.train, params)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params, shardings))(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, PartitionSpec()))
    state = TrainState(params=params, opt_state=opt_state, step=step, data_state=data_state_arrays(data_state))
    return graphdef, specs, optimizer, state
