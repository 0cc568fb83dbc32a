"""Configs: every YAML loads; bad input gives one clear line (ValueError here, exit 2 from the CLI)."""

import subprocess
import sys
from pathlib import Path

import pytest

from lcjax import config as config_lib

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = config_lib.load(path)
    assert cfg.model.n_layers >= 1 and cfg.data.seq_len >= 1


def test_overrides_and_keys_read():
    cfg = config_lib.load(ROOT / "configs/demo.yaml", ["model.n_layers=2", "attention.window=128",
                                                        "train.dtype=bfloat16", "checkpoint.keep=3"])
    assert (cfg.model.n_layers, cfg.attention.window, cfg.train.dtype, cfg.checkpoint.keep) == (2, 128, "bfloat16", 3)
    assert (cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model) == (1, 4, 2)
    assert cfg.name == "demo"
    assert config_lib.load(None, ["mesh.sequence=2"]).mesh.sequence == 2


def test_yaml_round_trip(tmp_path):
    cfg = config_lib.load(ROOT / "configs/demo.yaml", ["model.tie_embeddings=true"])
    (tmp_path / "c.yaml").write_text(config_lib.to_yaml(cfg))
    assert config_lib.load(tmp_path / "c.yaml") == cfg


def test_attention_blocks_default_to_the_kernels_own_tiles():
    cfg = config_lib.load(ROOT / "configs/demo.yaml", ["attention.block_q=null", "attention.block_k=null",
                                                       "attention.kernel=pallas_triton"])
    assert (cfg.attention.block_q, cfg.attention.block_k, cfg.attention.kernel) == (None, None, "pallas_triton")
    assert config_lib.AttentionConfig().block_q is None and config_lib.AttentionConfig().block_k is None


def test_padded_vocab():
    assert config_lib.padded_vocab(300) == 384 and config_lib.padded_vocab(4096) == 4096


@pytest.mark.parametrize("sets,message", [
    (["model.foo=1"], "model.foo: unknown config key"),
    (["model.n_layers=abc"], "model.n_layers"),
    (["mesh.model=4", "model.n_heads=2"], "model.n_heads 2 must be divisible by mesh.model = 4"),
    (["model.n_kv_heads=3"], "model.n_heads 8 must be divisible by model.n_kv_heads = 3"),
    (["attention.layout=spiral"], "attention.layout 'spiral' must be one of"),
    (["attention.impl=local"], "attention.impl 'local' needs mesh.sequence = 1"),
    (["train.dtype=float16"], "train.dtype 'float16' must be one of"),
    (["mesh.data=2"], "data.global_batch 1 must be divisible by mesh.data = 2"),
    (["mesh.model=3", "model.d_model=384", "model.n_heads=6", "model.n_kv_heads=6", "model.vocab_size=4096"],
     "mesh.model 3 must divide the padded vocabulary 4096"),
    (["train.steps=0"], "train.steps 0 must be >= 1"),
    (["attention.impl=hybrid"], "attention.ulysses_size None must divide mesh.sequence = 4 for impl 'hybrid'"),
    (["attention.impl=hybrid", "attention.ulysses_size=3"], "attention.ulysses_size 3 must divide mesh.sequence"),
    (["attention.ulysses_size=2"], "attention.ulysses_size is only used by attention.impl 'hybrid'"),
    (["attention.impl=allgather", "attention.ulysses_size=3"],
     "attention.ulysses_size 3 must divide mesh.sequence = 4 for impl 'allgather'"),
    (["attention.impl=allgather", "attention.ulysses_size=4", "model.n_heads=6", "model.n_kv_heads=6",
      "model.d_model=384"], "splits the 3 query heads per model shard over 4 shards"),
    (["attention.impl=ulysses", "mesh.sequence=2", "mesh.model=1", "model.n_heads=6", "model.n_kv_heads=3",
      "model.d_model=384"], "the 3 kv heads per model shard and the 2 Ulysses shards"),
    (["attention.impl=ulysses", "mesh.sequence=8", "mesh.model=1", "model.n_heads=4", "model.n_kv_heads=4",
      "model.d_model=256"], "model.n_heads / mesh.model must be divisible by 8"),
    (["attention.kernel=cuda"], "attention.kernel 'cuda' must be one of xla, pallas"),
    (["attention.window=0"], "attention.window 0 must be >= 1"),
    (["attention.block_q=0"], "attention.block_q 0 must be >= 1"),
    (["nokeyvalue"], "must have the form key=value"),
    (["=5"], "must have the form key=value"),
    (["train.lr=nan"], "train.lr nan must be a finite number > 0"),
    (["model.norm_eps=-1"], "model.norm_eps -1.0 must be a finite number > 0"),
    (["name=../elsewhere"], "name '../elsewhere' must be a plain file name"),
])
def test_bad_configs_name_key_and_rule(sets, message):
    with pytest.raises(ValueError, match=None) as info:
        config_lib.load(ROOT / "configs/demo.yaml", sets)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lcjax.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args", [
    ["train", "--config", "configs/demo.yaml", "--set", "data.seq_len=0"],
    ["train", "--config", "configs/demo.yaml", "--set", "model.nope=1"],
    ["train", "--config", "missing.yaml"],
    ["train", "--config", "configs/demo.yaml", "--bogus-flag"],
    ["train", "--config", "configs/demo.yaml", "--resume"],
])
def test_cli_bad_input_exits_2_with_one_line(args, tmp_path):
    run_dir = tmp_path / "run"
    result = _cli(*args, "--run-dir", str(run_dir), cwd=ROOT)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lcjax: error:"), result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("text,message", [("- a\n- b\n", "must be a mapping of config sections"),
                                          ("model: 5\n", "must be a mapping of keys"),
                                          ("defaults: [c.yaml]\n", "'defaults' includes itself")])
def test_malformed_yaml_files(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        config_lib.load(tmp_path / "c.yaml")


def test_cli_run_dir_below_a_file_is_refused_before_work(tmp_path):
    (tmp_path / "afile").write_text("")
    result = _cli("train", "--config", "configs/demo.yaml", "--run-dir", str(tmp_path / "afile" / "run"), cwd=ROOT)
    assert result.returncode == 2 and "is not a directory" in result.stderr


def test_cli_existing_run_dir_is_untouched(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("mine")
    result = _cli("train", "--config", "configs/demo.yaml", "--run-dir", str(run_dir), cwd=ROOT)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert [p.name for p in run_dir.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("name,count", [("llama2_7b", 6_738_415_616), ("llama2_13b", 13_015_864_320),
                                        ("llama3_8b", 8_030_261_248)])
def test_model_shapes_have_the_published_parameter_counts(name, count):
    from lcjax.model.llama import count_params

    assert count_params(config_lib.load(ROOT / f"configs/models/{name}.yaml").model) == count
