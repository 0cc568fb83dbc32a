"""Data pipeline: corpus → tokenizer → token stream → packed windows → layout → Grain loader.

Numpy, ``tokenizers`` and Grain only; nothing here imports JAX.
"""

from __future__ import annotations

import os

import numpy as np

from lcjax.data.corpus import corpus_files, corpus_fingerprint
from lcjax.data.loader import FIELDS, Loader, make_loader
from lcjax.data.tokenizer import Tokenizer, load_or_train_tokenizer
from lcjax.data.tokens import load_or_tokenize

__all__ = ["FIELDS", "Loader", "Tokenizer", "build_dataset", "corpus_files", "corpus_fingerprint",
           "load_or_tokenize", "load_or_train_tokenizer", "make_loader"]


def build_dataset(source: str, *, tokenizer_kind: str, vocab_size: int,
                  cache_dir: str | os.PathLike | None = None) -> tuple[Tokenizer, np.memmap, np.ndarray]:
    """The tokenizer, token stream and document starts of ``source`` (``data.source``), cached on disk.

    Returns ``(tokenizer, tokens, doc_starts)``: see :func:`load_or_train_tokenizer` and
    :func:`load_or_tokenize`; pass ``tokens`` and ``doc_starts`` to :func:`make_loader`. ``cache_dir``
    defaults to ``$LCJAX_CACHE`` or ``~/.cache/lcjax``. Raises ValueError for a bad source, tokenizer kind
    or vocab size.
    """
    files = corpus_files(source)
    tokenizer = load_or_train_tokenizer(files, kind=tokenizer_kind, vocab_size=vocab_size, cache_dir=cache_dir)
    tokens, doc_starts = load_or_tokenize(files, tokenizer, cache_dir=cache_dir)
    return tokenizer, tokens, doc_starts
