"""PassKey: the prompt builder, argmax scoring on vocabulary-sharded hand-made logits, the grid on different
meshes from one checkpoint, the CLI's errors, the training mixture and the length curriculum."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lcjax import cli
from lcjax import config as config_lib
from lcjax.data import passkey as pk
from lcjax.data.curriculum import StagedLoader, curriculum_loader
from lcjax.data.loader import LoaderSpec, make_loader
from lcjax.data.tokenizer import load_or_train_tokenizer
from lcjax.eval.passkey import make_prompts, teacher_batch
from lcjax.ops.layout import unpermute
from lcjax.parallel import tensor
from lcjax.sharding.mesh import make_mesh

TOKENIZER = load_or_train_tokenizer([], kind="bytes", vocab_size=257)


def encode(text):
    return TOKENIZER.encode_batch([text])[0]


# --- prompts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [256, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_prompt_has_the_key_once_at_the_depth_and_the_length(length, depth):
    prompt = pk.build_prompt(encode, length=length, depth=depth, key=54321)
    assert abs(prompt.length - length) <= 0.01 * length  # exact, in fact
    assert prompt.length == length
    text = TOKENIZER.decode(prompt.tokens)
    assert text.count(pk.info_line(54321)) == 1 and text.count("54321") == 3  # twice in the line, once answered
    assert text.startswith(pk.TASK) and text.endswith(pk.QUESTION + " 54321")
    assert TOKENIZER.decode(prompt.tokens[prompt.answer]) == " 54321"
    assert TOKENIZER.decode(prompt.tokens[prompt.info]).strip() == pk.info_line(54321)
    head = len(encode(pk.TASK + "\n"))
    filler = len(prompt.tokens) - len(encode(pk.TASK + "\n")) - (prompt.info.stop - prompt.info.start) \
        - len(encode("\n" + pk.QUESTION)) - len(encode(" 54321"))
    before = prompt.info.start - head
    longest = max(len(encode(" " + s)) for s in pk.SENTENCES)
    assert 0 <= depth * filler - before < longest + 1  # moved back to the start of its sentence
    assert before == 0 or TOKENIZER.decode(prompt.tokens[:prompt.info.start]).endswith(".")
    mask = prompt.label_mask()
    assert mask.sum() == 6 and TOKENIZER.decode(prompt.tokens[1:][mask == 1]) == " 54321"


def test_corpus_filler_and_too_short_lengths():
    corpus = np.asarray(encode("def f(x):\n    return x + 1\n" * 100), np.int32)
    prompt = pk.build_prompt(encode, length=512, depth=0.5, key=11111, filler=pk.Filler(corpus))
    assert prompt.length == 512 and "return x" in TOKENIZER.decode(prompt.tokens)
    with pytest.raises(ValueError, match="too short"):
        pk.build_prompt(encode, length=100, depth=0.5, key=11111)
    with pytest.raises(ValueError, match=r"^depth 1\.5 must be in \[0, 1\] \(0-100 %\)$"):
        pk.build_prompt(encode, length=512, depth=1.5, key=11111)


# --- scoring ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_label_is_argmax_and_argmax_on_hand_made_sharded_logits(tp):
    vocab, padded = 10, 12  # ids 10, 11 are padding and never win
    logits = np.full((2, 4, padded), -1.0, np.float32)
    logits[0, 0, 3] = 5.0            # label 3 wins
    logits[0, 1, 7] = 5.0            # label 2 loses to 7
    logits[0, 2, [1, 9]] = 4.0       # a tie: the label 9 counts as a hit, argmax is the smaller id 1
    logits[0, 3, 11] = 99.0          # a padded id is ignored; label 0 (-1 like all others) ties and wins
    logits[1] = np.random.default_rng(0).normal(size=(4, padded))
    labels = np.array([[3, 2, 9, 0], np.argmax(logits[1, :, :vocab], -1)], np.int32)
    labels[1, 1] = (labels[1, 1] + 1) % vocab  # one wrong label in the random row
    mesh = make_mesh(1, 1, tp)

    def run(fn, out):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(None, None, "model"), P()), out_specs=out))(
            logits, labels)

    hit = run(lambda lg, lb: tensor.vocab_parallel_label_is_argmax(lg, lb, vocab_size=vocab, axis="model"), P())
    arg = run(lambda lg, lb: tensor.vocab_parallel_argmax(lg, vocab_size=vocab, axis="model"), P())
    np.testing.assert_array_equal(hit, [[True, False, True, True], [True, False, True, True]])
    np.testing.assert_array_equal(arg[0], [3, 7, 1, 0])
    np.testing.assert_array_equal(arg[1], np.argmax(logits[1, :, :vocab], -1))


def test_first_integer():
    from lcjax.eval.passkey import first_integer

    assert first_integer(" 12345.\nThe") == 12345 and first_integer("no digits") is None


# --- the grid from one checkpoint on several meshes ---------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir with an untrained tiny byte-level model's checkpoint (mesh data=2 x sequence=2 x model=2)."""
    from lcjax.checkpoint import Checkpointer
    from lcjax.train.state import init_state

    run = tmp_path_factory.mktemp("pk") / "run"
    cfg = config_lib.load(None, ["mesh.data=2", "mesh.sequence=2", "mesh.model=2", "model.n_layers=1",
                                 "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
                                 "model.vocab_size=257", "data.tokenizer=bytes", "data.seq_len=256",
                                 "data.global_batch=2", "attention.block_q=32", "attention.block_k=32",
                                 "model.init_std=0.5"])
    _, _, _, state = init_state(cfg, make_mesh(2, 2, 2), {})
    run.mkdir()
    (run / "config.yaml").write_text(config_lib.to_yaml(cfg))
    TOKENIZER.save(run / "tokenizer")
    ckpt = Checkpointer(run / "checkpoints", every=1, keep=1)
    ckpt.maybe_save(1, state, force=True)
    ckpt.close()
    return run


