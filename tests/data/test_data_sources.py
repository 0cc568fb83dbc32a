"""JSONL and Parquet sources, weighted mixtures and long-document upsampling (issue 23): readers, the token
streams they give (bytes tokenizer: exact), the mixing arithmetic, the held-out split and exact resume."""

import gzip
import json

import numpy as np
import pytest

from lcjax import config as config_lib
from lcjax.data import LoaderSpec, build_dataset
from lcjax.data.mixture import (MixedDataset, build_data, long_factor, mixed_order, mixture_copies,
                                systematic_copies)
from lcjax.data.records import jsonl_texts, parquet_texts, record_files

TEXTS = ["first document", "the second one, longer " * 3, "три", "last"]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _parquet(path, column, values):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: values}), path)
    return path


def _bytes_stream(texts):
    return [b for t in texts for b in [*t.encode(), 256]]


def test_jsonl_and_parquet_give_one_document_per_record_in_order(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    _jsonl(folder / "a.jsonl", [{"text": TEXTS[0], "id": 1}, {"text": ""}, {"text": None}])
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": TEXTS[1]}) + "\n\n")
    (folder / "notes.txt").write_text("not a shard")
    import pyarrow as pa

    _parquet(tmp_path / "c.parquet", "body", pa.array([TEXTS[2], None, TEXTS[3]]).dictionary_encode())
    kw = dict(tokenizer_kind="bytes", vocab_size=257, cache_dir=tmp_path / "cache")
    jsonl = build_dataset(f"jsonl:{folder}", **kw)
    assert np.asarray(jsonl.tokens).tolist() == _bytes_stream(TEXTS[:2])
    assert jsonl.skipped == {"empty": 2}
    parquet = build_dataset(f"parquet:{tmp_path / 'c.parquet'}", text_field="body", **kw)
    assert np.asarray(parquet.tokens).tolist() == _bytes_stream(TEXTS[2:])
    assert parquet.doc_starts.tolist() == [0, len(TEXTS[2].encode()) + 1]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ('["text"]', "line 2: must be a JSON object, not list"),
    ('{"body": "x"}', "line 2: has no field 'text' (data.text_field; it has 'body')"),
    ('{"text": 3}', "line 2: field 'text' (data.text_field) must be a string, not int"),
])
def test_bad_jsonl_lines_are_one_line_errors_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match="^data.source") as e:
        list(jsonl_texts(path, "text"))
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_bad_parquet_and_paths_are_one_line_errors(tmp_path):
    _parquet(tmp_path / "n.parquet", "text", [1, 2])
    _parquet(tmp_path / "t.parquet", "text", ["a"])
    (tmp_path / "fake.parquet").write_text("nope")
    for path, field, message in (("n.parquet", "text", "must hold strings, not int64"),
                                 ("t.parquet", "body", "has no column 'body' (data.text_field; columns: text)"),
                                 ("fake.parquet", "text", "is not a readable Parquet file")):
        with pytest.raises(ValueError, match=f"^data.source: .*{path}.*{message.split('(')[0]}"):
            list(parquet_texts(tmp_path / path, field))
    with pytest.raises(ValueError, match="path .*missing does not exist"):
        record_files(f"jsonl:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="holds no .jsonl"):
        record_files(f"jsonl:{tmp_path}")
    assert record_files(f"parquet:{tmp_path}") == sorted(tmp_path.glob("*.parquet"))


def test_systematic_copies_round_each_expectation_and_keep_the_total():
    rng = np.random.default_rng(0)
    expected = rng.uniform(0, 3, 1000)
    copies = systematic_copies(expected, rng)
    assert np.all((copies == np.floor(expected)) | (copies == np.ceil(expected)))
    assert abs(copies.sum() - expected.sum()) < 1
    mean = np.mean([systematic_copies(np.full(4, 0.25), np.random.default_rng(s)) for s in range(4000)], axis=0)
    np.testing.assert_allclose(mean, 0.25, atol=0.03)  # unbiased


def test_mixture_shares_follow_the_weights_and_long_documents_are_upsampled():
    rng = np.random.default_rng(1)
    a, b = rng.integers(50, 150, 400), rng.integers(50, 150, 100)  # a holds ~4x b's tokens
    copies = mixture_copies([a, b], [1, 3], seed=7)
    share = np.sum(copies[1] * b) / (np.sum(copies[0] * a) + np.sum(copies[1] * b))
    assert abs(share - 0.75) < 0.02  # b upsampled about 3x, a subsampled
    assert all(np.array_equal(x, y) for x, y in zip(copies, mixture_copies([a, b], [1, 3], seed=7)))
    lens = np.array([10, 101, 200, 99])
    assert long_factor(lens, 100, 2.5).tolist() == [1, 2.5, 2.5, 1]  # lengths include EOS
    assert long_factor(lens, 0, 2.5).tolist() == [1, 1, 1, 1]
    (up,) = mixture_copies([lens], [1], min_tokens=100, factor=3)
    assert up.tolist() == [1, 3, 3, 1]
    sources, docs = mixed_order([np.array([1, 0, 2]), np.array([1])], seed=0)
    assert sorted(zip(sources.tolist(), docs.tolist())) == [(0, 0), (0, 2), (0, 2), (1, 0)]


def _mixture(tmp_path, **up):
    docs_a = [f"a{i} " + "x" * (5 + i % 7) for i in range(40)]
    docs_b = [f"b{i} " + "y" * (30 + i) for i in range(20)]
    _jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs_a])
    _parquet(tmp_path / "b.parquet", "text", docs_b)
    overrides = [f'data.mixture=[{{source: "jsonl:{tmp_path / "a.jsonl"}", weight: 1}}, '
                 f'{{source: "parquet:{tmp_path / "b.parquet"}", weight: 1}}]',
                 "data.tokenizer=bytes", "model.vocab_size=257", f"data.cache_dir={tmp_path / 'cache'}",
                 *(f"data.upsample_long.{k}={v}" for k, v in up.items())]
    return config_lib.load(None, overrides)


