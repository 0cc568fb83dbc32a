"""Packed documents end to end: a window of packed documents from the data loader, run through the sharded
model on several meshes, layouts and attention impls, gives every document the per-token losses it gets
when run alone on one device at its own length (float32, relative error <= 1e-5); the training loss is
the mean of exactly those losses."""

import jax
import numpy as np
import pytest
from flax import nnx

from tests.conftest import relative_error
from lcjax import config as config_lib
from lcjax.data.loader import LoaderSpec, make_loader
from lcjax.model.llama import Axes, attention_spec
from lcjax.model.sharded import run_sharded
from lcjax.ops.layout import unpermute
from lcjax.sharding import rules
from lcjax.sharding.mesh import AXES, make_mesh
from lcjax.train import step as step_lib
from lcjax.train.state import init_state

V, T, B = 300, 64, 2
EOS = V - 1
DOC_LENGTHS = [23, 30, 40, 17, 25, 9]  # with EOS; 144 tokens = 2 windows of 64 (+1): documents cross windows


def _stream():
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(0, EOS, n - 1), EOS) for n in DOC_LENGTHS]
    starts = np.concatenate([[0], np.cumsum(DOC_LENGTHS[:-1])]).astype(np.int64)
    return np.concatenate(docs).astype(np.uint16), starts


def _config(mesh, *extra, seq_len=T):
    sets = [f"mesh.data={mesh[0]}", f"mesh.sequence={mesh[1]}", f"mesh.model={mesh[2]}", "model.n_layers=2",
            "model.d_model=64", "model.n_heads=8", "model.n_kv_heads=2", "model.d_ff=128",
            f"model.vocab_size={V}", f"data.seq_len={seq_len}", f"data.global_batch={B}", "attention.block_q=8",
            "attention.block_k=8", *extra]
    return config_lib.load(None, sets)


def _token_losses_fn(cfg, mesh, graphdef, specs, seq_len):
    """jit(shard_map) of Llama.token_losses: params, batch [B, T] in layout order -> losses [B, T]."""
    attn = attention_spec(cfg)

    def local(params, batch):
        model = nnx.merge(graphdef, params)
        return model.token_losses(batch["tokens"], batch["labels"], batch["positions"], batch["segment_ids"],
                                  max_position=seq_len, attn=attn, axes=Axes(*AXES))

    fields = ("tokens", "labels", "positions", "segment_ids")
    return jax.jit(run_sharded(local, mesh, in_specs=(specs, {k: rules.BATCH for k in fields}),
                               out_specs=rules.BATCH, kernel=cfg.attention.kernel))


def _batch(cfg):
    stream, starts = _stream()
    spec = LoaderSpec(seq_len=T, global_batch=B, seed=0, layout=cfg.attention.layout, num_shards=cfg.mesh.sequence,
                      prefetch=0)
    lo = make_loader(stream, spec, doc_starts=starts)
    batch = next(lo)
    lo.close()
    return batch


@pytest.fixture(scope="module")
def alone():
    """fn(tokens [L], labels [L]) -> per-token losses [L] of one document alone on one device (impl local)."""
    cfg = _config((1, 1, 1), "attention.impl=local", "attention.layout=contiguous")
    mesh = make_mesh(1, 1, 1)
    graphdef, specs, _, state = init_state(cfg, mesh, {})
    done = {}  # the same documents recur in every case: compute each once

    def run(tokens, labels):
        key = (tokens.tobytes(), labels.tobytes())
        if key not in done:
            n = len(tokens)
            fn = _token_losses_fn(cfg, mesh, graphdef, specs, n)
            batch = {"tokens": tokens[None], "labels": labels[None],
                     "positions": np.arange(n, dtype=np.int32)[None], "segment_ids": np.ones((1, n), np.int32)}
            done[key] = np.asarray(fn(state.params, batch))[0]
        return done[key]
    return run


def _segments(natural):
    """(row, indices) of every segment of every row of a natural-order batch."""
    for row in range(natural["segment_ids"].shape[0]):
        seg = natural["segment_ids"][row]
        for s in np.unique(seg):
            yield row, np.flatnonzero(seg == s)


def _case(mesh, *extra, slow=False):
    name = "x".join(map(str, mesh)) + "-" + "-".join(e.split("=")[1] for e in extra)
    return pytest.param(mesh, extra, id=name, marks=[pytest.mark.slow] if slow else [])


