"""Data pipeline: corpus → tokenizer → token stream → packed windows → layout → Grain loader.

Sources (``data.source``): ``stdlib`` (the Python standard library's source, the built-in default corpus),
``files:PATH[,PATH...]`` (local text files and folders), ``jsonl:PATH[,PATH...]`` and ``parquet:PATH[,PATH...]``
(one document per line / row, :mod:`lcjax.data.records`) and ``tfds:NAME[/CONFIG]`` (a prepared TFDS dataset
in array_record format under ``data.data_dir``; see :mod:`lcjax.data.tfds_dataset`); ``data.mixture``
weights several of them and ``data.upsample_long`` repeats long documents (:mod:`lcjax.data.mixture`).
Numpy, ``tokenizers``, pyarrow, Grain and TFDS only; nothing here imports JAX directly (Grain does, lazily).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from lcjax.data.corpus import corpus_files, corpus_fingerprint, describe_skipped
from lcjax.data.documents import MixtureSample, encode, open_documents
from lcjax.data.loader import FIELDS, Loader, LoaderSpec, epoch_summary, make_loader, stream_id
from lcjax.data.tokenizer import Tokenizer, load_or_train_tokenizer
from lcjax.data.tokens import load_or_build, load_or_tokenize, stream_key

__all__ = ["FIELDS", "Dataset", "Loader", "Tokenizer", "build_dataset", "corpus_files", "corpus_fingerprint",
           "load_or_tokenize", "load_or_train_tokenizer", "LoaderSpec", "make_loader"]


@dataclasses.dataclass
class Dataset:
    """A source's tokenizer and token stream.

    Attributes:
      tokenizer: the :class:`Tokenizer` (saved into the run directory by the trainer).
      tokens: read-only memmap [num_tokens] (uint16 or uint32), each document followed by EOS.
      doc_starts: int64 [num_docs], each document's first offset.
      key: 16 hex digits naming the stream (corpus and tokenizer); ``stream_id(key)`` goes into the loader
        state so a checkpoint of other data is refused.
      skipped: files of folders left out, by reason (``{"binary": 2, "empty": 1}``).
    """

    source: str
    tokenizer: Tokenizer
    tokens: np.ndarray
    doc_starts: np.ndarray
    key: str
    skipped: dict

    def summary(self, seq_len: int) -> list[str]:
        """Log lines: documents, tokens, tokenizer, skipped files, and what packing costs per epoch."""
        return [f"data {self.source}: {len(self.doc_starts):,} documents, {len(self.tokens):,} tokens, "
                f"tokenizer with {self.tokenizer.vocab_size:,} ids"
                f"{describe_skipped(self.skipped, '; skipped files: ', '')}",
                f"data: {epoch_summary(len(self.tokens), seq_len, len(self.doc_starts))}"]

    def split(self, holdout: float) -> tuple["Dataset", "Dataset"]:
        """(train, held-out) datasets: the last whole documents holding at least ``holdout`` (a fraction in
        (0, 1)) of the tokens are held out for validation and never trained on. Both streams get their own
        key, so a checkpoint of the unsplit stream is refused by the loader. Raises ValueError when the
        stream has fewer than two documents."""
        if len(self.doc_starts) < 2:
            raise ValueError(f"eval.holdout: data.source {self.source} has {len(self.doc_starts)} document(s); "
                             f"a held-out split needs at least two")
        target = len(self.tokens) * (1 - holdout)
        k = int(np.clip(np.searchsorted(self.doc_starts, target, side="right") - 1, 1, len(self.doc_starts) - 1))
        cut = int(self.doc_starts[k])
        part = lambda tokens, starts, tag: dataclasses.replace(
            self, tokens=tokens, doc_starts=starts, key=f"{self.key}:{tag}:{holdout!r}")
        return (part(self.tokens[:cut], self.doc_starts[:k], "train"),
                part(self.tokens[cut:], self.doc_starts[k:] - cut, "heldout"))

    def loader(self, spec: LoaderSpec) -> Loader:
        """:func:`make_loader` on this stream as ``spec`` asks (documents, stream id, vocabulary and tokenizer
        filled in)."""
        return make_loader(self.tokens, spec, doc_starts=self.doc_starts, stream=stream_id(self.key),
                           vocab_size=self.tokenizer.vocab_size, tokenizer=self.tokenizer)


def build_dataset(source: str, *, tokenizer_kind: str, vocab_size: int,
                  cache_dir: str | os.PathLike | None = None,
                  data_dir: str | os.PathLike | None = None, text_field: str = "text") -> Dataset:
    """The :class:`Dataset` of ``source`` (``data.source``), tokenized once and cached on disk.

    ``tokenizer_kind`` is ``data.tokenizer`` (bpe, bytes or a tokenizer.json path), ``vocab_size`` the BPE
    size (``model.vocab_size``), ``cache_dir`` defaults to ``$LCJAX_CACHE`` or ``~/.cache/lcjax``, ``data_dir``
    (``data.data_dir``) is where ``tfds:`` datasets live, ``text_field`` (``data.text_field``) the JSONL
    field / Parquet column of ``jsonl:`` and ``parquet:`` sources. Raises ValueError (one line) for a bad
    source, record, tokenizer kind or vocab size, or a tokenizer other than the one a token dataset was
    prepared with.
    """
    docs = open_documents(source, text_field=text_field, data_dir=data_dir)
    return dataset_of(docs, choose_tokenizer([docs], [1.0], tokenizer_kind, vocab_size, cache_dir), cache_dir)


def choose_tokenizer(parts: list, weights: list[float], kind: str, vocab_size: int,
                     cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The one tokenizer of the documents ``parts`` (sources of a mixture, with ``weights`` summing to 1):
    ``data.tokenizer`` ``kind`` — a BPE trained on a weighted sample of all of them, bytes or a file. Token
    datasets (TFDS, prepared) need the tokenizer stored with them; raises ValueError (one line) otherwise."""
    stored = [docs for docs in parts if getattr(docs, "has_tokens", False)]
    if not stored:
        sample = parts[0] if len(parts) == 1 else MixtureSample(parts, weights)
        return load_or_train_tokenizer(sample, kind=kind, vocab_size=vocab_size, cache_dir=cache_dir)
    configured = None
    for docs in stored:
        configured = _dataset_tokenizer(docs, kind, vocab_size)
    return configured


