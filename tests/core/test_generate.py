"""Generation: the KV-cache decode gives the same next-token logits as a full forward pass (float32), with
the prefill sharded over the mesh; greedy/sampled generation; the ``lcjax generate`` command."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lcjax import cli
from lcjax import config as config_lib
from lcjax import generate as gen
from lcjax.model.llama import AttentionSpec, Axes, Llama
from lcjax.sharding.mesh import make_mesh

V, FULL, LENGTHS, STEPS = 300, 32, (21, 14), 6  # two prompts of different lengths, 6 decode steps


def _config(mesh, *extra):
    sets = [f"mesh.data={mesh[0]}", f"mesh.sequence={mesh[1]}", f"mesh.model={mesh[2]}", "model.n_layers=2",
            "model.d_model=64", "model.n_heads=8", "model.n_kv_heads=2", "model.d_ff=128", "model.init_std=0.1",
            f"model.vocab_size={V}", "data.seq_len=64", "data.global_batch=2", "attention.block_q=8",
            "attention.block_k=8", *extra]
    return config_lib.load(None, sets)


def _params(cfg):
    return nnx.split(Llama(cfg.model, nnx.Rngs(cfg.train.seed)))[1]


def _sequences():
    return np.random.default_rng(0).integers(0, V - 1, (2, FULL)).astype(np.int32)


def full_logits(cfg, params, tokens):
    """Logits float32 [B, T, V] of a plain forward pass of Llama.hidden on one device (the oracle)."""
    one = dataclasses.replace(cfg, mesh=config_lib.MeshConfig())
    mesh = make_mesh(1, 1, 1)
    graphdef, specs, _ = gen.abstract_params(one, mesh)
    window = cfg.attention.window

    def local(p, t):
        model = nnx.merge(graphdef, p)
        pos = jnp.broadcast_to(jnp.arange(t.shape[1], dtype=jnp.int32), t.shape)
        h = model.hidden(t, pos, jnp.ones_like(t), max_position=t.shape[1],
                         attn=AttentionSpec(impl="local", window=window), axes=Axes())
        head = model.embed[...].T if cfg.model.tie_embeddings else model.lm_head[...]
        return h @ head

    fn = jax.shard_map(local, mesh=mesh, in_specs=(specs, P()), out_specs=P(None, None, "model"))
    return np.asarray(jax.jit(fn)(params, jnp.asarray(tokens)))[..., :V]


CASES = {  # mesh, extra config
    "1x1x1": ((1, 1, 1), ()),
    "2x2x2-ring-zigzag-window-yarn": ((2, 2, 2), ("attention.window=9", "model.rope.type=yarn",
                                                 "model.rope.factor=4", "model.rope.original_max_position=16")),
    "1x2x4-kv-replicated-ulysses": ((1, 2, 4), ("attention.impl=ulysses",)),
    "1x4x2-ring-striped": ((1, 4, 2), ("attention.layout=striped",)),
}
SLOW = {"1x1x1", "1x4x2-ring-striped"}  # 2x2x2 and 1x2x4 stay in the default suite


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_cached_decode_matches_full_forward(case):
    mesh, extra = CASES[case]
    cfg = _config(mesh, *extra)
    params = _params(cfg)
    seqs = _sequences()
    expected = full_logits(cfg, params, seqs)  # [B, FULL, V]
    model = gen.from_params(cfg, params)
    prompts = [list(s[:n]) for s, n in zip(seqs, LENGTHS)]
    logits, cache = gen.prefill(model, prompts, max_new_tokens=STEPS)
    got, want = [np.asarray(logits)], [expected[[0, 1], [n - 1 for n in LENGTHS]]]
    for i in range(STEPS):  # teacher forcing: feed the true next tokens
        fed = [seqs[r, LENGTHS[r] + i] for r in range(2)]
        logits, cache = gen.decode_step(model, cache, fed)
        got.append(np.asarray(logits))
        want.append(expected[[0, 1], [n + i for n in LENGTHS]])
    got, want = np.stack(got), np.stack(want)
    diff = float(np.max(np.abs(got - want)))
    print(f"{case}: max |cached - full| = {diff:.2e} (max |logit| {np.max(np.abs(want)):.2f})")
    assert diff <= 2e-5 * max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(gen.prompt_logits(model, prompts), want[0], atol=2e-5, rtol=0)
    np.testing.assert_allclose(gen.prompt_logits(model, prompts[1:]), want[0][1:], atol=2e-5, rtol=0)  # B < dp


@pytest.mark.slow
def test_greedy_generation_does_not_depend_on_the_mesh_and_sampling_on_the_seed():
    seqs = _sequences()
    prompts = [list(s[:n]) for s, n in zip(seqs, LENGTHS)]
    outs = {}
    for mesh in ((1, 1, 1), (1, 4, 2)):
        cfg = _config(mesh)
        model = gen.from_params(cfg, _params(cfg))
        outs[mesh] = gen.generate(model, prompts, max_new_tokens=5)
    assert outs[(1, 1, 1)] == outs[(1, 4, 2)] and [len(o) for o in outs[(1, 1, 1)]] == [5, 5]
    # greedy = argmax of the full forward pass, token after token
    cfg = _config((1, 1, 1))
    params = _params(cfg)
    n, new = len(prompts[1]), outs[(1, 1, 1)][1]
    logits = full_logits(cfg, params, np.array([prompts[1] + new]))[0]
    assert list(np.argmax(logits[n - 1: n + 4], axis=-1)) == new
    a, b, c = (gen.generate(model, prompts, max_new_tokens=6, temperature=1.0, seed=s) for s in (3, 3, 4))
    assert a == b and a != c
    eos = outs[(1, 4, 2)][0][1]
    assert gen.generate(model, prompts, max_new_tokens=5, eos_id=eos)[0] == outs[(1, 4, 2)][0][:2]


def test_bad_input_raises_value_error():
    cfg = _config((1, 1, 1))
    model = gen.from_params(cfg, _params(cfg))
    for prompts, kwargs, message in (([[]], {}, "prompt 0 is empty"), ([[V]], {}, "token ids must be in"),
                                     ([[1]], {"max_new_tokens": -1}, "max-new-tokens -1 must be >= 0"),
                                     ([[1]], {"temperature": -0.5}, "temperature -0.5 must be")):
        with pytest.raises(ValueError, match=message):
            gen.generate(model, prompts, **{"max_new_tokens": 2, **kwargs})
    _, cache = gen.prefill(model, [[1, 2]], max_new_tokens=1)
    _, cache = gen.decode_step(model, cache, [3])
    with pytest.raises(ValueError, match="the cache holds 1 generated tokens"):
        gen.decode_step(model, cache, [4])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir as training leaves it (config.yaml, byte tokenizer, a checkpoint), written directly."""
    from lcjax.checkpoint import Checkpointer
    from lcjax.data.tokenizer import load_or_train_tokenizer
    from lcjax.train.state import init_state

    run = tmp_path_factory.mktemp("gen") / "run"
    cfg = _config((1, 2, 2), "model.vocab_size=257", "data.tokenizer=bytes")
    run.mkdir()
    (run / "config.yaml").write_text(config_lib.to_yaml(cfg))
    load_or_train_tokenizer([], kind="bytes", vocab_size=257).save(run / "tokenizer")
    _, _, _, state = init_state(cfg, make_mesh(1, 2, 2), {})
    ckpt = Checkpointer(run / "checkpoints", every=1, keep=1)
    ckpt.maybe_save(3, state, force=True)
    ckpt.close()
    return run


