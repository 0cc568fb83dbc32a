"""Run metrics: metrics.jsonl and TensorBoard events (read back with tensorboard's own reader), resume
purging, the --profile window, the held-out split and the validation loss."""

import json

import jax
import numpy as np
import pytest

from lcjax.train.metrics import MetricsWriter, parse_profile


def _scalars(run_dir):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_and_jsonl_agree_and_resume_purges_redone_steps(tmp_path):
    w = MetricsWriter(tmp_path)
    for step in range(1, 5):
        w.write({"step": step, "loss": 5.0 - step, "grad_norm": None, "skipped": False})
    w.write({"step": 5, "loss": 0.5, "eval_loss": 1.5, "eval_perplexity": 4.48})
    w.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["eval_loss"] == 1.5
    scalars = _scalars(tmp_path)
    assert scalars["train/loss"] == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0), (5, 0.5)]
    assert scalars["eval/loss"] == [(5, 1.5)] and "train/grad_norm" not in scalars
    w = MetricsWriter(tmp_path, start=2)  # a resumed run redoes steps 3, 4 and 5
    w.write({"step": 3, "loss": 9.0})
    w.close()
    assert _scalars(tmp_path)["train/loss"] == [(1, 4.0), (2, 3.0), (3, 9.0)]


@pytest.mark.parametrize("text", ["3", "0:2", "5:4", "a:b", "1:2:3"])
def test_bad_profile_windows_are_refused(text):
    with pytest.raises(ValueError, match="--profile"):
        parse_profile(text)


def test_profile_window():
    assert parse_profile("2:4") == (2, 4) and parse_profile(None) is None


def test_held_out_split_is_disjoint_and_whole_documents():
    from lcjax.data import Dataset

    starts = np.array([0, 10, 25, 40, 70, 90], np.int64)
    tokens = np.arange(100, dtype=np.uint16)
    data = Dataset("test", None, tokens, starts, "k", {})
    train, held = data.split(0.25)
    assert len(train.tokens) + len(held.tokens) == 100 and held.tokens[0] == 70  # cut at a document start
    assert set(train.tokens.tolist()).isdisjoint(held.tokens.tolist())
    assert held.doc_starts.tolist() == [0, 20] and train.doc_starts.tolist() == [0, 10, 25, 40]
    assert len({data.key, train.key, held.key}) == 3
    with pytest.raises(ValueError, match="eval.holdout"):
        Dataset("one", None, tokens, starts[:1], "k", {}).split(0.1)


def test_validation_loss_equals_the_training_loss_on_the_same_batch():
    from lcjax import config as config_lib
    from lcjax.sharding.mesh import make_mesh
    from lcjax.train import step as step_lib
    from lcjax.train.state import init_state

    cfg = config_lib.load(None, ["mesh.sequence=4", "mesh.model=2", "model.n_layers=1", "model.d_model=32",
                                 "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64", "model.vocab_size=100",
                                 "data.seq_len=32", "data.global_batch=2", "attention.block_q=4",
                                 "attention.block_k=4"])
    mesh = make_mesh(1, 4, 2)
    graphdef, specs, _, state = init_state(cfg, mesh, {})
    rng = np.random.default_rng(0)
    raw = {k: rng.integers(0, 100, (2, 32)).astype(np.int32) for k in ("tokens", "labels")}
    raw.update(positions=np.tile(np.arange(32, dtype=np.int32), (2, 1)), segment_ids=np.ones((2, 32), np.int32),
               loss_mask=(rng.random((2, 32)) < 0.7).astype(np.int32))
    batch = {k: jax.device_put(v, step_lib.batch_sharding(mesh)) for k, v in raw.items()}
    total, count = step_lib.make_eval_loss(graphdef, specs, mesh, cfg)(state.params, batch)
    loss, _, train_count = jax.jit(step_lib.make_loss_and_grads(graphdef, specs, mesh, cfg))(state.params, batch)
    assert float(count) == float(train_count) == raw["loss_mask"].sum()
    np.testing.assert_allclose(float(total) / float(count), float(loss), rtol=1e-6)


def test_startup_summary_puts_xla_next_to_the_planner():
    from types import SimpleNamespace

    from lcjax import config as config_lib
    from lcjax.train.metrics import preset_for, startup_summary

    cfg = config_lib.load(None, ["mesh.sequence=4", "mesh.model=2", "train.fsdp=true"])
    ma = SimpleNamespace(argument_size_in_bytes=2e6, output_size_in_bytes=2e6, temp_size_in_bytes=6e6,
                         alias_size_in_bytes=2e6)
    lines = startup_summary(cfg, ma, platform="cpu", device_kind="cpu", n_params=123)
    assert len(lines) == 3 and "8 cpu devices" in lines[0] and "fsdp True" in lines[0]
    assert "XLA 8.0 MB compiled" in lines[1] and "planner" in lines[1] and "GPUs only" in lines[2]
    gpu = startup_summary(cfg, ma, platform="gpu", device_kind="NVIDIA H100 80GB HBM3", n_params=123)
    assert "h100 preset" in gpu[2] and "MFU" in gpu[2]
    assert preset_for("gpu", "NVIDIA H200") == "h200" and preset_for("gpu", "Tesla T4") == "h100"
