"""Tokenizers: a byte-level BPE trained on the corpus (cached on disk) and a plain-bytes fallback.

Both kinds are Hugging Face ``tokenizers`` objects saved in the standard ``tokenizer.json`` format, with the
GPT-2 byte-level pre-tokenizer and decoder, so ``decode(encode(text)) == text`` for any text, and one special
token, ``<|endoftext|>`` (EOS), that ends every document. Text that happens to contain the literal string
``<|endoftext|>`` is encoded as ordinary bytes: EOS ids only come from the packing code.
"""

from __future__ import annotations

import os
import pathlib

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lcjax.data import cache
from lcjax.data.corpus import corpus_fingerprint, read_text, relative_names

EOS = "<|endoftext|>"
KINDS = ("bpe", "bytes")
MIN_VOCAB = 257  # 256 bytes + EOS
TRAIN_SAMPLE_BYTES = 20_000_000  # BPE trains on at most about this much text (a deterministic sample)
_FORMAT = 1  # bump when training changes, to invalidate cached tokenizers


class Tokenizer:
    """A thin wrapper of a ``tokenizers.Tokenizer``.

    Attributes:
      vocab_size: number of ids in use (ids are 0 … vocab_size−1); at most the requested size.
      eos_id: the id of ``<|endoftext|>``.
    """

    def __init__(self, hf: tokenizers.Tokenizer):
        hf.encode_special_tokens = True  # a literal "<|endoftext|>" in text is just bytes
        self._hf = hf
        self.eos_id: int = hf.token_to_id(EOS)
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        if self.eos_id is None:
            raise ValueError(f"tokenizer has no {EOS} token")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without EOS or any other special token (parallel over CPU cores)."""
        return [e.ids for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """The text of ``ids`` (EOS decodes to ``<|endoftext|>``)."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def fingerprint(self) -> str:
        """A 16-hex-digit hash of the serialised tokenizer (a cache key for the tokenized corpus)."""
        return cache.short_hash(self._hf.to_str())

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        """Write ``tokenizer.json`` (Hugging Face format) into ``directory`` (created if needed); return its path."""
        path = pathlib.Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(path))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Read ``directory/tokenizer.json``. Raises ValueError when it is missing."""
        path = pathlib.Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"tokenizer: {path} does not exist")
        return cls(tokenizers.Tokenizer.from_file(str(path)))


def load_or_train_tokenizer(files: list[pathlib.Path], *, kind: str, vocab_size: int,
                            cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of ``kind`` for the corpus ``files``.

    - ``"bpe"``: byte-level BPE with at most ``vocab_size`` ids, trained on the corpus (or a deterministic
      sample of about 20 MB of it) and cached under ``<cache>/tokenizers/``, keyed by the corpus fingerprint,
      ``kind`` and ``vocab_size``; later calls load it. Training is deterministic.
    - ``"bytes"``: ids 0…255 are the byte values, 256 is EOS (257 ids); ``files`` is not read.

    ``cache_dir`` defaults to ``$LCJAX_CACHE`` or ``~/.cache/lcjax``. Raises ValueError for an unknown kind or
    ``vocab_size`` < 257.
    """
    if kind not in KINDS:
        raise ValueError(f"data.tokenizer {kind!r} must be one of {', '.join(KINDS)}")
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"model.vocab_size {vocab_size} must be >= {MIN_VOCAB} (256 bytes + EOS)")
    if kind == "bytes":
        return Tokenizer(_bytes_tokenizer())
    key = cache.short_hash(corpus_fingerprint(files), kind, vocab_size, _FORMAT)
    folder = cache.cache_root(cache_dir) / "tokenizers" / f"{kind}-{vocab_size}-{key}"
    if not (folder / "tokenizer.json").is_file():
        trained = Tokenizer(_train_bpe(training_sample(files), vocab_size))
        with cache.atomic_dir(folder) as tmp:
            trained.save(tmp)
    return Tokenizer.load(folder)


def training_sample(files: list[pathlib.Path], max_bytes: int = TRAIN_SAMPLE_BYTES) -> list[pathlib.Path]:
    """A deterministic subset of ``files`` of at most about ``max_bytes`` (all of them if they fit).

    Files are picked in the order of a hash of their relative path, so the sample spreads over the whole
    corpus, then returned in corpus order. At least one file is always picked.
    """
    sizes = [p.stat().st_size for p in files]
    if sum(sizes) <= max_bytes:
        return list(files)
    keys = [cache.short_hash(name) for name in relative_names(files)]
    order = sorted(range(len(files)), key=keys.__getitem__)
    picked, total = [], 0
    for i in order:
        if picked and total + sizes[i] > max_bytes:
            continue
        picked.append(i)
        total += sizes[i]
    return [files[i] for i in sorted(picked)]


def _byte_level(hf: tokenizers.Tokenizer, *, use_regex: bool) -> tokenizers.Tokenizer:
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    hf.decoder = decoders.ByteLevel()
    return hf


def _train_bpe(files: list[pathlib.Path], vocab_size: int) -> tokenizers.Tokenizer:
    hf = _byte_level(tokenizers.Tokenizer(models.BPE()), use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator((read_text(p) for p in files), trainer, length=len(files))
    return hf


def _bytes_tokenizer() -> tokenizers.Tokenizer:
    vocab = {char: byte for byte, char in enumerate(_byte_chars())}
    hf = _byte_level(tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[])), use_regex=False)
    hf.add_special_tokens([EOS])
    return hf


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in character for each byte value 0…255 (what ByteLevel maps bytes to)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]