def _evaluator(run, mesh=None):
    from lcjax.eval import model as model_lib
    from lcjax.eval.passkey import Evaluator

    overrides = [f"mesh.data={mesh[0]}", f"mesh.sequence={mesh[1]}", f"mesh.model={mesh[2]}"] if mesh else []
    cfg = config_lib.load(run / "config.yaml", overrides)
    return Evaluator(cfg, *model_lib.load_params(cfg, run / "checkpoints"))


def _argmax(evaluator, batch):
    ids = evaluator._argmax(evaluator.params, evaluator._device(
        {k: batch[k] for k in ("tokens", "positions", "segment_ids")}))
    return unpermute(np.asarray(ids), evaluator.cfg.attention.layout, evaluator.cfg.mesh.sequence)


PROMPTS = [p for row in make_prompts(encode, 256, [0.0, 0.5, 1.0], 2, 0) for p in row]
MESHES = [(2, 2, 2), (1, 8, 1), (2, 1, 4)]


@pytest.mark.slow
def test_one_checkpoint_same_grid_on_every_mesh(run_dir):
    """The same correct/incorrect per prompt, the same greedy token at every position, the same
    generation, whatever the mesh."""
    results = []
    for mesh in MESHES:
        ev = _evaluator(run_dir, mesh)
        results.append((ev.teacher(PROMPTS, 2), _argmax(ev, teacher_batch(PROMPTS[:2])),
                        ev.generate(PROMPTS[:2], 2, 3)))
    assert len(np.unique(results[0][1])) > 10  # the argmax varies over positions: a real comparison
    for result in results[1:]:
        for a, b in zip(result, results[0]):
            np.testing.assert_array_equal(a, b)


