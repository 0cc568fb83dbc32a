"""The benchmark scripts' pure helpers (no timings are measured or asserted here)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from lcjax import config as config_lib

ROOT = Path(__file__).resolve().parents[2]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_plain_loader_matches_omegaconf(path):
    """bench_train's omegaconf-free loader (for the GPU host) reads every config as lcjax.config.load does."""
    bt = _script("bench_train")
    assert bt.load_config_plain(path) == config_lib.load(path)


def test_plain_loader_overrides_and_errors():
    bt = _script("bench_train")
    sets = ["train.lr=1e-4", "attention.window=128", "model.n_layers=2", "train.fsdp=false"]
    assert bt.load_config_plain(ROOT / "configs/demo.yaml", sets) == config_lib.load(ROOT / "configs/demo.yaml", sets)
    with pytest.raises(ValueError, match="model.nope: unknown config key"):
        bt.load_config_plain(ROOT / "configs/demo.yaml", ["model.nope=1"])
    with pytest.raises(ValueError, match="data.seq_len"):
        bt.load_config_plain(ROOT / "configs/demo.yaml", ["data.seq_len=0"])


def test_train_bench_helpers():
    bt = _script("bench_train")
    assert bt.parse_mesh("1,4,2") == (1, 4, 2)
    for bad in ("1,4", "0,8,1", "a,b,c"):
        with pytest.raises(ValueError, match="--meshes"):
            bt.parse_mesh(bad)
    cfg = config_lib.load(ROOT / "configs/demo.yaml", ["data.seq_len=64"])
    assert bt.variant(cfg, (1, 8, 1), "ulysses").mesh == config_lib.MeshConfig(1, 8, 1)
    with pytest.raises(ValueError, match="mesh.model"):
        bt.variant(cfg, (1, 1, 3), "ring")
    fpt = bt.flops_per_token(cfg)
    assert fpt["causal"] < fpt["palm"] and fpt["causal"] <= fpt["hardware"]
    u = bt.utilisation(1000.0, fpt, 1e12)
    assert u["mfu_causal"] == pytest.approx(1000.0 * fpt["causal"] / 1e12)
    batch = bt.synthetic_batch(dict_replace(cfg, (1, 4, 1)))
    assert all(v.shape == (1, 64) and v.dtype == np.int32 for v in batch.values())
    assert sorted(batch["positions"][0]) == list(range(64))  # a permutation of 0…T−1 (zigzag order)
    assert batch["positions"][0][:16].tolist() == [*range(8), *range(56, 64)]  # shard 0: chunks 0 and 7
    assert (batch["labels"][0] == bt.synthetic_batch(dict_replace(cfg, (1, 1, 1)))["labels"][0][
        batch["positions"][0]]).all()  # the same next-token labels, laid out like the positions


def dict_replace(cfg, mesh):
    import dataclasses

    return dataclasses.replace(cfg, mesh=config_lib.MeshConfig(*mesh))


def test_peer_bench_helpers():
    bp = _script("bench_peer")
    assert bp.ratio(2.0, 1.0) == 2.0 and bp.ratio(None, 1.0) is None and bp.ratio(1.0, None) is None
    hlo = "%a = all-gather(x) %b = all-gather-start(y) %c = collective-permute(z) %d = all-reduce(w)"
    assert bp.collectives(hlo) == {"all-gather": 2, "all-reduce": 1, "all-to-all": 0, "collective-permute": 1,
                                   "reduce-scatter": 0}
    assert bp.max_abs_diff(np.ones(3), np.zeros(3)) == 1.0


def test_scripts_do_not_need_data_dependencies():
    """What the GPU host lacks (omegaconf, grain, tfds, tokenizers, tensorboardX) is not imported by the
    modules the GPU benchmarks use."""
    import subprocess

    code = (
        "import sys, importlib.abc\n"
        "BLOCK = {'omegaconf', 'grain', 'tensorflow_datasets', 'tokenizers', 'tensorboardX'}\n"
        "class B(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BLOCK: raise ImportError(name)\n"
        "sys.meta_path.insert(0, B())\n"
        "sys.path.insert(0, 'scripts')\n"
        "import bench_train, bench_peer, bench_kernels\n"
        "import lcjax.train.step, lcjax.train.state, lcjax.train.metrics, lcjax.attention\n"
        "import lcjax.kernels.flash_attention.pallas_triton\n"
        "cfg = bench_train.load_config('configs/experiments/llama_1b_32k.yaml', ['data.seq_len=4096'])\n"
        "print(cfg.name, cfg.data.seq_len)\n")
    env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["llama_1b_32k", "4096"]


