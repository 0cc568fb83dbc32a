"""End to end: train through the loop and the CLI on a small corpus (this repository's own source)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lcjax import config as config_lib
from lcjax.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
         "model.vocab_size=512", "data.tokenizer=bpe", "data.seq_len=128", "data.global_batch=2", "attention.block_q=16",
         "attention.block_k=16", "train.lr=3e-3", "train.warmup_steps=2", "train.min_lr_ratio=1.0", f"data.source=files:{ROOT / 'lcjax'}"]


def _cfg(tmp_path, *extra):
    return config_lib.load(ROOT / "configs/demo.yaml", [*SMALL, f"data.cache_dir={tmp_path / 'cache'}", *extra])


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    run_dir = tmp / "run"
    train(_cfg(tmp, "train.steps=12", "checkpoint.every=4"), run_dir, progress=False)
    return tmp, run_dir


def test_run_dir_contents_and_loss_drop(straight_run):
    _, run_dir = straight_run
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer" / "tokenizer.json").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert set(records[0]) >= {"step", "loss", "grad_norm", "lr", "tokens_per_sec", "step_time_s"}
    # the model starts at the uniform guess, ln V nats (init_std is small), and 12 updates take it well below
    # it: the last four losses average at least 0.3 nats under the first four (measured 6.17 -> 5.60)
    uniform, losses = math.log(512), [r["loss"] for r in records]
    assert abs(losses[0] - uniform) < 0.1, losses
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3 and losses[-1] < uniform - 0.4, losses
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [8, 12]  # every 4, keep 2
    assert config_lib.load(run_dir / "config.yaml").train.steps == 12


@pytest.mark.slow  # tests/train/test_reliability.py::test_killed_run_resumes_bitwise covers resume by default
def test_resume_reproduces_the_uninterrupted_run(straight_run, tmp_path):
    tmp, straight = straight_run
    run_dir = tmp_path / "run"
    train(_cfg(tmp, "train.steps=6", "checkpoint.every=3"), run_dir, progress=False)  # constant lr: same updates
    shutil.rmtree(run_dir / "checkpoints" / "6")  # as if killed after step 6 was logged but before it was saved
    result = train(_cfg(tmp, "train.steps=12", "checkpoint.every=3"), run_dir, resume=True, progress=False)
    assert result["step"] == 12
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 13))  # steps 4-6 were redone once, not logged twice
    assert _losses(run_dir) == _losses(straight)  # bitwise on CPU, float32, data order included
    with pytest.raises(ValueError, match="train.steps 12 must be greater than the newest checkpoint's step 12"):
        train(_cfg(tmp, "train.steps=12"), run_dir, resume=True, progress=False)


@pytest.mark.parametrize("mesh", [("8", "1"), pytest.param(("2", "4"), marks=pytest.mark.slow)])
def test_first_losses_do_not_depend_on_the_mesh(straight_run, tmp_path, mesh):
    tmp, straight = straight_run
    run_dir = tmp_path / "run"
    train(_cfg(tmp, "train.steps=4", "checkpoint.every=4", f"mesh.sequence={mesh[0]}", f"mesh.model={mesh[1]}"),
          run_dir, progress=False)
    np.testing.assert_allclose(_losses(run_dir), _losses(straight)[:4], rtol=1e-4)


def test_cli_trains_and_refuses_to_overwrite(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "lcjax.cli", "train", "--config", "configs/demo.yaml", "--run-dir", str(run_dir),
            "--no-progress", *[a for s in [*SMALL, f"data.cache_dir={tmp_path}", "train.steps=2"] for a in ("--set", s)]]
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "step 2 loss" in first.stdout
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert len(_losses(run_dir)) == 2
    resume = [sys.executable, "-m", "lcjax.cli", "train", "--run-dir", str(run_dir), "--resume", "--no-progress",
              "--set", "train.steps=3"]  # no --config: the run's own config.yaml
    more = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr
    assert len(_losses(run_dir)) == 3


def test_validation_tensorboard_profile_and_init_from_a_hugging_face_export(tmp_path):
    """eval.every logs a held-out loss; TensorBoard events and a profile are written; a run exported to
    Hugging Face's format and started from with --init-from (new seq_len, RoPE scaling and mesh) gives the
    first loss that starting from the lcjax run itself gives."""
    from lcjax.convert import hf_params, lcjax_to_hf

    src = tmp_path / "src"
    train(_cfg(tmp_path, "train.steps=4", "checkpoint.every=4", "eval.every=2", "eval.batches=1"), src,
          progress=False, profile=(2, 3))
    records = [json.loads(line) for line in (src / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert all(np.isfinite(r["eval_loss"]) and r["eval_perplexity"] > 1 for r in records if "eval_loss" in r)
    assert list((src / "tensorboard").glob("events.out.tfevents.*"))
    assert any(p.is_file() for p in (src / "profile").rglob("*"))
    hf = lcjax_to_hf(src, tmp_path / "hf")
    new = ("train.steps=1", "data.seq_len=256", "model.rope.type=linear", "model.rope.factor=2.0",
           "mesh.sequence=2", "mesh.model=4")
    train(_cfg(tmp_path, *new), tmp_path / "from_run", init_from=src, progress=False)
    train(_cfg(tmp_path, *new), tmp_path / "from_hf", init_from=hf, hf_params=hf_params, progress=False)
    np.testing.assert_allclose(_losses(tmp_path / "from_hf"), _losses(tmp_path / "from_run"), rtol=1e-5)
    assert _losses(tmp_path / "from_run")[0] < _losses(src)[0]  # trained weights, not a fresh init