def dataset_of(docs, tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None) -> Dataset:
    """The :class:`Dataset` of a documents object (lcjax.data.documents) under ``tokenizer``, tokenized on
    first use and cached under ``<cache>/tokens/<key>/``."""
    key = stream_key(docs.stream_tag, tokenizer)
    tokens, doc_starts = load_or_build(key, lambda: encode(docs, tokenizer), tokenizer, cache_dir=cache_dir)
    return Dataset(docs.source, tokenizer, tokens, doc_starts, key, dict(docs.skipped))


def _dataset_tokenizer(docs, kind: str, vocab_size: int) -> Tokenizer:
    """The configured tokenizer, which must be the one the token dataset was prepared with."""
    stored = docs.tokenizer()
    hint = f"set data.tokenizer={docs.directory / 'tokenizer.json'}" if stored else "it stores no tokenizer.json"
    if kind == "bpe":
        raise ValueError(f"data.tokenizer bpe: data.source {docs.source} holds token ids, not text, so no BPE "
                         f"can be trained on it; {hint}")
    configured = load_or_train_tokenizer([], kind=kind, vocab_size=max(vocab_size, 257))
    if stored is None or stored.fingerprint != configured.fingerprint:
        raise ValueError(f"data.tokenizer {kind}: data.source {docs.source} was tokenized with another tokenizer; "
                         f"{hint}")
    return configured
