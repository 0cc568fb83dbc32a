"""TFDS sources without TensorFlow, ``lcjax data prepare|tokenizer``, and loading Hugging Face tokenizers."""

from __future__ import annotations

import json
import shlex
import sys

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from lcjax import cli
from lcjax.data import build_dataset
from lcjax.data.tokenizer import Tokenizer, load_or_train_tokenizer

TEXTS = {"notes/a.txt": "First document.\nWith two lines.\n",
         "notes/b.md": "# Second\n\nnaïve café 東京 🙂\n" * 3,
         "code/c.py": "def f(x):\n    return x * 2\n" * 4}


class _HideTensorFlow:
    """Wraps an import finder so that TensorFlow looks uninstalled (find_spec None, import fails)."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        find = getattr(self._finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self._finder, attr)


@pytest.fixture(autouse=True)
def no_tensorflow(monkeypatch):
    """Every test here runs with TensorFlow unimportable, whether or not it is installed."""
    if "tensorflow" in sys.modules:
        pytest.skip("TensorFlow was imported before this test")
    monkeypatch.setattr(sys, "meta_path", [_HideTensorFlow(f) for f in sys.meta_path])


@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / "texts"
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "notes" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (root / "notes" / "empty.txt").write_bytes(b"")
    (root / "code" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return root


def _run(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err.strip().splitlines()


def _overrides(line: str) -> dict[str, str]:
    words = shlex.split(line)
    assert words[::2] == ["--set"] * (len(words) // 2)
    return dict(w.split("=", 1) for w in words[1::2])


def test_prepare_round_trip_without_tensorflow(corpus_dir, tmp_path, capsys):
    out = tmp_path / "tfds"
    code, lines, err = _run(capsys, "data", "prepare", "--source", f"files:{corpus_dir}", "--out", out,
                            "--tokenizer", "bpe", "--vocab-size", 300, "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert "skipped: 1 binary, 1 empty, 1 not UTF-8" in lines[0]
    sets = _overrides(lines[-1])
    assert sets["data.source"] == "tfds:lcjax_text" and sets["data.data_dir"] == str(out)
    assert (out / "lcjax_text" / "1.0.0" / "lcjax_text-train.array_record-00000-of-00001").is_file()

    import tensorflow_datasets as tfds  # the plain TFDS reader sees one example per document, in order

    records = tfds.data_source("lcjax_text", data_dir=out, split="train")
    names = sorted(TEXTS)
    assert [r["name"].decode() for r in records] == names
    data = build_dataset(sets["data.source"], tokenizer_kind=sets["data.tokenizer"],
                         vocab_size=int(sets["model.vocab_size"]), cache_dir=tmp_path / "cache",
                         data_dir=sets["data.data_dir"])
    tok = data.tokenizer
    assert tok.vocab_size == int(sets["model.vocab_size"]) <= 300
    ends = np.append(data.doc_starts[1:], len(data.tokens))
    assert [tok.decode(data.tokens[s:e - 1]) for s, e in zip(data.doc_starts, ends)] == [TEXTS[n] for n in names]
    assert np.all(data.tokens[ends - 1] == tok.eos_id)
    direct = build_dataset(f"files:{corpus_dir}", tokenizer_kind=sets["data.tokenizer"], vocab_size=300,
                           cache_dir=tmp_path / "cache2")
    np.testing.assert_array_equal(direct.tokens, data.tokens)  # the same stream as the files: quick path
    assert "tensorflow" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}


@pytest.mark.parametrize("args, message", [
    (["--source", "files:{root}/missing"], "--source files:{root}/missing: path {root}/missing does not exist"),
    (["--source", "files:{root}/notes/image.png"], r"image.png: file .* is not readable text \(binary\)"),
    (["--source", "files:{root}/nothing"], "no readable text files found"),
    (["--source", "files:{root}", "--name", "Bad-Name"], "--name 'Bad-Name' must be lower case"),
    (["--source", "files:{root}", "--tokenizer", "{root}/none.json"], "--tokenizer .*none.json.* does not exist"),
    (["--source", "files:{root}", "--vocab-size", "100"], "--vocab-size 100 must be >= 257"),
])
def test_prepare_bad_input_is_one_line_and_writes_nothing(corpus_dir, tmp_path, capsys, args, message):
    (corpus_dir / "nothing").mkdir()
    (corpus_dir / "nothing" / "blob").write_bytes(b"\x00")
    out = tmp_path / "out"
    args = [a.format(root=corpus_dir) for a in args]
    code, lines, err = _run(capsys, "data", "prepare", *args, "--out", out, "--cache-dir", tmp_path / "cache")
    assert code == 2 and len(err) == 1 and err[0].startswith("lcjax: error: ")
    import re
    assert re.search(message.format(root=corpus_dir), err[0]), err[0]
    assert not out.exists()


def test_prepare_refuses_an_existing_dataset(corpus_dir, tmp_path, capsys):
    args = ["data", "prepare", "--source", f"files:{corpus_dir}", "--out", tmp_path / "o", "--tokenizer", "bytes"]
    assert _run(capsys, *args)[0] == 0
    info = (tmp_path / "o" / "lcjax_text" / "1.0.0" / "dataset_info.json").read_bytes()
    code, _, err = _run(capsys, *args)
    assert code == 2 and "already exists" in err[0]
    assert (tmp_path / "o" / "lcjax_text" / "1.0.0" / "dataset_info.json").read_bytes() == info


def _catalogue_like(data_dir, texts):
    """A TFDS dataset with a 'text' feature and a config, as a catalogue dataset prepared elsewhere."""
    import tensorflow_datasets as tfds

    class FakeCatalogue(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("2.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="en")]

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "id": np.int64}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(texts), "test": self._generate_examples(["held out"])}

        def _generate_examples(self, items):
            for i, text in enumerate(items):
                yield i, {"text": text, "id": i}

    builder = FakeCatalogue(data_dir=str(data_dir), config="en", file_format="array_record")
    builder.download_and_prepare(download_dir=str(data_dir / "downloads"))


def test_text_datasets_are_tokenized_with_the_configured_tokenizer(tmp_path):
    texts = list(TEXTS.values())
    _catalogue_like(tmp_path / "tfds", texts)
    data = build_dataset("tfds:fake_catalogue/en", tokenizer_kind="bytes", vocab_size=257,
                         cache_dir=tmp_path / "cache", data_dir=tmp_path / "tfds")
    want = np.concatenate([np.frombuffer(t.encode() + b"", np.uint8).astype(np.int64).tolist() + [256]
                           for t in texts])
    np.testing.assert_array_equal(data.tokens, want)
    bpe = build_dataset("tfds:fake_catalogue/en", tokenizer_kind="bpe", vocab_size=290,
                        cache_dir=tmp_path / "cache", data_dir=tmp_path / "tfds")
    assert 257 < bpe.tokenizer.vocab_size <= 290 and len(bpe.doc_starts) == len(texts)


@pytest.mark.parametrize("source, data_dir, message", [
    ("tfds:unknown_name", "tfds", r"data.source tfds:unknown_name: no prepared TFDS dataset unknown_name under "
                                  r"data.data_dir .* \(found: lcjax_text\)"),
    ("tfds:lcjax_text/nope", "tfds", "no prepared TFDS dataset lcjax_text/nope"),
    ("tfds:Upper", "tfds", "must be 'tfds:NAME"),
    ("tfds:lcjax_text", "missing", r"data.data_dir .*missing does not exist"),
])
def test_bad_tfds_sources_raise_one_line(corpus_dir, tmp_path, capsys, source, data_dir, message):
    _run(capsys, "data", "prepare", "--source", f"files:{corpus_dir}", "--out", tmp_path / "tfds",
         "--tokenizer", "bytes")
    with pytest.raises(ValueError, match=message) as err:
        build_dataset(source, tokenizer_kind="bytes", vocab_size=257, data_dir=tmp_path / data_dir)
    assert "\n" not in str(err.value)


def test_token_dataset_refuses_another_tokenizer(corpus_dir, tmp_path, capsys):
    _run(capsys, "data", "prepare", "--source", f"files:{corpus_dir}", "--out", tmp_path / "tfds",
         "--vocab-size", 280, "--cache-dir", tmp_path / "cache")
    for kind in ("bytes", "bpe"):
        with pytest.raises(ValueError, match=f"data.tokenizer {kind}: .* set data.tokenizer=.*tokenizer.json"):
            build_dataset("tfds:lcjax_text", tokenizer_kind=kind, vocab_size=280, data_dir=tmp_path / "tfds")


def test_tokenizer_command_trains_a_bpe_that_training_can_load(corpus_dir, tmp_path, capsys):
    code, lines, err = _run(capsys, "data", "tokenizer", "--source", f"files:{corpus_dir}", "--vocab-size", 300,
                            "--out", tmp_path / "tok")
    assert code == 0, err
    sets = _overrides(lines[-1])
    tok = Tokenizer.load(sets["data.tokenizer"])
    assert tok.vocab_size == int(sets["model.vocab_size"]) <= 300
    text = TEXTS["notes/b.md"]
    assert tok.decode(tok.encode_batch([text])[0]) == text
    code, _, err = _run(capsys, "data", "tokenizer", "--source", f"files:{corpus_dir}", "--vocab-size", 300,
                        "--out", tmp_path / "tok")
    assert code == 2 and "already holds a tokenizer.json" in err[0]


def test_hugging_face_tokenizer_json_with_its_own_eos(tmp_path, corpus_dir):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}}
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    folder = tmp_path / "hf"
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    tok = load_or_train_tokenizer([], kind=str(folder), vocab_size=4096)
    assert (tok.eos_id, tok.vocab_size) == (2, len(vocab))
    data = build_dataset(f"files:{corpus_dir}", tokenizer_kind=str(folder / "tokenizer.json"), vocab_size=4096,
                         cache_dir=tmp_path / "cache")
    assert np.sum(data.tokens == 2) == len(TEXTS)
    (folder / "tokenizer_config.json").unlink()
    assert Tokenizer.load(folder).eos_id == 2  # found by name among the usual EOS tokens
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        Tokenizer.load(folder, field="data.tokenizer")


# --- config keys and training on a prepared dataset ----------------------------------------------------------


@pytest.mark.parametrize("sets, message", [
    (["data.workers=-1"], "data.workers -1 must be >= 0"),
    (["data.tokenizer=words"], "data.tokenizer 'words' must be one of bpe, bytes or a path"),
    (["data.source=hf:x"], "data.source 'hf:x' must be 'stdlib', 'files:PATH"),
])
def test_data_config_rules(sets, message):
    from lcjax import config as config_lib

    with pytest.raises(ValueError, match=message):
        config_lib.load(None, sets)
    cfg = config_lib.load(None, ["data.workers=2", "data.data_dir=/d", "data.tokenizer=/t/tokenizer.json",
                                 "data.source=tfds:name/config"])
    assert (cfg.data.workers, cfg.data.data_dir, cfg.data.tokenizer) == (2, "/d", "/t/tokenizer.json")


SMALL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
         "data.seq_len=32", "data.global_batch=2", "attention.block_q=8", "attention.block_k=8",
         "train.lr=3e-3", "train.warmup_steps=1", "train.min_lr_ratio=1.0", "checkpoint.every=2",
         "mesh.data=2", "mesh.sequence=2", "mesh.model=2"]


@pytest.mark.slow
def test_training_on_a_prepared_dataset_resumes_exactly_with_worker_processes(corpus_dir, tmp_path, capsys):
    """prepare → train 4 steps; and train 2 steps, resume with 2 Grain worker processes to step 4: the same
    losses bit for bit; a changed tokenizer file is refused on resume."""
    from lcjax import config as config_lib
    from lcjax.train.loop import train

    for i in range(30):  # enough windows for a few batches
        (corpus_dir / "more" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (corpus_dir / "more" / f"{i}.txt").write_text(f"document {i}: " + "lorem ipsum dolor " * (i + 3))
    code, lines, err = _run(capsys, "data", "prepare", "--source", f"files:{corpus_dir}", "--out", tmp_path / "tfds",
                            "--tokenizer", "bytes")
    assert code == 0, err
    sets = [*SMALL, *shlex.split(lines[-1])[1::2], f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = lambda *extra: config_lib.load(None, [*sets, *extra])
    losses = lambda run: [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    train(cfg("train.steps=4"), tmp_path / "straight", progress=False)
    train(cfg("train.steps=2"), tmp_path / "resumed", progress=False)
    train(cfg("train.steps=4", "data.workers=2"), tmp_path / "resumed", resume=True, progress=False)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    tokenizer = tmp_path / "tfds" / "lcjax_text" / "1.0.0" / "tokenizer.json"
    text = tokenizer.read_text().replace('"<|endoftext|>"', '"<|end_of_text|>"')
    tokenizer.write_text(text)  # another tokenizer under the same path: the checkpoint's data state refuses it
    before = (tmp_path / "resumed" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="token stream id .* the data iterator cannot be restored"):
        train(cfg("train.steps=6"), tmp_path / "resumed", resume=True, progress=False)
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text() == before