def test_generate_mode_is_greedy_decoding_of_the_full_forward(run_dir):
    """--mode generate (prefill + KV-cache decode, lcjax.generate) on a 2x2x2 mesh gives the tokens a full
    forward pass over prompt + generated tokens calls greedy: token j is the argmax after token j-1."""
    ev, steps = _evaluator(run_dir, (2, 2, 2)), 4
    new = ev.generate(PROMPTS[:3], 2, steps)  # batches of 2: the last one padded
    assert new.shape == (3, steps) and new.dtype == np.int32
    batch = teacher_batch(PROMPTS[:4])
    starts = [p.answer.start for p in PROMPTS[:3]]
    for row, n in enumerate(starts):
        batch["tokens"][row, n:n + steps] = new[row]
    ids = _argmax(ev, batch)
    for row, n in enumerate(starts):
        np.testing.assert_array_equal(ids[row, n - 1:n - 1 + steps], new[row])


def test_scoring_over_token_tiles_equals_the_whole_logits(run_dir):
    """Logits in tiles of train.loss_tile tokens per shard (here 16 of 128) give the same argmax and the
    same misses as one tile; token_tile picks the largest divisor not above the target."""
    from lcjax.eval import model as model_lib
    from lcjax.eval.passkey import Evaluator

    whole = _evaluator(run_dir)
    cfg = config_lib.load(run_dir / "config.yaml", ["train.loss_tile=16"])
    tiled = Evaluator(cfg, *model_lib.load_params(cfg, run_dir / "checkpoints"))
    batch = teacher_batch(PROMPTS)
    np.testing.assert_array_equal(_argmax(tiled, batch), _argmax(whole, batch))
    np.testing.assert_array_equal(tiled.teacher(PROMPTS, 2), whole.teacher(PROMPTS, 2))
    assert model_lib.token_tile(128, cfg) == 16 and model_lib.token_tile(96, cfg) == 16
    assert model_lib.token_tile(3000, whole.cfg) == 1000 and model_lib.token_tile(96, whole.cfg) == 96
    assert model_lib.token_tile(24, config_lib.load(None, ["train.loss_tile=16"])) == 12


def test_teacher_scoring_counts_answer_tokens_that_are_not_the_argmax(run_dir):
    """Scoring on the model's own greedy tokens: answers made of them score 0 misses; k wrong tokens, k."""
    ev = _evaluator(run_dir)
    batch = teacher_batch(PROMPTS[:2])
    ids = _argmax(ev, batch)
    mask = batch["loss_mask"] == 1
    batch["labels"] = np.where(mask, ids, batch["labels"])
    row = np.flatnonzero(mask[1])
    batch["labels"][1, row[:2]] = (ids[1, row[:2]] + 1) % 257  # two wrong answer tokens in row 1
    misses = np.asarray(ev._score(ev.params, ev._device(batch)))
    np.testing.assert_array_equal(misses, [0, 2])


