"""The one sharded-model runner: every "run the model on the mesh" (training step, evaluation, generation,
conversion) builds its ``shard_map`` here (docs/design.md, "One way through the house").

A per-shard function sees per-shard shapes (tokens [B/dp, T/sp], parameters split by
``lcjax.sharding.rules``) and calls collectives over the axis names of :class:`lcjax.model.llama.Axes`.
``check_vma`` is decided in one place, :func:`check_vma`: on (JAX tracks which values vary over which mesh
axes and transposes collectives exactly), except around Pallas kernels, whose interpret mode does not
track varying manual axes (lcjax/train/step.py explains how the gradients stay right either way).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from lcjax.config import Config
from lcjax.kernels.flash_attention.api import is_pallas
from lcjax.model.llama import Axes, AttentionSpec, MemorySpec, attention_spec
from lcjax.sharding import rules
from lcjax.sharding.mesh import AXES


def check_vma(kernel: str) -> bool:
    """``check_vma`` for a ``shard_map`` running attention kernel ``kernel``: False for Pallas kernels
    (interpret mode does not track varying manual axes), else True."""
    return not is_pallas(kernel)


def run_sharded(local: Callable, mesh, *, in_specs, out_specs, kernel: str, vma: bool | None = None) -> Callable:
    """``local`` (per-shard arrays -> per-shard results) as a function of global arrays on ``mesh``.

    in_specs / out_specs: PartitionSpec pytrees of the arguments and results (``rules.BATCH`` for [B, T]
    batch arrays, the model's ``specs`` for its parameters). kernel: the attention kernel the model runs
    (it decides ``check_vma``, :func:`check_vma`); ``vma`` overrides that decision (tests run both). Not
    jitted: callers jit the whole step.
    """
    vma = check_vma(kernel) if vma is None else vma
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=vma)


class ModelSettings(NamedTuple):
    """The static settings the per-shard model needs, built once from a config: attention (one
    :class:`AttentionSpec`, passed down unchanged to the kernel), mesh axis names, compute dtype (jnp
    dtype of activations and matmuls) and memory settings (remat policy and offload, MLP and loss tiles,
    sequence and head chunks)."""

    attn: AttentionSpec
    axes: Axes
    dtype: Any
    mem: MemorySpec


def model_settings(cfg: Config, *, fsdp: bool = False) -> ModelSettings:
    """The :class:`ModelSettings` of ``cfg``; ``fsdp``: parameters arrive split over data × sequence
    (``train.fsdp``), else they are whole on every data/sequence shard. ``Axes.sequence_tp`` follows
    ``train.sequence_parallel_tp``; :meth:`lcjax.model.llama.Llama.hidden` applies it where the shapes allow
    and the KV-cache decode turns it off (lcjax.model.decode)."""
    t = cfg.train
    axes = Axes(*AXES, fsdp=rules.ZERO_AXES if fsdp else (), sequence_tp=t.sequence_parallel_tp)
    mem = MemorySpec(remat=t.remat, mlp_tile=t.mlp_tile, loss_tile=t.loss_tile, offload=t.offload,
                     seq_chunk=t.seq_chunk, head_chunks=t.head_chunks)
    return ModelSettings(attention_spec(cfg), axes, jnp.dtype(t.dtype), mem)
