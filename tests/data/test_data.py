"""Tests of lcjax.data: corpus selection, tokenizers, the token stream cache, packing and the Grain loader."""

from __future__ import annotations

import json
import pathlib
import sysconfig

import numpy as np
import pytest

from lcjax.data import build_dataset, corpus, loader, tokenizer, tokens
from lcjax.data.corpus import corpus_files, corpus_fingerprint
from lcjax.data.loader import LoaderSpec, make_loader, num_windows
from lcjax.data.tokenizer import Tokenizer, load_or_train_tokenizer
from lcjax.data.tokens import load_or_tokenize, token_dtype
from lcjax.ops.layout import unpermute

DOCS = {
    "a.py": "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n" * 3,
    "b/c.txt": "Grüße aus Köln — naïve café, 東京 and emoji 🙂.\n" * 4,
    "b/d/e.md": "# Title\n\nSome *markdown* with <|endoftext|> inside, and tabs\tand  spaces.\n",
    "b/empty.txt": "",
    "z.py": "class Thing:\n    '''Docstring.'''\n    x = [i * i for i in range(10)]\n" * 5,
}


@pytest.fixture
def corpus_dir(tmp_path) -> pathlib.Path:
    root = tmp_path / "corpus"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "b" / "binary.bin").write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    (root / ".hidden").write_text("hidden")
    return root


@pytest.fixture
def cache_dir(tmp_path) -> pathlib.Path:
    return tmp_path / "cache"


def _names(files, root):
    return [p.relative_to(root).as_posix() for p in files]


# --- corpus -----------------------------------------------------------------------------------------------


TEXT_DOCS = sorted(n for n, text in DOCS.items() if text)  # empty files are skipped


def test_folder_gives_sorted_text_files_without_hidden(corpus_dir):
    files = corpus_files(f"files:{corpus_dir}")
    assert _names(files, corpus_dir) == TEXT_DOCS


def test_paths_keep_their_order(corpus_dir):
    files = corpus_files(f"files:{corpus_dir / 'z.py'}, {corpus_dir / 'b'}")
    assert _names(files, corpus_dir) == ["z.py", "b/c.txt", "b/d/e.md"]


