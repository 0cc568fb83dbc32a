"""Weighted mixtures of sources (``data.mixture``) and length-based upsampling of long documents
(``data.upsample_long``), as one token stream the loader cuts into windows like any other.

Each source is tokenized and cached on its own (with the one tokenizer of the mixture). The mixed stream is
a seeded choice of whole documents of the sources, in a shuffled order, written once to the token cache:

1. upsampling: a document of at least ``min_tokens`` tokens (EOS not counted) counts ``factor`` times;
2. weights: with weights wᵢ (normalised) and the sources' upsampled sizes Nᵢ tokens, the mix holds
   M = ΣNᵢ tokens of which about wᵢ·M come from source i: each document's expected number of copies is
   its upsampling factor × wᵢ·M / Nᵢ, rounded up or down by systematic sampling (every document gets the
   floor or the ceiling; the total is exact to one document);
3. the copies of all documents are shuffled together (seed ``data.seed``).

Since the result is one stream, exact resume (the loader's position), per-process slices and curricula work
unchanged. The held-out split is taken from each source before mixing (:meth:`MixedDataset.split`): the
last whole documents of every source, never trained on, concatenated as they are (no weights, no
upsampling).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence

import numpy as np

from lcjax.data import Dataset, cache, choose_tokenizer, dataset_of
from lcjax.data.documents import open_documents
from lcjax.data.loader import epoch_summary
from lcjax.data.tokens import load_or_build

_FORMAT = 1  # bump when the mixing changes


def normalized(weights: Sequence[float]) -> list[float]:
    """``weights`` divided by their sum. Raises ValueError unless every weight is a finite number > 0."""
    w = np.asarray(weights, np.float64)
    if not len(w) or not np.all(np.isfinite(w) & (w > 0)):
        raise ValueError(f"data.mixture weights {list(weights)} must be finite numbers > 0")
    return list(w / w.sum())


def doc_lengths(doc_starts: np.ndarray, num_tokens: int) -> np.ndarray:
    """int64 [num_docs]: each document's length in the stream, its EOS included."""
    return np.diff(np.append(np.asarray(doc_starts, np.int64), num_tokens))


def long_factor(lengths: np.ndarray, min_tokens: int, factor: float) -> np.ndarray:
    """float64 [num_docs]: ``factor`` for documents of at least ``min_tokens`` tokens besides EOS
    (``lengths`` include it), 1 for the others; all 1 when ``min_tokens`` is 0."""
    if min_tokens <= 0:
        return np.ones(len(lengths))
    return np.where(np.asarray(lengths) - 1 >= min_tokens, float(factor), 1.0)


