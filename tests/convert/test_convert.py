"""Hugging Face checkpoints in and out (lcjax.convert): logits equal to transformers' LlamaForCausalLM
(golden logits in tests/convert/data, made by scripts/make_golden_logits.py; and live, when the optional torch and
transformers are installed), bitwise round trips, config mapping and the CLI's errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lcjax import cli, convert
from lcjax.checkpoint import restore_params
from lcjax.config import ModelConfig, RopeConfig
from lcjax.convert import hf_config
from lcjax.convert.safetensors_io import SafetensorsFolder
from lcjax.ops import rope

DATA = Path(__file__).parent / "data" / "hf_tiny"
TOL = 1e-4  # max |logit difference|, float32


@pytest.fixture(scope="module")
def golden():
    with np.load(DATA / "golden.npz") as z:
        return {k: z[k] for k in z.files}


def _case_dir(tmp_path: Path, golden, case: str) -> Path:
    """An HF folder: the case's weights (copied) with its config.json."""
    folder = tmp_path / case
    folder.mkdir()
    shutil.copyfile(DATA / case.split("-")[0] / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(str(golden[f"config/{case}"]))
    return folder


CASES = ["f32_untied-default", "f32_untied-linear", "f32_untied-dynamic", "f32_untied-yarn", "f32_untied-llama3",
         "bf16_tied-default", "bf16_tied-yarn"]


@pytest.mark.parametrize("case", CASES)
def test_golden_logits_single_device(case, golden, tmp_path):
    model = convert.load_hf(_case_dir(tmp_path, golden, case))
    out = np.asarray(model(golden["tokens"]))
    assert out.dtype == np.float32 and out.shape == golden[f"logits/{case}"].shape
    assert np.max(np.abs(out - golden[f"logits/{case}"])) <= TOL


@pytest.mark.parametrize("case,mesh,attention", [
    ("f32_untied-yarn", (2, 2, 2), {}),
    ("f32_untied-llama3", (1, 4, 2), {"layout": "striped"}),
    ("bf16_tied-yarn", (2, 2, 1), {"impl": "ulysses"}),
])
def test_golden_logits_on_meshes(case, mesh, attention, golden, tmp_path):
    model = convert.load_hf(_case_dir(tmp_path, golden, case), mesh, **attention)
    assert np.max(np.abs(np.asarray(model(golden["tokens"])) - golden[f"logits/{case}"])) <= TOL


def test_rope_matters_in_the_golden_model(golden, tmp_path):
    """Negative control: the same weights under another RoPE are far off (so the tolerance means something)."""
    model = convert.load_hf(_case_dir(tmp_path, golden, "f32_untied-linear"))
    assert np.max(np.abs(np.asarray(model(golden["tokens"])) - golden["logits/f32_untied-default"])) > 100 * TOL


@pytest.mark.parametrize("weights", ["f32_untied", "bf16_tied"])
def test_round_trip_is_bitwise(weights, tmp_path):
    run = convert.hf_to_lcjax(DATA / weights, tmp_path / "run")
    assert (run / "config.yaml").is_file() and json.loads((run / "hf_import.json").read_text())["step"] == 0
    out = convert.lcjax_to_hf(run, tmp_path / "out")
    a, b = SafetensorsFolder(DATA / weights), SafetensorsFolder(out)
    assert a.names == b.names
    for name in a.names:
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name
    assert (out / "config.json").read_text() == (DATA / weights / "config.json").read_text()


def test_export_in_shards_and_dtype(tmp_path):
    run = convert.hf_to_lcjax(DATA / "f32_untied", tmp_path / "run")
    out = convert.lcjax_to_hf(run, tmp_path / "out", dtype="bfloat16", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    folder = SafetensorsFolder(out)
    assert {folder.dtype(n).name for n in folder.names} == {"bfloat16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    np.testing.assert_array_equal(folder.read("lm_head.weight").astype(np.float32),
                                  SafetensorsFolder(DATA / "f32_untied").read("lm_head.weight")
                                  .astype(folder.dtype("lm_head.weight")).astype(np.float32))


def test_imported_params_restore_onto_a_mesh(tmp_path):
    """Import writes params only; restore_params places them on any mesh (what --init-from does)."""
    import jax

    from lcjax.config import Config
    from lcjax.sharding.mesh import make_mesh
    from lcjax.train.state import model_graph, param_shardings

    run = convert.hf_to_lcjax(DATA / "f32_untied", tmp_path / "run")
    cfg = Config(model=convert.hf_model_config(DATA / "f32_untied"))
    _, abstract = model_graph(cfg)
    _, shardings = param_shardings(cfg, make_mesh(1, 1, 2), abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = restore_params(run / "checkpoints", target)
    direct = convert.hf_params(DATA / "f32_untied", abstract)
    assert params["layers"]["wq"][...].sharding.spec == shardings["layers"]["wq"].get_value().spec
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(np.asarray(a), b)
    embed = np.asarray(params["embed"][...])
    assert embed.shape == (256, 32) and not embed[160:].any()  # padded rows are zero


def _hf(**over):
    raw = json.loads((DATA / "f32_untied" / "config.json").read_text())
    raw.update(over)
    return raw


@pytest.mark.parametrize("raw,expected", [
    (_hf(rope_parameters=None, rope_theta=5e5, rope_scaling=None), RopeConfig(base=5e5)),
    (_hf(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "linear", "factor": 4.0}),
     RopeConfig(type="linear", factor=4.0)),
    (_hf(rope_parameters=None, rope_scaling={"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e4},
         max_position_embeddings=4096), RopeConfig(type="yarn", factor=8.0, original_max_position=4096)),
    (_hf(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": 1024,
                          "factor": None, "mscale": 1.0, "mscale_all_dim": 0.5}, max_position_embeddings=4096),
     RopeConfig(type="yarn", factor=4.0, original_max_position=1024,
                attention_factor=(0.1 * np.log(4) + 1) / (0.05 * np.log(4) + 1))),
    (_hf(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, max_position_embeddings=512),
     RopeConfig(type="dynamic", factor=2.0, original_max_position=512)),
])
def test_rope_read_from_both_formats(raw, expected):
    got = hf_config.model_config_from_hf(raw).rope
    assert got.type == expected.type and got.base == expected.base and got.factor == expected.factor
    assert got.original_max_position == expected.original_max_position
    assert got.attention_factor == pytest.approx(expected.attention_factor)


@pytest.mark.parametrize("rope_cfg", [RopeConfig(base=5e5), RopeConfig(type="linear", factor=2.0),
                                      RopeConfig(type="ntk", factor=4.0),
                                      RopeConfig(type="dynamic", factor=2.0, original_max_position=64),
                                      RopeConfig(type="yarn", factor=4.0, original_max_position=64, beta_fast=16,
                                                 attention_factor=1.2),
                                      RopeConfig(type="llama3", factor=8.0, original_max_position=64)])
def test_model_config_to_hf_and_back_keeps_the_frequencies(rope_cfg):
    m = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=1000,
                    tie_embeddings=True, norm_eps=1e-6, rope=rope_cfg)
    raw = json.loads(json.dumps(hf_config.hf_config_from_model(m, max_position=128)))
    back = hf_config.model_config_from_hf(raw)
    assert back.n_kv_heads == 2 and back.tie_embeddings and back.norm_eps == 1e-6 and back.vocab_size == 1000
    if rope_cfg.type != "ntk":  # ntk comes back as a base change (default type): the same θ
        assert back == m
    a = rope.scaled_frequencies(16, max_position=128, **vars(rope_cfg))
    b = rope.scaled_frequencies(16, max_position=128, **vars(back.rope))
    np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
    assert a[1] == b[1]
    old = dict(raw, rope_parameters=None)  # older readers: rope_theta + rope_scaling alone
    assert rope.scaled_frequencies(16, max_position=128, **vars(hf_config.model_config_from_hf(old).rope))[0] \
        == pytest.approx(a[0], rel=1e-12)


@pytest.mark.parametrize("over,message", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "architecture"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type 'longrope' is not supported"),
    ({"head_dim": 8}, "head_dim 8 x num_attention_heads 2 must equal hidden_size 32"),
    ({"attention_bias": True}, "attention_bias True is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"hidden_size": None}, "hidden_size must be an integer"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
     "rope llama3 needs low_freq_factor"),
])
def test_unsupported_configs_are_one_line_errors(over, message):
    with pytest.raises(ValueError, match=message):
        hf_config.model_config_from_hf(_hf(**over))