def test_cli_writes_json_and_png_and_refuses_bad_input(run_dir, capsys):
    code = cli.main(["eval", "passkey", "--run-dir", str(run_dir), "--depths", "3", "--samples", "2",
                     "--lengths", "256,320", "--set", "mesh.sequence=4", "--set", "mesh.data=1"])
    out = capsys.readouterr().out
    assert code == 0
    records = json.loads((run_dir / "passkey.json").read_text())
    assert [(r["length"], r["depth"]) for r in records] == [(n, d) for n in (256, 320) for d in (0, 50, 100)]
    assert all(set(r) == {"length", "depth", "accuracy", "samples"} and r["samples"] == 2 for r in records)
    assert (run_dir / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert re.search(r"depth % \\ length\s+256\s+320", out)
    first = (run_dir / "passkey.json").read_bytes()
    args = ["eval", "passkey", "--run-dir", str(run_dir), "--depths", "1", "--samples", "1", "--lengths", "256"]
    assert cli.main(args) == 0  # never replaces earlier results: a new pair of files
    assert "wrote " + str(run_dir / "passkey-2.json") in capsys.readouterr().out
    assert (run_dir / "passkey.json").read_bytes() == first and (run_dir / "passkey-2.png").is_file()
    assert cli.main([*args, "--out", str(run_dir / "passkey.json")]) == 2
    assert capsys.readouterr().err.startswith(f"lcjax: error: --out {run_dir / 'passkey.json'} already exists")
    assert cli.main([*args, "--out", str(run_dir / "passkey.json"), "--overwrite"]) == 0
    assert json.loads((run_dir / "passkey.json").read_text())[0]["length"] == 256
    for f in ("passkey.json", "passkey.png", "passkey-2.json", "passkey-2.png"):
        (run_dir / f).unlink()
    for args, message in [(["--lengths", "250"], "--lengths 250"), (["--lengths", "128"], "at least"),
                          (["--batch-size", "0"], "--batch-size 0 must be a positive multiple"),
                          (["--lengths", "-4"], "--lengths -4 must be >= 1"),
                          (["--set", "model.n_layers=3"], "model.n_layers: evaluation cannot change it"),
                          (["--out", "/sys/kernel/pk.json"], "--out /sys/kernel/pk.json: cannot write in"),
                          (["--lengths", "a,b"], "comma-separated"), (["--depths", "0"], "--depths 0"),
                          (["--filler", "noise"], "--filler"), (["--set", "model.d_model=abc"], "model.d_model"),
                          (["--samples", "0"], "--samples 0"), (["--step", "7"], "no checkpoint at step 7")]:
        code = cli.main(["eval", "passkey", "--run-dir", str(run_dir), *args])
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("lcjax: error: ") and message in err, err
        assert not (run_dir / "passkey.json").exists() and not (run_dir / "passkey.png").exists()


def test_cli_refuses_an_evaluation_that_cannot_fit(run_dir, capsys, monkeypatch):
    """Compiled for the longest length before the checkpoint is read; one line, nothing written."""
    from lcjax import memcheck
    from lcjax.eval import model as model_lib

    monkeypatch.setattr(memcheck, "host_available_bytes", lambda: int(1e6))
    monkeypatch.setattr(model_lib, "load_params", None)  # never reached
    code = cli.main(["eval", "passkey", "--run-dir", str(run_dir), "--lengths", "256,4096", "--batch-size", "4"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("lcjax: error: PassKey at 4,096 tokens x --batch-size 4 "
                                                             "needs "), err
    assert "shorter --lengths, a smaller --batch-size" in err[0] and not (run_dir / "passkey.json").exists()


# --- the training mixture and the curriculum ----------------------------------------------------------------


STREAM = np.asarray(encode("import os\nprint(os.getcwd())\n" * 400), np.int32)


def _loader(seq_len=128, batch=4, fraction=0.5):
    spec = LoaderSpec(seq_len=seq_len, global_batch=batch, seed=1, layout="zigzag", num_shards=2,
                      passkey_fraction=fraction, prefetch=0)
    return make_loader(STREAM, spec, tokenizer=TOKENIZER)


def test_passkey_mixture_rows():
    batches = [next(iter(_loader())) for _ in range(2)]
    np.testing.assert_array_equal(batches[0]["tokens"], batches[1]["tokens"])  # determined by the batch index
    loader, count, synthetic = _loader(), 0, 0
    for _ in range(4):
        b = {k: unpermute(v, "zigzag", 2) for k, v in next(loader).items()}
        for r in range(4):
            text = TOKENIZER.decode(b["tokens"][r])
            if pk.QUESTION not in text:
                assert b["loss_mask"][r].sum() > 100  # a plain LM window
                continue
            count += 1
            synthetic += "The sky is blue." in text
            key = re.search(r"pass key is (\d{5})", text).group(1)
            assert TOKENIZER.decode(b["labels"][r][b["loss_mask"][r] == 1]) == f" {key}."
            assert TOKENIZER.decode(b["labels"][r][-6:]) == f"{key}."
            np.testing.assert_array_equal(b["positions"][r], np.arange(128))
            assert (b["segment_ids"][r] == 1).all()
    assert 2 <= count <= 14 and 1 <= synthetic < count  # data.passkey_synthetic 0.5: both kinds of filler
    with pytest.raises(ValueError, match="too short for PassKey"):
        _loader(seq_len=64)


def test_curriculum_changes_shapes_and_resumes_exactly():
    stages = [(2, 64, 8), (3, 128, 4), (5, 256, 2)]
    make = lambda spec: make_loader(STREAM, spec)
    spec = LoaderSpec(seq_len=256, global_batch=2, seed=1, layout="zigzag", num_shards=2, prefetch=0)
    loader = curriculum_loader(make, stages, spec)
    assert isinstance(loader, StagedLoader)
    batches = [next(loader) for _ in range(6)]
    assert [b["tokens"].shape for b in batches] == [(8, 64), (8, 64), (4, 128), (2, 256), (2, 256), (2, 256)]
    for cut in (1, 2, 3, 4):
        again = curriculum_loader(make, stages, spec)
        state = dict(zip(["batch"], [cut]))
        again.set_state({**loader.get_state(), **state})
        for b in batches[cut:]:
            np.testing.assert_array_equal(next(again)["tokens"], b["tokens"])
    with pytest.raises(ValueError, match="data.seq_len"):
        again.set_state({**loader.get_state(), "seq_len": 64})


@pytest.mark.parametrize("curriculum,message", [
    ("[[10,128,4],[5,256,4]]", "until_step must be > 10"),
    ("[[10,8192,4]]", "seq_len must be in [1, data.seq_len = 4096]"),
    ("[[10,128,3]]", "multiple of mesh.data = 2"),
    ("[[10,128]]", "must be [until_step, seq_len, global_batch]"),
])
def test_bad_curricula(curriculum, message):
    with pytest.raises(ValueError) as info:
        config_lib.load(None, ["mesh.data=2", "mesh.sequence=4", "data.global_batch=2",
                               f"data.curriculum={curriculum}"])
    assert message in str(info.value)
    d = config_lib.load(None, ["data.passkey_fraction=0.5", "data.passkey_synthetic=0.25"]).data
    assert (d.passkey_fraction, d.passkey_synthetic) == (0.5, 0.25)
    with pytest.raises(ValueError, match="data.passkey_fraction 2.0 must be a fraction"):
        config_lib.load(None, ["data.passkey_fraction=2"])


@pytest.mark.slow  # about 1-2 minutes on 2 loaded cores: three short trainings, two compiles each
def test_training_with_mixture_and_curriculum_resumes_exactly(tmp_path):
    """The loop recompiles at a stage change, and a run stopped at the change and resumed logs the same
    losses as one that was not (the batch counter determines the batches)."""
    from pathlib import Path

    from lcjax.train.loop import train

    root = Path(__file__).resolve().parents[2]
    sets = ["mesh.data=2", "mesh.sequence=2", "mesh.model=2", "model.n_layers=1", "model.d_model=32",
            "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64", "model.vocab_size=257",
            "data.tokenizer=bytes", f"data.source=files:{root / 'lcjax' / 'data'}", "data.seq_len=256",
            "data.global_batch=2", "data.passkey_fraction=0.5", "data.curriculum=[[2,128,4]]",
            "attention.block_q=32", "attention.block_k=32", "train.warmup_steps=0", "train.min_lr_ratio=1.0",
            f"data.cache_dir={tmp_path / 'cache'}", "checkpoint.every=2"]
    cfg = lambda steps: config_lib.load(None, [*sets, f"train.steps={steps}"])
    losses = lambda run: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    train(cfg(4), tmp_path / "straight", progress=False)
    train(cfg(2), tmp_path / "resumed", progress=False)
    train(cfg(4), tmp_path / "resumed", resume=True, progress=False)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert all(loss is not None for loss in losses(tmp_path / "straight"))