def test_mixed_stream_holds_whole_documents_and_the_held_out_split_never_reaches_training(tmp_path):
    cfg = _mixture(tmp_path, min_tokens=45, factor=2)
    data = build_data(cfg.data, vocab_size=257)
    assert isinstance(data, MixedDataset)
    originals = {f"a{i} " + "x" * (5 + i % 7) for i in range(40)} | {f"b{i} " + "y" * (30 + i) for i in range(20)}
    assert _docs(data) <= originals and len(_docs(data)) > 40
    assert len(data.doc_starts) == int(sum(c.sum() for c in data.copies)) and len(data.tokens) == data.num_tokens
    train, held = data.split(0.1)
    assert _docs(held) and not _docs(held) & _docs(train)
    assert {t[0] for t in _docs(held)} == {"a", "b"}  # both sources are held out from
    again = build_data(cfg.data, vocab_size=257)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(data.tokens))


def _docs(dataset) -> set:
    tokens, starts = np.asarray(dataset.tokens), list(dataset.doc_starts) + [len(dataset.tokens)]
    return {bytes(tokens[s:e - 1].astype(np.uint8)).decode() for s, e in zip(starts, starts[1:])}


def test_a_mixture_loader_resumes_exactly(tmp_path):
    data = build_data(_mixture(tmp_path).data, vocab_size=257)
    kw = LoaderSpec(seq_len=32, global_batch=2, seed=3, layout="zigzag", num_shards=2, prefetch=0)
    loader = data.loader(kw)
    straight = [next(loader)["tokens"] for _ in range(5)]
    loader.close()
    loader = data.loader(kw)
    for _ in range(2):
        next(loader)
    state = loader.get_state()
    loader.close()
    resumed = data.loader(kw)
    resumed.set_state(state)
    for want in straight[2:]:
        np.testing.assert_array_equal(next(resumed)["tokens"], want)
    resumed.close()


@pytest.mark.parametrize("override, message", [
    ('data.mixture=[{source: "csv:a", weight: 1}]', "data.mixture[0].source 'csv:a' must be"),
    ('data.mixture=[{source: "jsonl:a", weight: -1}]', "data.mixture[0].weight -1.0 must be a finite number > 0"),
    ("data.upsample_long.factor=0.5", "data.upsample_long: min_tokens 0 must be >= 0 (0: off) and factor 0.5"),
    ("data.source=csv:x", "data.source 'csv:x' must be"),
])
def test_bad_data_keys_name_the_field(override, message):
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config_lib.load(None, [override])
    with pytest.raises(ValueError, match="exclude each other"):
        config_lib.load(None, ["data.source=files:x", 'data.mixture=[{source: "jsonl:a"}]'])


def test_prepare_reads_jsonl_and_names_each_record(tmp_path):
    from lcjax.data.tfds_dataset import prepare

    _jsonl(tmp_path / "a.jsonl", [{"body": t} for t in TEXTS[:2]] + [{"body": ""}, {"body": TEXTS[2]}])
    summary = prepare(f"jsonl:{tmp_path / 'a.jsonl'}", tmp_path / "tfds", tokenizer="bytes", text_field="body",
                      cache_dir=tmp_path / "cache")
    assert summary["documents"] == 3 and summary["skipped"] == {"empty": 1}
    data = build_dataset("tfds:lcjax_text", tokenizer_kind=summary["tokenizer"], vocab_size=257,
                         data_dir=tmp_path / "tfds", cache_dir=tmp_path / "cache")
    assert np.asarray(data.tokens).tolist() == _bytes_stream(TEXTS[:3])
    import tensorflow_datasets as tfds

    names = [r["name"] for r in tfds.data_source("lcjax_text", data_dir=tmp_path / "tfds", split="train")]
    assert [n.decode() if isinstance(n, bytes) else n for n in names] == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:4"]
