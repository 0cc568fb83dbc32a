"""A callable causal LM on a mesh: int32 tokens [B, T] → float32 logits [B, T, V] (for imported models,
parity checks and quick inspection; training never gathers logits)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from lcjax import config as config_lib
from lcjax.config import AttentionConfig, Config, MeshConfig, ModelConfig
from lcjax.model.llama import head_logits
from lcjax.model.sharded import model_settings, run_sharded
from lcjax.ops.layout import permute, unpermute
from lcjax.sharding import rules
from lcjax.sharding.mesh import AXES, make_mesh
from lcjax.train.state import model_graph, param_shardings


class CausalLM:
    """An lcjax LLaMA with its parameters placed on a mesh; ``model(tokens)`` gives logits.

    Attributes: ``cfg`` (the run Config: model, mesh, attention), ``mesh``, ``params`` (nnx.State of sharded
    jax arrays). Calling: ``tokens`` int [B, T] in natural order (any B and T: padded internally to the
    mesh and layout), optional ``positions`` int32 [B, T] (default 0 … T−1, increasing along T); returns
    float32 logits [B, T, V] (the true vocabulary, padding dropped), natural order. RoPE tables serve
    max(positions) + 1 positions (what transformers' dynamic NTK uses as the length). Matmuls run at
    "highest" precision (float32 even where a GPU would default to TF32), for parity checks.
    """

    def __init__(self, cfg: Config, params, mesh=None):
        self.cfg = cfg
        self.mesh = mesh if mesh is not None else make_mesh(cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model)
        self.graphdef, abstract = model_graph(cfg)
        self.specs, shardings = param_shardings(cfg, self.mesh, abstract)
        self.params = jax.device_put(params, shardings)
        self._fns = {}

    def __call__(self, tokens, positions=None):
        tokens = np.asarray(tokens, np.int32)
        b, t = tokens.shape
        positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)) if positions is None else positions
        positions = np.asarray(positions, np.int32)
        layout, sp, dp = self.cfg.attention.layout, self.cfg.mesh.sequence, self.cfg.mesh.data
        unit = 2 * sp if layout == "zigzag" else sp
        # pad T to the layout's unit (with later positions: causal, so earlier logits are unchanged) and B
        # to the data axis, and cut the padding off the logits
        pad_t, pad_b = -t % unit, -b % dp
        tail = positions[:, -1:] + 1 + np.arange(pad_t, dtype=np.int32)
        tokens = np.pad(np.pad(tokens, ((0, 0), (0, pad_t))), ((0, pad_b), (0, 0)))
        positions = np.pad(np.concatenate([positions, tail], axis=1), ((0, pad_b), (0, 0)), mode="edge")
        max_position = int(np.max(positions[:b, :t])) + 1
        if max_position not in self._fns:
            self._fns[max_position] = self._logits_fn(max_position)
        args = [permute(a, layout, sp) for a in (tokens, positions, np.ones_like(tokens))]
        with jax.default_matmul_precision("highest"):  # true float32 matmuls on GPUs too (no TF32)
            logits = self._fns[max_position](self.params, *args)
        return unpermute(logits, layout, sp)[:b, :t, : self.cfg.model.vocab_size]

    def _logits_fn(self, max_position: int):
        cfg, graphdef, run = self.cfg, self.graphdef, model_settings(self.cfg)

        def local(params, tokens, positions, segment_ids):
            model = nnx.merge(graphdef, params)
            h = model.hidden(tokens, positions, segment_ids, max_position=max_position, attn=run.attn,
                             axes=run.axes, dtype=run.dtype)
            return head_logits(h, model.head(run.axes, run.dtype))

        fn = run_sharded(local, self.mesh, in_specs=(self.specs, rules.BATCH, rules.BATCH, rules.BATCH),
                         out_specs=P(*AXES), kernel=cfg.attention.kernel)
        return jax.jit(fn)


def run_config(model: ModelConfig, mesh_shape=(1, 1, 1), **attention) -> Config:
    """A validated Config for running ``model`` on a (data, sequence, model) mesh; ``attention``: keys of
    AttentionConfig (impl, layout, kernel, ...; default with one sequence shard: local attention, contiguous
    layout). Raises ValueError naming the key and the rule."""
    mesh = MeshConfig(*mesh_shape)
    if mesh.sequence == 1:
        attention = {"impl": "local", "layout": "contiguous", **attention}
    cfg = Config(name="hf", mesh=mesh, model=model, attention=AttentionConfig(**attention))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=2 * mesh.sequence * 64,
                                                            global_batch=mesh.data))
    config_lib.validate(cfg)
    return cfg