def test_cli_generates_text(run_dir, tmp_path, capsys):
    args = ["generate", "--run-dir", str(run_dir), "--prompt", "def ", "--max-new-tokens", "7"]
    listing = lambda: sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    before = listing()
    assert cli.main(args) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("def ") and len(greedy.encode("utf-8", "replace")) >= 4
    out = tmp_path / "gen.txt"
    assert cli.main([*args, "--set", "mesh.sequence=1", "--set", "mesh.model=1", "--out", str(out)]) == 0
    assert capsys.readouterr().out == greedy == out.read_text()  # the same text on another mesh, also in --out
    assert listing() == before  # generation reads the run dir only
    out.write_text("mine")  # --out never replaces a file unless asked (refused before anything is loaded)
    assert cli.main([*args, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"lcjax: error: --out {out} already exists (pass --overwrite to replace it)\n"
    assert out.read_text() == "mine"


def test_cli_refuses_what_cannot_fit_before_reading_the_checkpoint(run_dir, capsys, monkeypatch):
    from lcjax import checkpoint, memcheck

    monkeypatch.setattr(memcheck, "host_available_bytes", lambda: 1000)
    monkeypatch.setattr(checkpoint, "restore_params", None)  # never reached
    assert cli.main(["generate", "--run-dir", str(run_dir), "--prompt", "x", "--max-new-tokens", "100000000"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("lcjax: error: generating 100,000,000 tokens after a 1-token prompt "
                                               "needs ") and "--set train.check_memory=false" in err[0], err


@pytest.mark.parametrize("args, message", [
    (["--run-dir", "{missing}", "--prompt", "x"], "does not exist"),
    (["--run-dir", "{empty}", "--prompt", "x"], "holds no run"),
    (["--run-dir", "{nockpt}", "--prompt", "x"], "no checkpoint"),
    (["--run-dir", "{run}", "--prompt", ""], "--prompt must not be empty"),
    (["--run-dir", "{run}", "--prompt", "x", "--max-new-tokens", "-2"], "--max-new-tokens -2 must be >= 0"),
    (["--run-dir", "{run}", "--prompt", "x", "--temperature", "-1"], "--temperature -1.0 must be"),
    (["--run-dir", "{run}", "--prompt", "x", "--set", "model.n_layers=3"], "model.n_layers: generation cannot"),
    (["--run-dir", "{run}", "--prompt", "x", "--max-new-tokens", "3000000000"], "more than the 2,147,483,647 int32"),
    (["--run-dir", "{run}", "--prompt", "x", "--step", "9"], "no checkpoint at step 9 (saved: [3])"),
])
def test_cli_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nockpt").mkdir()
    (tmp_path / "nockpt" / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "nockpt": tmp_path / "nockpt",
             "run": run_dir}
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    run_before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert cli.main(["generate", *[a.format(**paths) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lcjax: error: ") and message in err[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == run_before