def test_binary_empty_and_non_utf8_files_in_folders_are_skipped_and_counted(corpus_dir):
    (corpus_dir / "b" / "nul.txt").write_bytes(b"valid UTF-8 \x00 but binary")
    (corpus_dir / "b" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    files, skipped = corpus.scan(f"files:{corpus_dir}")
    assert _names(files, corpus_dir) == TEXT_DOCS
    assert skipped == {"binary": 2, "empty": 1, "not UTF-8": 1}
    assert corpus.describe_skipped(skipped) == "2 binary, 1 empty, 1 not UTF-8"


@pytest.mark.parametrize("source, message", [
    ("foo", r"data.source 'foo' must be 'stdlib', 'files:PATH\[,PATH\.\.\.\]' or 'tfds:NAME\[/CONFIG\]'"),
    ("files:", "must name at least one path"),
    ("files:{root}/missing", "does not exist"),
    ("files:{root}/b/binary.bin", r"is not readable text \(binary\)"),
    ("files:{root}/b/empty.txt", r"is not readable text \(empty\)"),
    ("files:{root}/nothing", r"no readable text files found \(skipped: 1 binary, 1 empty\)"),
])
def test_bad_sources_raise_one_line(corpus_dir, source, message):
    (corpus_dir / "nothing").mkdir()
    (corpus_dir / "nothing" / "x.bin").write_bytes(b"\x00\x01")
    (corpus_dir / "nothing" / "y.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=message) as err:
        corpus_files(source.format(root=corpus_dir))
    assert "data.source" in str(err.value) and "\n" not in str(err.value)


def test_stdlib_lists_utf8_python_files_outside_site_packages():
    files = corpus_files("stdlib")
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 500 and files == sorted(files)
    assert all(p.suffix == ".py" and stdlib in p.parents for p in files)
    assert not any({"site-packages", "dist-packages"} & set(p.parts) for p in files)


def test_fingerprint_follows_content_not_location(corpus_dir, tmp_path):
    files = corpus_files(f"files:{corpus_dir}")
    copy = tmp_path / "copy"
    for path, name in zip(files, _names(files, corpus_dir)):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(path.read_bytes())
    assert corpus_fingerprint(corpus_files(f"files:{copy}")) == corpus_fingerprint(files)
    (copy / "a.py").write_text("changed")
    assert corpus_fingerprint(corpus_files(f"files:{copy}")) != corpus_fingerprint(files)


# --- tokenizer --------------------------------------------------------------------------------------------


def _bpe(corpus_dir, cache_dir, vocab_size=320):
    return load_or_train_tokenizer(corpus_files(f"files:{corpus_dir}"), kind="bpe", vocab_size=vocab_size,
                                   cache_dir=cache_dir)


def test_bpe_round_trips_any_text(corpus_dir, cache_dir):
    tok = _bpe(corpus_dir, cache_dir)
    texts = [*DOCS.values(), "unseen: ½ ∑ \x00 \r\n", "<|endoftext|>"]
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids) == text
        assert tok.eos_id not in ids
    assert 257 <= tok.vocab_size <= 320
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"


def test_bpe_is_cached_and_deterministic(corpus_dir, cache_dir, tmp_path, monkeypatch):
    first = _bpe(corpus_dir, cache_dir)
    assert len(list((cache_dir / "tokenizers").iterdir())) == 1
    fresh = _bpe(corpus_dir, tmp_path / "other-cache")  # trained again from scratch
    assert fresh.fingerprint == first.fingerprint

    def no_training(*args):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(tokenizer, "_train_bpe", no_training)
    again = _bpe(corpus_dir, cache_dir)
    text = [DOCS["z.py"]]
    assert again.encode_batch(text) == first.encode_batch(text)
    assert _bpe(corpus_dir, cache_dir).fingerprint == first.fingerprint


def test_cache_dir_defaults_to_env(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LCJAX_CACHE", str(tmp_path / "env-cache"))
    _bpe(corpus_dir, None)
    assert (tmp_path / "env-cache" / "tokenizers").is_dir()


def test_save_and_load(corpus_dir, cache_dir, tmp_path):
    tok = _bpe(corpus_dir, cache_dir)
    path = tok.save(tmp_path / "run")
    assert path.name == "tokenizer.json" and json.loads(path.read_text())["model"]["type"] == "BPE"
    loaded = Tokenizer.load(tmp_path / "run")
    assert (loaded.vocab_size, loaded.eos_id, loaded.fingerprint) == (tok.vocab_size, tok.eos_id, tok.fingerprint)
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.load(tmp_path / "nowhere")


def test_bytes_tokenizer_uses_byte_values():
    tok = load_or_train_tokenizer([], kind="bytes", vocab_size=1000)
    text = "héllo\t<|endoftext|>\x00"
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.encode_batch([text]) == [list(text.encode())]
    assert tok.decode(list(text.encode())) == text


@pytest.mark.parametrize("kind, vocab, message", [
    ("words", 1000, "data.tokenizer 'words' must be bpe, bytes or a Hugging Face tokenizer.json"),
    ("bpe", 256, "model.vocab_size 256 must be >= 257"),
])
def test_bad_tokenizer_arguments(kind, vocab, message):
    with pytest.raises(ValueError, match=message):
        load_or_train_tokenizer([], kind=kind, vocab_size=vocab)


# --- token stream -----------------------------------------------------------------------------------------


def test_token_stream_appends_eos_to_each_document(corpus_dir, cache_dir):
    data = build_dataset(f"files:{corpus_dir}", tokenizer_kind="bpe", vocab_size=320, cache_dir=cache_dir)
    tok, stream, starts = data.tokenizer, data.tokens, data.doc_starts
    assert isinstance(stream, np.memmap) and stream.dtype == np.uint16 and starts.dtype == np.int64
    ends = np.append(starts[1:], len(stream))
    assert starts[0] == 0 and np.all(stream[ends - 1] == tok.eos_id)
    assert np.sum(stream == tok.eos_id) == len(TEXT_DOCS)  # the literal "<|endoftext|>" in e.md is not EOS
    assert data.skipped == {"binary": 1, "empty": 1}
    assert "skipped files: 1 binary, 1 empty" in data.summary(8)[0]
    texts = [DOCS[n] for n in TEXT_DOCS]
    assert [tok.decode(stream[s:e - 1]) for s, e in zip(starts, ends)] == texts


def test_token_stream_is_cached(corpus_dir, cache_dir, monkeypatch):
    files = corpus_files(f"files:{corpus_dir}")
    tok = load_or_train_tokenizer(files, kind="bytes", vocab_size=257)
    first, starts = load_or_tokenize(files, tok, cache_dir=cache_dir)
    monkeypatch.setattr(tokens, "_write_stream", lambda *a: pytest.fail("tokenized again"))
    second, starts2 = load_or_tokenize(files, tok, cache_dir=cache_dir)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(starts, starts2)
    assert [p.name.startswith(".") for p in (cache_dir / "tokens").iterdir()] == [False]


def test_interrupted_tokenization_leaves_no_cache(corpus_dir, cache_dir, monkeypatch):
    files = corpus_files(f"files:{corpus_dir}")
    tok = load_or_train_tokenizer(files, kind="bytes", vocab_size=257)
    monkeypatch.setattr(tokens, "CHUNK_BYTES", 10)  # many chunks: fail after the first write
    calls = iter(range(100))
    real = Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode_batch",
                        lambda self, t: real(self, t) if next(calls) == 0 else pytest.fail("killed"))
    with pytest.raises(pytest.fail.Exception):
        load_or_tokenize(files, tok, cache_dir=cache_dir)
    assert list((cache_dir / "tokens").iterdir()) == []


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# --- packing and loader -----------------------------------------------------------------------------------

# A synthetic stream: token value = its offset, so a token names its place; documents of varied lengths.
DOC_LENGTHS = [5, 3, 9, 1, 2, 17, 4, 8, 6, 11, 3, 7, 10, 2, 5, 9]
STREAM = np.arange(sum(DOC_LENGTHS), dtype=np.uint16)
STARTS = np.concatenate([[0], np.cumsum(DOC_LENGTHS[:-1])]).astype(np.int64)


def _loader(seed=0, layout="zigzag", shards=2, seq_len=8, batch=4, stream=None, vocab_size=None, **kw):
    spec = LoaderSpec(seq_len=seq_len, global_batch=batch, seed=seed, layout=layout, num_shards=shards, **kw)
    return make_loader(STREAM, spec, doc_starts=STARTS, stream=stream, vocab_size=vocab_size)


def _natural(batch, layout="zigzag", shards=2):
    return {k: unpermute(v, layout, shards, axis=1) for k, v in batch.items()}


def _expected(offsets: np.ndarray) -> dict[str, np.ndarray]:
    """Positions, segments and loss mask of inputs at stream offsets [B, T], from first principles."""
    doc = np.searchsorted(STARTS, offsets, side="right") - 1
    first = offsets[:, :1]
    return {"positions": offsets - np.maximum(STARTS[doc], first),
            "segment_ids": doc - doc[:, :1] + 1,
            "loss_mask": ~np.isin(offsets + 1, STARTS)}


def test_batches_are_windows_with_shifted_labels_and_packing():
    lo = _loader()
    for _ in range(3):
        b = _natural(next(lo))
        assert set(b) == set(loader.FIELDS)
        assert all(v.dtype == np.int32 and v.shape == (4, 8) for v in b.values())
        offsets = b["tokens"]  # token value == stream offset
        assert np.all(offsets[:, 0] % 8 == 0)
        np.testing.assert_array_equal(offsets, offsets[:, :1] + np.arange(8))
        np.testing.assert_array_equal(b["labels"], offsets + 1)
        for name, want in _expected(offsets).items():
            np.testing.assert_array_equal(b[name], want, err_msg=name)
    lo.close()


def test_window_restarts_positions_per_document():
    # window 2 holds offsets 16..23: the last token of doc 2 (8..16), doc 3 (17), doc 4 (18..19), doc 5 (20..).
    w = loader.window(STREAM, STARTS, 2, 8)
    np.testing.assert_array_equal(w["tokens"], np.arange(16, 24))
    np.testing.assert_array_equal(w["positions"], [0, 0, 0, 1, 0, 1, 2, 3])
    np.testing.assert_array_equal(w["segment_ids"], [1, 2, 3, 3, 4, 4, 4, 4])
    np.testing.assert_array_equal(w["loss_mask"], [0, 0, 1, 0, 1, 1, 1, 1])


def test_cross_document_attention_runs_positions_across_the_window():
    b = _natural(next(_loader(cross_document_attention=True)))
    np.testing.assert_array_equal(b["positions"], np.broadcast_to(np.arange(8), (4, 8)))
    assert np.all(b["segment_ids"] == 1) and np.all(b["loss_mask"] == 1)


def test_layout_is_applied_to_every_field():
    raw = next(_loader(layout="contiguous", shards=1))
    for layout, shards in [("zigzag", 2), ("striped", 4), ("zigzag", 4)]:
        b = next(_loader(layout=layout, shards=shards))
        for name in loader.FIELDS:
            np.testing.assert_array_equal(unpermute(b[name], layout, shards, axis=1), raw[name])
        assert not np.array_equal(b["tokens"], raw["tokens"])


def test_seed_determines_the_batches():
    def take(seed, n=4):
        lo = _loader(seed=seed)
        return np.stack([next(lo)["tokens"] for _ in range(n)])

    np.testing.assert_array_equal(take(3), take(3))
    assert not np.array_equal(take(3), take(4))


def test_each_epoch_is_a_new_permutation_of_all_windows():
    windows = num_windows(len(STREAM), 8)  # 12 windows, 3 batches of 4 per epoch
    lo = _loader(batch=4)
    starts = np.concatenate([next(lo)["tokens"][:, 0] // 8 for _ in range(2 * windows // 4)])
    first, second = starts[:windows], starts[windows:]
    assert sorted(first) == sorted(second) == list(range(windows))
    assert list(first) != list(second)


def test_state_restores_exactly():
    lo = _loader(seed=7)
    for _ in range(3):
        next(lo)
    state = json.loads(json.dumps(lo.get_state()))
    want = [next(lo) for _ in range(2)]
    restored = _loader(seed=7, layout="striped", shards=4)  # another mesh: same batches, other layout
    restored.set_state(state)
    for w, got in zip(want, [next(restored) for _ in range(2)]):
        for name in loader.FIELDS:
            np.testing.assert_array_equal(_natural(w)[name], unpermute(got[name], "striped", 4, axis=1))


def test_state_of_other_data_is_refused():
    state = _loader(seed=1).get_state()
    with pytest.raises(ValueError, match=r"^data\.seed: the checkpoint's data state has 1 but this run has 2; "
                                         r"the data iterator cannot be restored$"):
        _loader(seed=2).set_state(state)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch=13), "data.global_batch 13 needs 13 windows .* only 12"),
    (dict(seq_len=200, batch=1), "data.global_batch 1 needs 1 windows of data.seq_len 200 .* only 0"),
    (dict(seq_len=0), "data.seq_len 0 must be >= 1"),
    (dict(seed=-1), "data.seed -1 must be in"),
])
def test_loader_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _loader(**kwargs)


