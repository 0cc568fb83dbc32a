"""Gradient accumulation (train.grad_accum): micro-batches inside the jitted step give the update of the
whole batch (float32), also when the micro-batches hold different numbers of target tokens."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from tests.conftest import relative_error
from lcjax import config as config_lib
from lcjax.ops.layout import permute
from lcjax.sharding.mesh import make_mesh
from lcjax.train import step as step_lib
from lcjax.train.state import init_state

B, T, V = 8, 32, 200


def _run(accum, mesh_shape, *extra):
    cfg = config_lib.load(None, [
        f"mesh.data={mesh_shape[0]}", f"mesh.sequence={mesh_shape[1]}", f"mesh.model={mesh_shape[2]}",
        "model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
        f"model.vocab_size={V}", f"data.seq_len={T}", f"data.global_batch={B}", "attention.block_q=8",
        "attention.block_k=8", "train.lr=1e-2", "train.warmup_steps=0", f"train.grad_accum={accum}", *extra])
    mesh = make_mesh(*mesh_shape)
    graphdef, specs, optimizer, state = init_state(cfg, mesh, {})
    rng = np.random.default_rng(0)
    stream = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    mask = (rng.random((B, T)) < np.linspace(0.2, 1.0, B)[:, None]).astype(np.int32)  # unequal token counts
    raw = dict(tokens=stream[:, :-1], labels=stream[:, 1:], positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
               segment_ids=np.ones((B, T), np.int32), loss_mask=mask)
    batch = {k: jax.device_put(permute(v, cfg.attention.layout, mesh_shape[1]), step_lib.batch_sharding(mesh))
             for k, v in raw.items()}
    step = step_lib.make_train_step(graphdef, specs, mesh, cfg, optimizer)
    state, metrics = step(state, batch)
    return jax.device_get(metrics), nnx.to_pure_dict(state.params)


@pytest.mark.parametrize("mesh_shape,extra", [((2, 2, 2), ()),
                                              pytest.param((1, 4, 2), ("train.fsdp=true",), marks=pytest.mark.slow)])
def test_accumulated_step_equals_the_large_batch(mesh_shape, extra):
    big_metrics, big_params = _run(1, mesh_shape, *extra)
    acc_metrics, acc_params = _run(4, mesh_shape, *extra)
    assert acc_metrics["tokens"] == big_metrics["tokens"]
    assert abs(acc_metrics["loss"] - big_metrics["loss"]) / big_metrics["loss"] <= 1e-5
    assert abs(acc_metrics["grad_norm"] - big_metrics["grad_norm"]) / big_metrics["grad_norm"] <= 1e-4
    assert max(jax.tree.leaves(jax.tree.map(relative_error, acc_params, big_params))) <= 1e-4


def test_accumulation_that_does_not_divide_the_data_shard_is_refused():
    with pytest.raises(ValueError, match="train.grad_accum 3 must divide"):
        config_lib.load(None, ["data.global_batch=8", "mesh.data=2", "train.grad_accum=3"])


def _grads(*extra):
    cfg = config_lib.load(None, ["mesh.data=2", "mesh.sequence=2", "mesh.model=2", "model.n_layers=2",
                                 "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
                                 f"model.vocab_size={V}", f"data.seq_len={T}", f"data.global_batch={B}", *extra])
    mesh = make_mesh(2, 2, 2)
    graphdef, specs, _, state = init_state(cfg, mesh, {})
    rng = np.random.default_rng(0)
    stream = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    raw = dict(tokens=stream[:, :-1], labels=stream[:, 1:], positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
               segment_ids=np.ones((B, T), np.int32), loss_mask=np.ones((B, T), np.int32))
    batch = {k: jax.device_put(permute(v, cfg.attention.layout, 2), step_lib.batch_sharding(mesh))
             for k, v in raw.items()}
    fn = jax.jit(step_lib.make_loss_and_grads(graphdef, specs, mesh, cfg))
    hlo = fn.lower(state.params, batch).as_text()  # StableHLO: CPU's compiler widens bf16 reductions
    loss, grads, _ = fn(state.params, batch)
    return float(loss), nnx.to_pure_dict(grads), hlo


@pytest.mark.parametrize("extra", [pytest.param((), marks=pytest.mark.slow), ("train.shard_optimizer=true",)])
def test_bfloat16_gradient_reduction_rounds_only_the_sum(extra):
    """train.grad_reduce_dtype=bfloat16: the data × sequence sums run in bfloat16 (half the bytes), so the
    gradients differ from float32's by bf16 rounding of the shards' partials and of the sum (≈ 2⁻⁸
    relative), not more; the forward is untouched."""
    f32_loss, f32_grads, f32_hlo = _grads(*extra)
    bf16_loss, bf16_grads, bf16_hlo = _grads("train.grad_reduce_dtype=bfloat16", *extra)
    assert bf16_loss == f32_loss
    errors = jax.tree.leaves(jax.tree.map(relative_error, bf16_grads, f32_grads))
    assert 0 < max(errors) <= 1e-2, errors  # rounded (not float32), but only by bf16's rounding
    kind = "reduce_scatter" if extra else "all_reduce"
    count = lambda hlo: len(re.findall(rf'stablehlo\.{kind}"[^\n]*\n\s*\^bb0\(%\w+: tensor<bf16>', hlo))
    assert count(bf16_hlo) > 0 and count(f32_hlo) == 0


def test_gradient_reduction_dtype_is_refused_unless_a_float():
    with pytest.raises(ValueError, match="train.grad_reduce_dtype 'int8' must be one of float32, bfloat16"):
        config_lib.load(None, ["train.grad_reduce_dtype=int8"])