CASES = [_case((1, 4, 2), "attention.layout=zigzag"),
         _case((1, 2, 4), "attention.layout=striped"),
         _case((2, 2, 2), "attention.layout=contiguous", slow=True),
         _case((1, 8, 1), "attention.impl=ulysses", "attention.layout=zigzag", slow=True),
         _case((1, 8, 1), "attention.impl=hybrid", "attention.ulysses_size=2", "attention.layout=striped", slow=True),
         _case((1, 4, 2), "attention.kernel=pallas", slow=True)]


@pytest.mark.parametrize("mesh_shape, extra", CASES)
def test_packed_documents_get_the_losses_they_get_alone(mesh_shape, extra, alone):
    cfg = _config(mesh_shape, *extra)
    mesh = make_mesh(*mesh_shape)
    graphdef, specs, _, state = init_state(cfg, mesh, {})
    batch = _batch(cfg)
    sharding = step_lib.batch_sharding(mesh)
    fn = _token_losses_fn(cfg, mesh, graphdef, specs, T)
    inputs = {k: jax.device_put(batch[k], sharding) for k in ("tokens", "labels", "positions", "segment_ids")}
    losses = unpermute(np.asarray(fn(state.params, inputs)), cfg.attention.layout, mesh_shape[1], axis=1)
    natural = {k: unpermute(v, cfg.attention.layout, mesh_shape[1], axis=1) for k, v in batch.items()}
    segments = list(_segments(natural))
    assert len(segments) >= 6  # both windows hold several documents, and a document crosses the windows
    for row, idx in segments:
        np.testing.assert_array_equal(natural["positions"][row, idx], np.arange(len(idx)))
        keep = natural["loss_mask"][row, idx] == 1
        assert keep[:-1].all()  # only a document's last input (EOS) may have a masked label
        if idx[-1] < T - 1:
            assert not keep[-1]  # ...and it has one when the next document follows in the window
        want = alone(natural["tokens"][row, idx], natural["labels"][row, idx])
        assert relative_error(losses[row, idx][keep], want[keep]) <= 1e-5, (row, idx)


@pytest.mark.slow
def test_training_loss_is_the_mean_of_the_documents_alone(alone):
    cfg = _config((1, 4, 2), "attention.layout=zigzag")
    mesh = make_mesh(1, 4, 2)
    graphdef, specs, _, state = init_state(cfg, mesh, {})
    batch = _batch(cfg)
    fn = jax.jit(step_lib.make_loss_and_grads(graphdef, specs, mesh, cfg))
    loss, _, count = fn(state.params, {k: jax.device_put(v, step_lib.batch_sharding(mesh)) for k, v in batch.items()})
    natural = {k: unpermute(v, "zigzag", 4, axis=1) for k, v in batch.items()}
    kept = []
    for row, idx in _segments(natural):
        keep = natural["loss_mask"][row, idx] == 1
        kept.append(alone(natural["tokens"][row, idx], natural["labels"][row, idx])[keep])
    kept = np.concatenate(kept)
    assert int(count) == len(kept) == B * T - np.sum(natural["loss_mask"] == 0)
    assert abs(float(loss) - kept.mean()) / kept.mean() <= 1e-5


def test_without_segment_ids_documents_would_see_each_other(alone):
    """The parity above is not vacuous: with one segment per window, later documents' losses change."""
    cfg = _config((1, 4, 2), "attention.layout=zigzag")
    mesh = make_mesh(1, 4, 2)
    graphdef, specs, _, state = init_state(cfg, mesh, {})
    batch = _batch(cfg)
    batch["segment_ids"] = np.ones_like(batch["segment_ids"])
    fn = _token_losses_fn(cfg, mesh, graphdef, specs, T)
    inputs = {k: jax.device_put(batch[k], step_lib.batch_sharding(mesh))
              for k in ("tokens", "labels", "positions", "segment_ids")}
    losses = unpermute(np.asarray(fn(state.params, inputs)), "zigzag", 4, axis=1)
    natural = {k: unpermute(v, "zigzag", 4, axis=1) for k, v in batch.items()}
    seg = unpermute(_batch(cfg)["segment_ids"], "zigzag", 4, axis=1)
    idx = np.flatnonzero(seg[0] == 2)
    want = alone(natural["tokens"][0, idx], natural["labels"][0, idx])
    assert relative_error(losses[0, idx], want) > 1e-3
