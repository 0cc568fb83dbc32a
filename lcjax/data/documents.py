"""Every ``data.source`` as documents with one interface: text files, JSONL / Parquet records, TFDS datasets.

A documents object has ``source``, ``fingerprint`` (a cache key of the content), ``stream_tag`` (what names
its token stream together with the tokenizer), ``skipped`` (left out, by reason), ``sample_texts(max_bytes)``
(the BPE training sample) and ``texts()`` (each document's text, in order; files and records also have
``items()``, ``(name, text)`` pairs); TFDS token datasets (``has_tokens``) give ``token_ids()`` instead.
:func:`encode` turns any of them into token-id arrays.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from lcjax.data import cache
from lcjax.data.corpus import TFDS_PREFIX, corpus_fingerprint, read_text, relative_names, scan
from lcjax.data.records import RecordDocuments, record_kind
from lcjax.data.tokenizer import Tokenizer, training_sample

ENCODE_BATCH_BYTES = 4_000_000  # text handed to one encode_batch call


class FileDocuments:
    """``stdlib`` or ``files:PATH[,PATH...]``: one document per text file (lcjax.data.corpus.scan)."""

    has_tokens = False

    def __init__(self, source: str):
        self.source = source
        self.files, self.skipped = scan(source)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The corpus fingerprint (relative names and contents of the files)."""
        return corpus_fingerprint(self.files)

    @property
    def stream_tag(self) -> str:
        return self.fingerprint  # as before the other sources existed: cached streams keep their keys

    def items(self) -> Iterator[tuple[str, str]]:
        """``(path relative to the files' common folder, text)`` of each file, in order."""
        return ((name, read_text(path)) for path, name in zip(self.files, relative_names(self.files)))

    def texts(self) -> Iterator[str]:
        """Each file's text, in order."""
        return (read_text(path) for path in self.files)

    def sample_texts(self, max_bytes: int) -> Iterator[str]:
        """A deterministic sample of whole files, about ``max_bytes`` in all (lcjax.data.tokenizer.training_sample)."""
        return (read_text(p) for p in training_sample(self.files, max_bytes))


def open_documents(source: str, *, text_field: str = "text", data_dir: str | os.PathLike | None = None):
    """The documents object of ``source`` (``data.source``): :class:`FileDocuments`,
    :class:`lcjax.data.records.RecordDocuments` or :class:`lcjax.data.tfds_dataset.TfdsDocuments`.

    Raises ValueError (one line naming ``data.source``) for an unknown form or missing paths.
    """
    if source.startswith(TFDS_PREFIX):
        from lcjax.data.tfds_dataset import TfdsDocuments

        return TfdsDocuments(source, data_dir)
    if record_kind(source):
        return RecordDocuments(source, text_field)
    return FileDocuments(source)


def encode(docs, tokenizer: Tokenizer | None) -> Iterator[np.ndarray]:
    """Token ids (int64 [n], no EOS) of each document of ``docs``: its stored ids (TFDS token datasets) or
    its text encoded by ``tokenizer`` in batches of about ENCODE_BATCH_BYTES."""
    if getattr(docs, "has_tokens", False):
        return docs.token_ids()
    return encode_texts(docs.texts(), tokenizer)


def encode_texts(texts: Iterable[str], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """Token ids (int64 [n]) of each text, in order, encoded in batches of about ENCODE_BATCH_BYTES."""
    return (ids for _, ids in encode_items(((None, text) for text in texts), tokenizer))


def encode_items(items: Iterable[tuple[str, str]], tokenizer: Tokenizer) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, token ids int64 [n])`` of each ``(name, text)``, in order, encoded in batches of about
    ENCODE_BATCH_BYTES (one ``encode_batch`` call per batch: parallel over CPU cores)."""
    batch, size = [], 0
    for name, text in items:
        batch.append((name, text))
        size += len(text)
        if size >= ENCODE_BATCH_BYTES:
            yield from _encoded(batch, tokenizer)
            batch, size = [], 0
    yield from _encoded(batch, tokenizer)


def _encoded(batch: list[tuple[str, str]], tokenizer: Tokenizer) -> Iterator[tuple[str, np.ndarray]]:
    if batch:
        ids = tokenizer.encode_batch([text for _, text in batch])
        yield from ((name, np.asarray(i, np.int64)) for (name, _), i in zip(batch, ids))


class MixtureSample:
    """The BPE training input of several sources: a fingerprint of all of them (and their weights) and a
    sample drawn from each in proportion to its weight (``weights`` sum to 1)."""

    def __init__(self, parts: Sequence, weights: Sequence[float]):
        self.parts, self.weights = list(parts), list(weights)
        self.fingerprint = cache.short_hash("mixture", [p.fingerprint for p in parts], self.weights)

    def sample_texts(self, max_bytes: int) -> Iterator[str]:
        for part, weight in zip(self.parts, self.weights):
            yield from part.sample_texts(max(int(max_bytes * weight), 1))

