"""The one table from parameter and activation names to PartitionSpecs over (data, sequence, model).

Parameters are never sharded over ``data`` or ``sequence`` here (no FSDP yet): they are replicated there
and their gradients are summed over those axes once. Over ``model`` (TP): column-parallel weights split
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

# activations and batches: [B, T, ...] split over data and sequence
BATCH = P(DATA, SEQUENCE)


def _name(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_spec(path: tuple[str, ...], *, n_kv_heads: int, tp: int) -> P:
    """PartitionSpec of the parameter at ``path`` (e.g. ("layers", "wq")); raises KeyError if unknown."""
    name = path[-1]
    spec = _PARAM_RULES[name]
    if name in ("wk", "wv") and n_kv_heads < tp:
        spec = P(None, None)
    return P(None, *spec) if _STACKED in path else spec


def param_specs(params, *, n_kv_heads: int, tp: int):
    """The pytree of PartitionSpecs matching ``params`` (an nnx.State of the model's parameters)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: param_spec(tuple(p for p in _name(path) if p != "value"), n_kv_heads=n_kv_heads,
                                   tp=tp), params)


def replicated_axes(spec: P) -> tuple[str, ...]:
    """Mesh axes a tensor with ``spec`` is replicated over (its gradient must be summed over them)."""
    used = {a for entry in spec if entry is not None
            for a in (entry if isinstance(entry, tuple) else (entry,))}
    return tuple(a for a in AXES if a not in used)
