"""How teams run training (issue 23): --resume auto for requeued jobs, log lines without a terminal, measured
MFU, W&B offline, the version, a quiet CUDA plugin on hosts without a GPU, and a tokenizer export that
transformers.AutoTokenizer loads."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import lcjax
from lcjax import config as config_lib
from lcjax.cli import main
from lcjax.train.logs import StepReporter, log_line, measured_mfu, model_flops_per_token, use_bar
from lcjax.train.resume import CONTINUE, DONE, FRESH, auto_resume

ROOT = Path(__file__).resolve().parents[2]


def test_version_flag_and_package_files(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lcjax {lcjax.__version__}"
    assert lcjax.__version__.count(".") == 2
    assert "Apache License" in (ROOT / "LICENSE").read_text() and (ROOT / "lcjax" / "py.typed").is_file()
    assert f"## {lcjax.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_cuda_plugin_is_kept_quiet_only_on_hosts_without_a_gpu():
    probe = dict(has_cuda_plugin=True, has_gpu=False, jax_started=False)
    env = {}
    assert lcjax.cpu_unless_gpu(env, **probe) and env == {"JAX_PLATFORMS": "cpu"}
    for change in ({"has_gpu": True}, {"has_cuda_plugin": False}, {"jax_started": True}):
        env = {}
        assert not lcjax.cpu_unless_gpu(env, **{**probe, **change}) and env == {}
    env = {"JAX_PLATFORMS": "cuda"}
    assert not lcjax.cpu_unless_gpu(env, **probe) and env == {"JAX_PLATFORMS": "cuda"}


def _write_run(run_dir: Path, cfg, steps=()):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))
    for step in steps:
        (run_dir / "checkpoints" / str(step)).mkdir(parents=True)


def test_resume_auto_decides_from_the_run_dir(tmp_path):
    cfg = config_lib.load(None, ["train.steps=10"])
    assert auto_resume(tmp_path / "missing", cfg) == FRESH
    (tmp_path / "empty").mkdir()
    assert auto_resume(tmp_path / "empty", cfg) == FRESH
    _write_run(tmp_path / "run", cfg, [4])
    assert auto_resume(tmp_path / "run", cfg) == CONTINUE
    more = config_lib.load(None, ["train.steps=12", "mesh.data=2", "data.global_batch=2", "log.every=5"])
    other_batch = config_lib.load(None, ["train.steps=12", "data.global_batch=2"])
    with pytest.raises(ValueError, match=r"holds another run \(data.global_batch: 1 -> 2\)"):
        auto_resume(tmp_path / "run", other_batch)
    _write_run(tmp_path / "run2", config_lib.load(None, ["mesh.data=2", "data.global_batch=2"]), [4])
    assert auto_resume(tmp_path / "run2", more) == CONTINUE  # train.steps, mesh and logging may change
    _write_run(tmp_path / "done", cfg, [4, 10])
    assert auto_resume(tmp_path / "done", cfg) == DONE
    with pytest.raises(ValueError, match=r"train.seed: 0 -> 1"):
        auto_resume(tmp_path / "run", config_lib.load(None, ["train.seed=1"]))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty and holds no lcjax run .*found notes.txt"):
        auto_resume(tmp_path / "other", cfg)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        auto_resume(tmp_path / "file", cfg)


def test_log_lines_mfu_and_the_bar_choice(capsys):
    record = {"step": 4, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 12345.6, "mfu": 0.4123,
              "device_memory_gb": 12.345, "skipped": False}
    assert log_line(record, 10, 75) == ("step 4/10 loss 2.5000 lr 1.000e-03 grad_norm 0.500 tokens/s 12,346 "
                                        "mfu 41.2% mem 12.35 GB eta 1m15s")
    assert log_line({**record, "loss": None, "mfu": None, "device_memory_gb": None}, 10).startswith(
        "step 4/10 loss null lr")
    # PaLM MFU of LLaMA-2-7B at 32k on 8 H100 (bf16 989 TF/s) at 3,000 tokens/s per device
    flops = model_flops_per_token(config_lib.load(ROOT / "configs/models/llama2_7b.yaml").model, 32768)
    assert flops == 91_183_669_248  # lcjax.plan.flops: 6N + 12·L·n_h·d_h·T
    assert measured_mfu(24_000, flops, 8, 989e12) == pytest.approx(3000 * flops / 989e12)
    assert measured_mfu(24_000, flops, 8, None) is None and measured_mfu(None, flops, 8, 1e12) is None
    with open(os.devnull, "w") as not_a_terminal:
        assert not use_bar(True, stream=not_a_terminal) and not use_bar(False)
    reporter = StepReporter(10, 0, 3, bar=False)
    for step in range(1, 11):
        reporter.report({**record, "step": step})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" lcjax: step ")[1].split("/")[0] for line in lines] == ["3", "6", "9", "10"]


def test_wandb_needs_its_extra(monkeypatch):
    from lcjax.train.wandb_log import check_available

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ValueError, match=r"^log.wandb.project 'p': W&B logging needs the wandb package"):
        check_available(config_lib.load(None, ["log.wandb.project=p"]))
    check_available(config_lib.load(None))


def test_wandb_offline_writes_a_run_under_the_run_dir_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lcjax.train.wandb_log import ID_FILE, WandbSink

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config_lib.load(None, ["log.wandb.project=lcjax-test", "log.wandb.mode=offline"])
    sink = WandbSink(cfg, tmp_path)
    sink.write({"step": 1, "loss": 2.0, "mfu": None})
    sink.close()
    run_id = (tmp_path / ID_FILE).read_text().strip()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def test_exported_tokenizer_loads_with_auto_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lcjax.convert.tokenizer import complete_tokenizer_files
    from lcjax.data.tokenizer import train_bpe

    tok = train_bpe(["hello world, long context " * 50, "ring attention in jax " * 50], 300)
    tok.save(tmp_path)
    assert complete_tokenizer_files(tmp_path, max_length=4096) == tok.eos_id
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "hello ring world"
    assert hf(text)["input_ids"] == tok.encode_batch([text])[0] and hf.decode(hf(text)["input_ids"]) == text
    assert hf.eos_token_id == tok.eos_id and hf.model_max_length == 4096


@pytest.mark.parametrize("requeues", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_requeued_job_with_resume_auto_on_a_jsonl_parquet_mixture(tmp_path, capsys, requeues):
    """The same command again and again, as a requeued SLURM job runs it: a fresh start (2 steps), with
    ``requeues`` 2 a continuation with more steps (to 4), then nothing left to do (exit 0); one metrics
    record per step, a log line per step on stdout without a bar; another run in the same dir is refused (exit 2)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "ring", "zigzag", "mesh"]
    doc = lambda: " ".join(rng.choice(words, rng.integers(10, 60)))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": doc()}) + "\n" for _ in range(60)))
    pq.write_table(pa.table({"body": [doc() for _ in range(60)]}), tmp_path / "b.parquet")
    mixture = (f'data.mixture=[{{source: "jsonl:{tmp_path / "a.jsonl"}", weight: 2}}, '
               f'{{source: "parquet:{tmp_path / "b.parquet"}", weight: 1}}]')
    sets = ["mesh.data=8", "mesh.sequence=1", "mesh.model=1", "model.n_layers=1", "model.d_model=32",
            "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64", "model.vocab_size=257", "data.tokenizer=bytes",
            "data.seq_len=32", "data.global_batch=8", "data.text_field=body", mixture, "attention.block_q=16",
            "attention.block_k=16", f"data.cache_dir={tmp_path / 'cache'}", "checkpoint.every=100"]
    run = lambda *more: main(["train", "--config", str(ROOT / "configs/demo.yaml"), "--run-dir", str(tmp_path / "run"),
                              "--resume", "auto", "--no-progress", *[a for s in [*sets, *more] for a in ("--set", s)]])
    assert run("train.steps=2") == 0
    first = capsys.readouterr()
    assert [line.split(" lcjax: ")[1].split(" loss")[0] for line in first.out.splitlines() if "/2 loss" in line] == \
        ["step 1/2", "step 2/2"]
    assert first.err == ""  # stderr holds errors only
    steps = 2 * requeues
    assert run(f"train.steps={steps}") == 0 and run(f"train.steps={steps}") == 0
    assert "nothing to do" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all("mfu" in r and "device_memory_gb" in r for r in records)
    assert run(f"train.steps={steps}", "train.seed=7") == 2
    assert "holds another run (train.seed: 0 -> 7)" in capsys.readouterr().err
