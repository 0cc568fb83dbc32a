"""Tokenizers: a byte-level BPE trained on the corpus (cached on disk), any Hugging Face ``tokenizer.json``,
and a plain-bytes fallback (``data.tokenizer``: ``bpe``, a path, or ``bytes``).

All are Hugging Face ``tokenizers`` objects saved in the standard ``tokenizer.json`` format. The two built
here use the GPT-2 byte-level pre-tokenizer and decoder, so ``decode(encode(text)) == text`` for any text,
and one special token, ``<|endoftext|>`` (EOS), that ends every document. A loaded tokenizer's EOS is the
``eos_token`` of a ``tokenizer_config.json`` beside it, else the first of :data:`EOS_CANDIDATES` it knows.
Text that happens to contain the literal string of a special token is encoded as ordinary text: EOS ids only
come from the packing code.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lcjax.data import cache
from lcjax.data.corpus import corpus_fingerprint, read_text, relative_names

EOS = "<|endoftext|>"
EOS_CANDIDATES = (EOS, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
KINDS = ("bpe", "bytes")  # data.tokenizer may also be a path to a tokenizer.json (or a folder holding one)
MIN_VOCAB = 257  # 256 bytes + EOS
TRAIN_SAMPLE_BYTES = 20_000_000  # BPE trains on at most about this much text (a deterministic sample)
_FORMAT = 1  # bump when training changes, to invalidate cached tokenizers


class Tokenizer:
    """A thin wrapper of a ``tokenizers.Tokenizer``.

    Attributes:
      vocab_size: number of ids in use (ids are 0 … vocab_size−1); at most the requested size.
      eos_id: the id of ``<|endoftext|>``.
    """

    def __init__(self, hf: tokenizers.Tokenizer, eos: str | None = None, origin: str = "tokenizer"):
        hf.encode_special_tokens = True  # a literal "<|endoftext|>" in text is just text
        self._hf = hf
        names = (eos,) if eos else EOS_CANDIDATES
        found = [hf.token_to_id(name) for name in names if hf.token_to_id(name) is not None]
        if not found:
            raise ValueError(f"{origin} has no end-of-document token (looked for {', '.join(names)})")
        self.eos_id: int = found[0]
        self.vocab_size: int = max(hf.get_vocab(with_added_tokens=True).values()) + 1

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
    def load(cls, path: str | os.PathLike, field: str = "tokenizer") -> "Tokenizer":
        """Read a Hugging Face ``tokenizer.json``: ``path`` is the file or a folder holding it.

        The EOS token is the ``eos_token`` of ``tokenizer_config.json`` beside it when there is one.
        Raises ValueError (one line starting with ``field``) when it is missing, unreadable or has no EOS.
        """
        path = pathlib.Path(path).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"{field} {str(path)!r} must be bpe, bytes or a Hugging Face tokenizer.json "
                             f"(or a folder holding one): {file} does not exist")
        try:
            hf = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises its own exception type
            raise ValueError(f"{field} {file}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") \
                from None
        return cls(hf, _configured_eos(file.parent), origin=f"{field} {file}")


def load_or_train_tokenizer(files: list[pathlib.Path], *, kind: str, vocab_size: int,
                            cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of ``kind`` (``data.tokenizer``) for the corpus ``files``.

    - ``"bpe"``: byte-level BPE with at most ``vocab_size`` ids, trained on the corpus (or a deterministic
      sample of about 20 MB of it) and cached under ``<cache>/tokenizers/``, keyed by the corpus fingerprint,
      ``kind`` and ``vocab_size``; later calls load it. Training is deterministic.
    - ``"bytes"``: ids 0…255 are the byte values, 256 is EOS (257 ids); ``files`` is not read.
    - anything else: a path to a Hugging Face ``tokenizer.json`` or a folder holding one (:meth:`Tokenizer.load`).

    ``files`` may also be an object with a ``fingerprint`` (str) and ``sample_texts(max_bytes)`` (an iterable
    of str), e.g. a TFDS text dataset. ``cache_dir`` defaults to ``$LCJAX_CACHE`` or ``~/.cache/lcjax``.
    Raises ValueError for a missing tokenizer file or ``vocab_size`` < 257.
    """
    if kind not in KINDS:
        return Tokenizer.load(kind, field="data.tokenizer")
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"model.vocab_size {vocab_size} must be >= {MIN_VOCAB} (256 bytes + EOS)")
    if kind == "bytes":
        return Tokenizer(_bytes_tokenizer())
    fingerprint = files.fingerprint if hasattr(files, "fingerprint") else corpus_fingerprint(files)
    key = cache.short_hash(fingerprint, kind, vocab_size, _FORMAT)
    folder = cache.cache_root(cache_dir) / "tokenizers" / f"{kind}-{vocab_size}-{key}"
    if not (folder / "tokenizer.json").is_file():
        if hasattr(files, "sample_texts"):
            texts = files.sample_texts(TRAIN_SAMPLE_BYTES)
        else:
            texts = (read_text(p) for p in training_sample(files))
        trained = train_bpe(texts, vocab_size)
        with cache.atomic_dir(folder) as tmp:
            trained.save(tmp)
    return Tokenizer.load(folder)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with at most ``vocab_size`` ids (EOS included) trained on ``texts`` (deterministic).

    Raises ValueError when ``vocab_size`` < 257.
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"--vocab-size {vocab_size} must be >= {MIN_VOCAB} (256 bytes + EOS)")
    return Tokenizer(_train_bpe(texts, vocab_size))


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


def _train_bpe(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    hf = _byte_level(tokenizers.Tokenizer(models.BPE()), use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return hf


def _configured_eos(folder: pathlib.Path) -> str | None:
    """The ``eos_token`` of ``folder/tokenizer_config.json`` (a string or {"content": ...}), if any."""
    config = folder / "tokenizer_config.json"
    try:
        eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return eos.get("content") if isinstance(eos, dict) else eos if isinstance(eos, str) else None


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