def systematic_copies(expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int64 copies of each item: floor or ceil of ``expected`` (>= 0), summing to floor or ceil of its
    total, by systematic sampling over a random order of the items (unbiased: E[copies] = expected)."""
    expected = np.asarray(expected, np.float64)
    order = rng.permutation(len(expected))
    edges = np.floor(np.concatenate([[0.0], np.cumsum(expected[order])]) + rng.random())
    copies = np.empty(len(expected), np.int64)
    copies[order] = np.diff(edges).astype(np.int64)
    return copies


def mixture_copies(lengths: Sequence[np.ndarray], weights: Sequence[float], *, min_tokens: int = 0,
                   factor: float = 1.0, seed: int = 0) -> list[np.ndarray]:
    """How many times each document of each source goes into the mixed stream (module docstring, 1–2).

    ``lengths``: per source, int [num_docs] document lengths (EOS included); ``weights``: per source, > 0
    (normalised here). Returns per source int64 [num_docs]. Deterministic in ``seed``.
    """
    w = normalized(weights)
    boosts = [long_factor(lens, min_tokens, factor) for lens in lengths]
    sizes = [float(np.sum(np.asarray(lens) * b)) for lens, b in zip(lengths, boosts)]
    total = sum(sizes)
    out = []
    for i, (boost, size) in enumerate(zip(boosts, sizes)):
        rng = np.random.default_rng([seed, i, _FORMAT])
        out.append(systematic_copies(boost * (w[i] * total / size), rng))
    return out


def mixed_order(copies: Sequence[np.ndarray], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(source index, document index) int64 [n] of every copy, shuffled with ``seed`` (module docstring, 3)."""
    sources = np.concatenate([np.full(int(c.sum()), i, np.int64) for i, c in enumerate(copies)])
    docs = np.concatenate([np.repeat(np.arange(len(c), dtype=np.int64), c) for c in copies])
    order = np.random.default_rng([seed, len(copies), _FORMAT]).permutation(len(sources))
    return sources[order], docs[order]


def _documents(parts: Sequence[Dataset], sources: np.ndarray, docs: np.ndarray) -> Iterator[np.ndarray]:
    """Token ids (without EOS) of document ``docs[k]`` of ``parts[sources[k]]``, for every k."""
    bounds = [(p.doc_starts, doc_lengths(p.doc_starts, len(p.tokens))) for p in parts]
    for s, d in zip(sources.tolist(), docs.tolist()):
        starts, lengths = bounds[s]
        yield parts[s].tokens[starts[d]:starts[d] + lengths[d] - 1]


class MixedDataset:
    """Several sources (or one, upsampled) as one :class:`lcjax.data.Dataset`-like stream.

    Has the attributes and methods the trainer uses — ``source``, ``tokenizer``, ``skipped``, ``key``,
    ``tokens``, ``doc_starts``, ``summary``, ``split``, ``loader`` — and writes the mixed stream to the cache
    only when ``tokens``, ``doc_starts`` or ``loader`` are first used.
    """

    def __init__(self, parts: Sequence[Dataset], weights: Sequence[float], *, min_tokens: int = 0,
                 factor: float = 1.0, seed: int = 0, cache_dir: str | os.PathLike | None = None):
        self.parts, self.weights = list(parts), normalized(weights)
        self.min_tokens, self.factor, self.seed, self.cache_dir = min_tokens, factor, seed, cache_dir
        self.tokenizer = self.parts[0].tokenizer
        self.lengths = [doc_lengths(p.doc_starts, len(p.tokens)) for p in self.parts]
        self.copies = mixture_copies(self.lengths, self.weights, min_tokens=min_tokens, factor=factor, seed=seed)
        self.key = cache.short_hash("mixture", [p.key for p in self.parts], self.weights, min_tokens, factor, seed,
                                    _FORMAT)
        self.source = " + ".join(f"{p.source} ({w:.3g})" for p, w in zip(self.parts, self.weights))
        self.skipped = {}
        for p in self.parts:
            for reason, n in p.skipped.items():
                self.skipped[reason] = self.skipped.get(reason, 0) + n

    @property
    def num_tokens(self) -> int:
        """Tokens of the mixed stream (EOS included)."""
        return int(sum(np.sum(c * lens) for c, lens in zip(self.copies, self.lengths)))

    @functools.cached_property
    def _stream(self) -> Dataset:
        def documents():
            return _documents(self.parts, *mixed_order(self.copies, self.seed))
        tokens, starts = load_or_build(self.key, documents, self.tokenizer, cache_dir=self.cache_dir)
        return Dataset(self.source, self.tokenizer, tokens, starts, self.key, self.skipped)

    @property
    def tokens(self) -> np.ndarray:
        return self._stream.tokens

    @property
    def doc_starts(self) -> np.ndarray:
        return self._stream.doc_starts

    def summary(self, seq_len: int) -> list[str]:
        """Log lines: each source's documents, tokens, weight and share of the mix, then the epoch."""
        lines = []
        for p, w, c, lens in zip(self.parts, self.weights, self.copies, self.lengths):
            lines.append(f"data {p.source}: {len(lens):,} documents, {int(lens.sum()):,} tokens; weight {w:.3g}: "
                         f"{int(c.sum()):,} documents ({int(np.sum(c * lens)):,} tokens) in the mix")
        upsample = (f"; documents of >= {self.min_tokens:,} tokens x{self.factor:g}" if self.min_tokens else "")
        lines.append(f"data mixture: {self.num_tokens:,} tokens, tokenizer with {self.tokenizer.vocab_size:,} ids"
                     f"{upsample}")
        lines.append(f"data: {epoch_summary(self.num_tokens, seq_len, int(sum(c.sum() for c in self.copies)))}")
        return lines

    def split(self, holdout: float) -> tuple["MixedDataset", Dataset]:
        """(train mixture, held-out stream): each source's last whole documents holding ``holdout`` of its
        tokens are held out (:meth:`lcjax.data.Dataset.split`); the train parts are mixed as this mixture is,
        the held-out parts concatenated in order. Raises ValueError when a source has fewer than two
        documents."""
        pairs = [p.split(holdout) for p in self.parts]
        train = MixedDataset([t for t, _ in pairs], self.weights, min_tokens=self.min_tokens, factor=self.factor,
                             seed=self.seed, cache_dir=self.cache_dir)
        held = [h for _, h in pairs]
        key = cache.short_hash("heldout", [h.key for h in held], _FORMAT)
        sources = np.concatenate([np.full(len(h.doc_starts), i, np.int64) for i, h in enumerate(held)])
        docs = np.concatenate([np.arange(len(h.doc_starts), dtype=np.int64) for h in held])
        tokens, starts = load_or_build(key, lambda: _documents(held, sources, docs), self.tokenizer,
                                       cache_dir=self.cache_dir)
        return train, Dataset(f"held-out {self.source}", self.tokenizer, tokens, starts, key, {})

    def loader(self, spec):
        """:func:`lcjax.data.make_loader` on the mixed stream as ``spec`` (:class:`lcjax.data.LoaderSpec`)
        asks (the stream is written to the cache on first use)."""
        return self._stream.loader(spec)


def build_data(data, *, vocab_size: int, tokenizer_kind: str | None = None):
    """The training data of a ``data`` config section (lcjax.config.DataConfig): ``data.source`` alone as a
    :class:`lcjax.data.Dataset`, or a :class:`MixedDataset` when ``data.mixture`` lists sources or
    ``data.upsample_long.min_tokens`` > 0. ``tokenizer_kind`` overrides ``data.tokenizer`` (``--init-from``'s
    tokenizer). Raises ValueError (one line naming the field) for bad sources, records or tokenizers."""
    from lcjax.data import build_dataset

    kind = tokenizer_kind or data.tokenizer
    entries = [(m.source, m.weight) for m in data.mixture] or [(data.source, 1.0)]
    up = data.upsample_long
    if len(entries) == 1 and up.min_tokens == 0:
        return build_dataset(entries[0][0], tokenizer_kind=kind, vocab_size=vocab_size, cache_dir=data.cache_dir,
                             data_dir=data.data_dir, text_field=data.text_field)
    weights = normalized([w for _, w in entries])
    docs = [open_documents(source, text_field=data.text_field, data_dir=data.data_dir) for source, _ in entries]
    tokenizer = choose_tokenizer(docs, weights, kind, vocab_size, data.cache_dir)
    parts = [dataset_of(d, tokenizer, data.cache_dir) for d in docs]
    return MixedDataset(parts, weights, min_tokens=up.min_tokens, factor=up.factor, seed=data.seed,
                        cache_dir=data.cache_dir)