def _run_cli(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("setup,message", [
    ("missing", "not a directory"),
    ("no_config", "no config.json"),
    ("mistral", "architecture"),
    ("yarn_no_factor_rope", "rope_type 'su' is not supported"),
    ("no_weights", "no *.safetensors"),
    ("missing_tensor", "tensor model.norm.weight is missing"),
    ("exists", "already exists"),
])
def test_cli_import_errors_exit_2_and_write_nothing(setup, message, tmp_path, capsys):
    src, out = tmp_path / "hf", tmp_path / "out"
    if setup != "missing":
        src.mkdir()
    if setup not in ("missing", "no_config"):
        raw = _hf()
        raw.update({"mistral": {"model_type": "mistral"},
                    "yarn_no_factor_rope": {"rope_parameters": {"rope_type": "su", "rope_theta": 1e4}}}.get(setup, {}))
        (src / "config.json").write_text(json.dumps(raw))
        if setup != "no_weights":
            shutil.copyfile(DATA / "f32_untied" / "model.safetensors", src / "model.safetensors")
    if setup == "missing_tensor":
        from safetensors.numpy import save_file

        folder = SafetensorsFolder(src)
        save_file({n: folder.read(n) for n in folder.names if n != "model.norm.weight"}, str(src / "model.safetensors"))
    if setup == "exists":
        out.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = _run_cli(["convert", "hf-to-lcjax", str(src), str(out)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("lcjax: error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_export_errors(tmp_path, capsys):
    code, err = _run_cli(["convert", "lcjax-to-hf", str(tmp_path), str(tmp_path / "o")], capsys)
    assert code == 2 and "no config.yaml" in err
    run = convert.hf_to_lcjax(DATA / "bf16_tied", tmp_path / "run")
    code, err = _run_cli(["convert", "lcjax-to-hf", str(run), str(tmp_path / "o"), "--dtype", "int8"], capsys)
    assert code == 2 and "--dtype 'int8' must be one of" in err
    code, err = _run_cli(["convert", "lcjax-to-hf", str(run), str(tmp_path / "o"), "--step", "7"], capsys)
    assert code == 2 and "no checkpoint at step 7" in err
    assert not (tmp_path / "o").exists()
    code, err = _run_cli(["convert", "lcjax-to-hf", str(run), str(tmp_path / "o")], capsys)
    assert code == 0 and (tmp_path / "o" / "model.safetensors").is_file()


def test_hf_tokenizer(tmp_path):
    import tokenizers
    from tokenizers import models

    vocab = {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    t = convert.hf_tokenizer(tmp_path)
    assert t.eos_id == 1 and t.vocab_size == 5 and t.encode_batch(["hello world"]) == [[2, 3]]
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [3, 1]}))
    assert convert.hf_tokenizer(tmp_path).eos_id == 3
    with pytest.raises(ValueError, match="no tokenizer.json"):
        convert.hf_tokenizer(tmp_path / "nowhere")


# ---- live oracle: transformers' LlamaForCausalLM in torch (optional extra `oracle`) --------------------

def _oracle():
    pytest.importorskip("torch", exc_type=ImportError)
    return pytest.importorskip("transformers", exc_type=ImportError)


def _save_random_hf(folder, rope_params, max_position, tied, seed=0, n_heads=4, n_kv=2, dtype="float32"):
    import sys

    sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
    import make_golden_logits as g

    cfg = g.tiny_config(rope_params, max_position, tied)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = n_heads, n_kv, 32 // n_heads
    model = g.tiny_model(cfg, seed, dtype == "bfloat16")
    import torch

    model.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
    return model.float(), g


@pytest.mark.parametrize("rope_name,tied,mesh", [
    ("default", False, (1, 1, 1)), ("linear", True, (2, 2, 2)), ("dynamic", False, (1, 2, 2)),
    ("yarn", False, (1, 4, 2)), ("llama3", True, (2, 1, 4)),
])
def test_parity_with_transformers(rope_name, tied, mesh, tmp_path):
    _oracle()
    import sys

    sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
    import make_golden_logits as g

    model, _ = _save_random_hf(tmp_path / "hf", *g.ROPES[rope_name], tied, seed=3, n_heads=4, n_kv=2)
    tokens = np.random.default_rng(1).integers(0, g.V, (2, 32))
    ref = g.logits(model, tokens)
    out = np.asarray(convert.load_hf(tmp_path / "hf", mesh)(tokens))
    assert np.max(np.abs(out - ref)) <= TOL


@pytest.mark.parametrize("rope_cfg", [RopeConfig(type="ntk", factor=4.0),
                                      RopeConfig(type="yarn", factor=4.0, original_max_position=1024,
                                                 beta_fast=16.0, beta_slow=2.0, attention_factor=1.3)])
def test_lcjax_born_model_exports_to_transformers(rope_cfg, tmp_path):
    """A model made by lcjax (random init, a RoPE type transformers lacks or custom YaRN parameters) exported
    and loaded by transformers.from_pretrained gives the same logits."""
    transformers = _oracle()
    import dataclasses

    import torch

    from lcjax.checkpoint import Checkpointer
    from lcjax.config import Config, to_yaml
    from lcjax.convert.forward import CausalLM

    m = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=150, init_std=0.3,
                    rope=rope_cfg)
    cfg = dataclasses.replace(Config(model=m), data=dataclasses.replace(Config().data, seq_len=64))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    params = _random_params(cfg)
    ckpt = Checkpointer(run / "checkpoints", every=1, keep=1)
    ckpt.save_params(5, params)
    ckpt.close()
    out = convert.lcjax_to_hf(run, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokens = np.random.default_rng(2).integers(0, 150, (2, 32))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(CausalLM(Config(model=m), params)(tokens))
    assert np.max(np.abs(ours - ref)) <= TOL


def _random_params(cfg):
    import jax

    from lcjax.train.state import model_graph

    _, abstract = model_graph(cfg)
    rng = np.random.default_rng(0)

    def draw(path, a):  # weights N(0, 0.3²); norms 1 + N(0, 0.3²); padded vocabulary rows/columns zero
        x = (0.3 * rng.normal(size=a.shape)).astype(np.float32)
        name = jax.tree_util.keystr(path)
        x = x + 1 if "norm" in name else x
        if "embed" in name:
            x[cfg.model.vocab_size:] = 0
        if "lm_head" in name:
            x[:, cfg.model.vocab_size:] = 0
        return x

    return jax.tree_util.tree_map_with_path(draw, abstract)


def test_transformers_round_trip_bitwise_and_reloadable(tmp_path):
    """HF (bf16, GQA, llama3) -> lcjax -> HF: same bytes; transformers loads the export; same logits."""
    transformers = _oracle()
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
    import make_golden_logits as g

    _save_random_hf(tmp_path / "hf", *g.ROPES["llama3"], False, seed=5, dtype="bfloat16")
    run = convert.hf_to_lcjax(tmp_path / "hf", tmp_path / "run")
    out = convert.lcjax_to_hf(run, tmp_path / "back")
    a, b = SafetensorsFolder(tmp_path / "hf"), SafetensorsFolder(out)
    assert a.names == b.names and all(a.read(n).tobytes() == b.read(n).tobytes() for n in a.names)
    tokens = torch.tensor(np.random.default_rng(3).integers(0, g.V, (1, 16)))
    with torch.no_grad():
        x = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()(tokens).logits
        y = transformers.LlamaForCausalLM.from_pretrained(out).eval()(tokens).logits
    assert torch.equal(x, y)


@pytest.mark.parametrize("mesh", [(1, 1, 1), (2, 4, 1)])
def test_any_batch_and_length(mesh, golden, tmp_path):
    """B and T need not fit the mesh or layout: padding is added and cut off (causal: later tokens only)."""
    model = convert.load_hf(_case_dir(tmp_path, golden, "f32_untied-llama3"), mesh)
    tokens = golden["tokens"][:1, :13]
    out = np.asarray(model(tokens))
    assert out.shape == (1, 13, 160)
    assert np.max(np.abs(out - golden["logits/f32_untied-llama3"][:1, :13])) <= TOL


@pytest.mark.parametrize("incremental", [True, False])
def test_streamed_params_save_reads_back(incremental, monkeypatch, tmp_path):
    """save_params_streamed: Orbax incremental saves, or one save where Orbax lacks them; same result."""
    import lcjax.checkpoint as ck

    if not incremental:
        monkeypatch.setattr(ck.ocp, "v1", None)
    parts = [{"a": {"value": np.arange(6, dtype=np.float32).reshape(2, 3)}},
             {"layers": {"w": {"value": np.ones((2, 2, 2), np.float32)}}}, {"layers": {"n": {"value": np.zeros(4)}}}]
    ck.save_params_streamed(tmp_path / "c", 0, iter(parts))
    assert ck.saved_steps(tmp_path / "c") == [0]
    target = {"a": {"value": 0}, "layers": {"w": {"value": 0}, "n": {"value": 0}}}
    import jax

    target = jax.tree.map(lambda _, p: jax.ShapeDtypeStruct(p.shape, p.dtype), target,
                          {"a": parts[0]["a"], "layers": {**parts[1]["layers"], **parts[2]["layers"]}})
    got = ck.restore_params(tmp_path / "c", target)
    np.testing.assert_array_equal(got["a"]["value"], parts[0]["a"]["value"])
    np.testing.assert_array_equal(got["layers"]["w"]["value"], 1.0)
    with pytest.raises(ValueError, match="already exists"):
        ck.save_params_streamed(tmp_path / "c", 0, iter(parts))


def test_mixed_dtype_folder_round_trips_bitwise(tmp_path):
    """bfloat16 matrices with float32 norms (as some exports store them) come back tensor by tensor."""
    from safetensors.numpy import save_file

    src = tmp_path / "hf"
    src.mkdir()
    folder = SafetensorsFolder(DATA / "bf16_tied")
    save_file({n: folder.read(n).astype(np.float32) if "norm" in n else folder.read(n) for n in folder.names},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(DATA / "bf16_tied" / "config.json", src / "config.json")
    out = convert.lcjax_to_hf(convert.hf_to_lcjax(src, tmp_path / "run"), tmp_path / "out")
    a, b = SafetensorsFolder(src), SafetensorsFolder(out)
    assert {a.dtype(n).name for n in a.names} == {"float32", "bfloat16"}
    assert all(a.dtype(n) == b.dtype(n) and a.read(n).tobytes() == b.read(n).tobytes() for n in a.names)


def test_hf_params_refuses_a_run_config_of_another_shape():
    from lcjax.config import Config
    from lcjax.train.state import model_graph

    m = convert.hf_model_config(DATA / "f32_untied")
    import dataclasses

    _, abstract = model_graph(Config(model=dataclasses.replace(m, vocab_size=300)))
    with pytest.raises(ValueError, match=r"parameter embed is \(384, 32\) in the run, \(256, 32\) in the HF model"):
        convert.hf_params(DATA / "f32_untied", abstract)
    _, abstract = model_graph(Config(model=dataclasses.replace(m, rope=RopeConfig(type="linear", factor=4.0))))
    assert convert.hf_params(DATA / "f32_untied", abstract)["embed"].shape == (256, 32)  # RoPE is free


def test_unseen_shape_old_format_via_the_cli(tmp_path, capsys):
    """Another shape (3 layers, 6 heads / 3 kv heads, head dim 8, V = 1000, tied, d_ff not a power of 2)
    with an old-format config.json (rope_theta + rope_scaling), imported with the CLI and run from the run
    dir; then exported and reloaded by transformers."""
    transformers = _oracle()
    import torch

    torch.manual_seed(7)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
                                   num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128,
                                   rms_norm_eps=1e-6, initializer_range=0.25, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(rope_theta=50000.0, rope_scaling={"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.config.rope_parameters["rope_type"] == "llama3"
    tokens = np.random.default_rng(4).integers(0, 1000, (3, 21))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    assert cli.main(["convert", "hf-to-lcjax", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    assert np.max(np.abs(np.asarray(convert.load_run(tmp_path / "run")(tokens)) - ref)) <= TOL
    assert np.max(np.abs(np.asarray(convert.load_run(tmp_path / "run", (3, 2, 1))(tokens)) - ref)) <= TOL
    assert cli.main(["convert", "lcjax-to-hf", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    with torch.no_grad():
        again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()(torch.tensor(tokens)).logits
    assert torch.equal(again, torch.tensor(ref))