def test_data_package_never_imports_jax():
    sources = pathlib.Path(corpus.__file__).parent.glob("*.py")
    assert not [p.name for p in sources if "import jax" in p.read_text() or "from jax" in p.read_text()]


def test_resume_at_every_batch_gives_exactly_the_uninterrupted_batches():
    straight = _loader(seed=5, prefetch=3)
    want = [next(straight) for _ in range(8)]  # more than two epochs of 3 batches
    for cut in range(8):
        lo = _loader(seed=5)
        for _ in range(cut):
            next(lo)
        state = json.loads(json.dumps(lo.get_state()))
        lo.close()
        assert state["batch"] == cut and all(isinstance(v, int) for v in state.values())
        resumed = _loader(seed=5, prefetch=0)
        resumed.set_state(state)
        for w in want[cut:]:
            got = next(resumed)
            assert all(np.array_equal(w[k], got[k]) for k in loader.FIELDS)
        resumed.close()


def test_worker_processes_give_the_same_batches_and_restore_exactly(tmp_path):
    path = tmp_path / "stream.bin"
    STREAM.tofile(path)
    stream = np.memmap(path, dtype=STREAM.dtype, mode="r", shape=STREAM.shape)  # travels as a file name

    def make(workers):
        spec = LoaderSpec(seq_len=8, global_batch=4, seed=3, layout="zigzag", num_shards=2, workers=workers)
        return make_loader(stream, spec, doc_starts=STARTS)

    threads = make(0)
    want = [next(threads) for _ in range(7)]
    threads.close()
    procs = make(2)
    first = [next(procs) for _ in range(3)]
    state = procs.get_state()
    procs.close()
    resumed = make(2)
    resumed.set_state(state)
    rest = [next(resumed) for _ in range(4)]
    resumed.close()
    for w, got in zip(want, first + rest):
        assert all(np.array_equal(w[k], got[k]) for k in loader.FIELDS)


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_are_contiguous_rows_of_the_same_global_batch(count):
    full = _loader(batch=4)
    want = [next(full) for _ in range(4)]
    parts = [_loader(batch=4, process_index=i, process_count=count) for i in range(count)]
    for w in want:
        got = [next(p) for p in parts]
        assert all(g["tokens"].shape == (4 // count, 8) for g in got)
        for name in loader.FIELDS:
            np.testing.assert_array_equal(np.concatenate([g[name] for g in got]), w[name])
    state = parts[1].get_state()
    restored = _loader(batch=4)  # a state of one process restores the global position for any count
    restored.set_state(state)
    np.testing.assert_array_equal(next(restored)["tokens"], next(full)["tokens"])


def test_state_of_another_stream_or_vocabulary_is_refused():
    lo = _loader(stream=11, vocab_size=257)
    with pytest.raises(ValueError, match="vocabulary size .* checkpoint's data state has 257 but this run has 4096"):
        _loader(stream=11, vocab_size=4096).set_state(lo.get_state())
    with pytest.raises(ValueError, match="token stream id"):
        _loader(stream=12, vocab_size=257).set_state(lo.get_state())


@pytest.mark.parametrize("kwargs, message", [
    (dict(process_count=3), "cannot be split into 3 per-process slices"),
    (dict(process_index=2, process_count=2), "for process 2"),
    (dict(workers=-1), "data.workers -1"),
])
def test_bad_loader_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _loader(**kwargs)


def test_packing_loses_and_duplicates_no_token():
    """Over one epoch every stream offset but the first is a label exactly once, only the final partial
    window is left out, and each label is masked exactly where it starts a document."""
    seq_len, windows = 8, num_windows(len(STREAM), 8)
    lo = _loader(batch=2, seq_len=seq_len)
    batches = [_natural(next(lo)) for _ in range(windows // 2)]
    labels = np.concatenate([b["labels"].ravel() for b in batches])
    tail = len(STREAM) - 1 - windows * seq_len
    assert sorted(labels) == list(range(1, len(STREAM) - tail))
    masked = np.concatenate([(b["labels"] * (1 - b["loss_mask"])).ravel() for b in batches])
    assert set(masked[masked > 0]) == set(STARTS[1:]) & set(labels)
    assert f"leaves {tail} tokens" in loader.epoch_summary(len(STREAM), seq_len)