def test_kernel_bench_layouts_and_flops():
    """bench_kernels' packed documents fill T exactly; FLOPs count visible pairs (causal-honest)."""
    bk = _script("bench_kernels")
    lengths = bk.document_lengths(16384)
    assert sum(lengths) == 16384 and all(1 <= n <= 4096 for n in lengths) and len(lengths) > 4
    pos, seg, pairs = bk.layout(8, "causal")
    assert pos.tolist() == list(range(8)) and set(seg.tolist()) == {0} and pairs == 36
    pos, seg, pairs = bk.layout(16384, "segments")
    assert pairs == sum(n * (n + 1) // 2 for n in lengths) and pos[lengths[0]] == 0 and seg[lengths[0]] == 1
    assert bk.forward_flops(32, 128, 36) == 4 * 32 * 128 * 36
    row = bk.markdown_row({"mask": "causal", "seq_len": 8, "kernel": "cudnn", "pass": "fwd", "error": "E: x"})
    assert row == "| causal | 8 | cudnn | fwd | — | E: x |"


def test_kernel_bench_times_only_what_passed_parity():
    """A row is timed only when its kernel's parity record in the timed dtype passed (forward for fwd rows,
    forward and gradients for fwd_bwd rows); unregistered names are skipped with the reason."""
    bk = _script("bench_kernels")
    ok = {"dtype": "bfloat16", "fwd_ok": True, "fwd_bwd_ok": False}
    records = [{"kernel": "a", **ok}, {"kernel": "b", "dtype": "bfloat16", "skipped": "not registered"},
               {"kernel": "c", "dtype": "bfloat16", "fwd_ok": False, "fwd_bwd_ok": False, "error": "E: x"}]
    assert bk.not_timed(records, "a", "fwd", "bfloat16") is None
    assert bk.not_timed(records, "a", "fwd_bwd", "bfloat16") == "parity failed"
    assert bk.not_timed(records, "a", "fwd", "float32") == "no float32 parity record"
    assert bk.not_timed(records, "b", "fwd", "bfloat16") == "not registered"
    assert bk.not_timed(records, "c", "fwd", "bfloat16") == "parity failed: E: x"
    assert bk.not_timed(records, "d", "fwd", "bfloat16") == "no bfloat16 parity record"
    with pytest.raises(bk.NotRegistered, match="not registered"):
        bk.attention_fn("no_such_kernel", "causal", *bk.layout(8, "causal")[:2], 4, 2, None)
    assert "cudnn" in bk.registered()


def test_autotune_candidates_fit_and_table_merge(tmp_path):
    at = _script("autotune_triton")
    from lcjax.kernels.flash_attention import triton_tiles as tt

    for name in tt.PASSES:
        cands = list(at.candidates(name, 128, 2, "h100"))
        assert cands and all(tt.shared_memory_bytes(name, *c[:2], 128, 2, c.num_stages)
                             <= tt.SHARED_MEMORY["h100"] for c in cands)
    table = tmp_path / "tiles.json"
    table.write_text(tt.TABLE_PATH.read_text())
    entry = {"gpu": "h100", "head_dim": 128, "dtype": "bfloat16", "fwd": [64, 64, 4, 2], "dkv": [32, 64, 4, 2],
             "dq": [64, 32, 4, 2], "source": "test"}
    at.write_table([entry], table)
    loaded = tt.load_table(str(table))
    assert loaded[("h100", 128, "bfloat16")]["fwd"] == tt.PassConfig(64, 64, 4, 2)
    assert len(loaded) == len(tt.load_table())  # replaced, not added
