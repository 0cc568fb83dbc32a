"""Any ``data.seq_len`` on any mesh: windows padded to the layout train with the loss of one device."""

import json
from pathlib import Path

import numpy as np
import pytest

from lcjax import config as config_lib
from lcjax.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
        "model.vocab_size=257", "data.tokenizer=bytes", "data.seq_len=45", "data.global_batch=2",
        "attention.block_q=8", "attention.block_k=8", "train.lr=3e-3", "train.warmup_steps=1",
        "train.steps=3", "checkpoint.every=3", f"data.source=files:{ROOT / 'lcjax' / 'data'}"]


def _losses(tmp_path, name, *sets):
    cfg = config_lib.load(ROOT / "configs/demo.yaml", [*TINY, f"data.cache_dir={tmp_path / 'cache'}", *sets])
    import jax

    count = cfg.mesh.data * cfg.mesh.sequence * cfg.mesh.model
    train(cfg, tmp_path / name, progress=False, devices=jax.devices()[:count])
    return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seq_len")
    return tmp, _losses(tmp, "one", "mesh.sequence=1", "mesh.model=1", "attention.impl=local",
                        "attention.layout=contiguous")


MESHES = [("1", "4", "2", "zigzag", "ring"),
          pytest.param("2", "2", "2", "balanced", "ring", marks=pytest.mark.slow),
          pytest.param("2", "4", "1", "balanced", "ulysses", marks=pytest.mark.slow),
          pytest.param("1", "8", "1", "striped", "ring", marks=pytest.mark.slow)]


@pytest.mark.parametrize("data,sequence,model,layout,impl", MESHES)
def test_odd_seq_len_trains_with_the_one_device_loss(one_device, tmp_path, data, sequence, model, layout, impl):
    """seq_len 45 divides no mesh: each window is padded (45 → 48 zigzag on 4, 64 balanced on 2) and the
    losses of three optimizer steps equal the unpadded single-device run's."""
    tmp, want = one_device
    got = _losses(tmp, f"{data}{sequence}{model}{layout}", f"mesh.data={data}", f"mesh.sequence={sequence}",
                  f"mesh.model={model}", f"attention.layout={layout}", f"attention.impl={impl}")
    assert len(got) == 3
    np.testing.assert_allclose(got, want, rtol=2e-5)
