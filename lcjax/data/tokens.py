"""The tokenized corpus: one flat token stream on disk, read back as a memmap, plus document start offsets.

Document d (file d of the corpus) is its tokens followed by EOS; documents follow each other without gaps.
The stream and offsets are cached under ``<cache>/tokens/<key>/`` keyed by the corpus fingerprint and the
tokenizer's fingerprint, and written atomically (a temporary folder renamed into place).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from lcjax.data import cache
from lcjax.data.corpus import corpus_fingerprint, read_text
from lcjax.data.tokenizer import Tokenizer

CHUNK_BYTES = 4_000_000  # text handed to one encode_batch call
_FORMAT = 1  # bump when the on-disk layout changes


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def load_or_tokenize(files: list[pathlib.Path], tokenizer: Tokenizer, *,
                     cache_dir: str | os.PathLike | None = None) -> tuple[np.memmap, np.ndarray]:
    """The token stream of the corpus and where each document starts, tokenizing on the first call only.

    Returns ``(tokens, doc_starts)``: ``tokens`` a read-only memmap [num_tokens] of uint16 (uint32 when the
    vocabulary exceeds 65536), each document followed by ``tokenizer.eos_id``; ``doc_starts`` int64
    [num_docs], the offset of each document's first token (``doc_starts[0] == 0``, increasing). Prints
    nothing. ``cache_dir`` defaults to ``$LCJAX_CACHE`` or ``~/.cache/lcjax``.
    """
    key = stream_key(corpus_fingerprint(files), tokenizer)
    folder = cache.cache_root(cache_dir) / "tokens" / key
    if not (folder / "meta.json").is_file():
        with cache.atomic_dir(folder) as tmp:
            _write_stream(files, tokenizer, tmp)
    return open_stream(folder)


def stream_key(corpus: str, tokenizer: Tokenizer) -> str:
    """The cache key (16 hex digits) of the token stream of corpus fingerprint ``corpus`` under ``tokenizer``."""
    return cache.short_hash(corpus, tokenizer.fingerprint, _FORMAT)


def load_or_build(key: str, documents: Callable[[], Iterable[np.ndarray]], tokenizer: Tokenizer, *,
                  cache_dir: str | os.PathLike | None = None) -> tuple[np.memmap, np.ndarray]:
    """Like :func:`load_or_tokenize` for any documents: ``documents()`` yields each one's token ids
    (without EOS); the stream is cached under ``<cache>/tokens/<key>/``."""
    folder = cache.cache_root(cache_dir) / "tokens" / key
    if not (folder / "meta.json").is_file():
        with cache.atomic_dir(folder) as tmp:
            write_stream(tmp, documents(), tokenizer)
    return open_stream(folder)


def encode_files(files: list[pathlib.Path], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """Token ids (int64 [n], no EOS) of each file in order, encoded in groups of about CHUNK_BYTES."""
    for chunk in _chunks(files, CHUNK_BYTES):
        for ids in tokenizer.encode_batch([read_text(p) for p in chunk]):
            yield np.asarray(ids, np.int64)


def _write_stream(files: list[pathlib.Path], tokenizer: Tokenizer, folder: pathlib.Path) -> None:
    write_stream(folder, encode_files(files, tokenizer), tokenizer)


def write_stream(folder: pathlib.Path, documents: Iterable[np.ndarray], tokenizer: Tokenizer) -> None:
    """Write ``tokens.bin``, ``doc_starts.npy`` and ``meta.json`` (last: it marks the folder complete)."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype)
    lengths = []
    with open(folder / "tokens.bin", "wb") as out:
        for doc in documents:
            out.write(np.concatenate([np.asarray(doc).astype(dtype), eos]).tobytes())
            lengths.append(len(doc) + 1)
    if not lengths:
        raise ValueError("data.source: the corpus holds no documents")
    starts = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]).astype(np.int64)
    np.save(folder / "doc_starts.npy", starts)
    meta = {"dtype": dtype.name, "num_tokens": int(sum(lengths)), "num_docs": len(lengths)}
    (folder / "meta.json").write_text(json.dumps(meta))


def open_stream(folder: pathlib.Path) -> tuple[np.memmap, np.ndarray]:
    """The cached stream in ``folder``: (tokens memmap, doc_starts)."""
    meta = json.loads((folder / "meta.json").read_text())
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
    return tokens, np.load(folder / "doc_starts.npy")


def _chunks(files: list[pathlib.Path], max_bytes: int) -> Iterator[list[pathlib.Path]]:
    """Consecutive groups of files of about ``max_bytes`` each (a group holds at least one file)."""
    group, size = [], 0
    for path in files:
        if group and size + path.stat().st_size > max_bytes:
            yield group
            group, size = [], 0
        group.append(path)
        size += path.stat().st_size
    if group:
        yield group
