"""The one table from parameter and activation names to PartitionSpecs over (data, sequence, model).

Without ZeRO, parameters are replicated over ``data`` and ``sequence`` and their gradients are summed over
those axes once. With ZeRO (``zero=True``: FSDP parameters, or sharded gradients and optimizer state) every
matrix is also split along its d_model dimension over ``data`` × ``sequence`` (:data:`ZERO_AXES`); norms
stay replicated (they are tiny). Over ``model`` (TP): column-parallel weights split
their output dimension, row-parallel weights their input dimension, the embedding and output head the
vocabulary; norms are replicated. K/V projections are split by kv head when n_kv_heads >= tp and
replicated (stored once, gradients summed) when n_kv_heads < tp. Stacked layer weights have a leading
L axis that is never sharded.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from lcjax.sharding.mesh import AXES

DATA, SEQUENCE, MODEL = AXES

_PARAM_RULES = {  # name -> spec of the unstacked parameter
    "embed": P(MODEL, None),
    "lm_head": P(None, MODEL),
    "final_norm": P(None),
    "attn_norm": P(None),
    "mlp_norm": P(None),
    "wq": P(None, MODEL),
    "wk": P(None, MODEL),
    "wv": P(None, MODEL),
    "wo": P(MODEL, None),
    "w_gate": P(None, MODEL),
    "w_up": P(None, MODEL),
    "w_down": P(MODEL, None),
}
_STACKED = "layers"

# ZeRO / FSDP: the mesh axes parameters are sharded over besides ``model``, and the dimension of each
# (unstacked) matrix that holds d_model, the one they split (d_model is never split over ``model``)
ZERO_AXES = (DATA, SEQUENCE)
D_MODEL_DIM = {"embed": 1, "lm_head": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w_gate": 0, "w_up": 0,
               "w_down": 1}

# activations and batches: [B, T, ...] split over data and sequence
BATCH = P(DATA, SEQUENCE)


def _name(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_spec(path: tuple[str, ...], *, n_kv_heads: int, tp: int, zero: bool = False) -> P:
    """PartitionSpec of the parameter at ``path`` (e.g. ("layers", "wq")); raises KeyError if unknown.

    ``zero``: also split matrices along d_model over :data:`ZERO_AXES` (FSDP / ZeRO layout).
    """
    name = path[-1]
    entries = list(_PARAM_RULES[name])
    if name in ("wk", "wv") and n_kv_heads < tp:
        entries = [None, None]
    if zero and name in D_MODEL_DIM:
        entries[D_MODEL_DIM[name]] = ZERO_AXES
    return P(None, *entries) if _STACKED in path else P(*entries)


def param_specs(params, *, n_kv_heads: int, tp: int, zero: bool = False):
    """The pytree of PartitionSpecs matching ``params`` (an nnx.State of the model's parameters, or a
    pytree of PartitionSpecs of the same structure)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: param_spec(tuple(p for p in _name(path) if p != "value"), n_kv_heads=n_kv_heads,
                                   tp=tp, zero=zero), params, is_leaf=lambda x: isinstance(x, P))


def is_stacked(path) -> bool:
    """Whether the parameter at pytree ``path`` is one of the stacked layer weights [L, ...]."""
    return _STACKED in _name(path)


def layer_grad_axes(specs) -> tuple[tuple[str, ...], ...]:
    """For each stacked layer parameter of ``specs`` (a pytree of PartitionSpecs like the parameters), in
    ``jax.tree.leaves`` order of its ``layers`` subtree: the mesh axes its gradient is summed over
    (:func:`replicated_axes`)."""
    return tuple(replicated_axes(s) for s in jax.tree.leaves(specs[_STACKED], is_leaf=lambda x: isinstance(x, P)))


def zero_dim(spec: P, zero_spec: P) -> int | None:
    """The dimension ``zero_spec`` splits over :data:`ZERO_AXES` where ``spec`` does not (None if none)."""
    for dim, (a, b) in enumerate(zip(spec, zero_spec)):
        if a != b:
            return dim
    return None


def replicated_axes(spec: P) -> tuple[str, ...]:
    """Mesh axes a tensor with ``spec`` is replicated over (its gradient must be summed over them)."""
    used = {a for entry in spec if entry is not None
            for a in (entry if isinstance(entry, tuple) else (entry,))}
    return tuple(a for a in AXES if a not in used)
