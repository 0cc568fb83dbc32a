"""TFDS datasets in ``array_record`` format, built and read without TensorFlow.

- :func:`prepare` (``lcjax data prepare``) tokenizes local text files into a TFDS dataset
  ``<out>/<name>/1.0.0/``: one example per document, features ``tokens`` (int32 [n], the document's ids
  without EOS) and ``name`` (its path relative to the corpus root), split ``train``, in corpus order; the
  tokenizer (``tokenizer.json``) and a summary (``lcjax.json``) are stored beside TFDS's own files.
- :class:`TfdsDocuments` reads a prepared dataset (``data.source: tfds:NAME[/CONFIG]`` under
  ``data.data_dir``) through ``tfds.builder_from_directory(...).as_data_source("train")`` (random access to
  the array_record files, no dataset code or TensorFlow needed), either as token ids (a ``tokens`` feature,
  ours) or as text to tokenize (a ``text`` feature, or the only text feature: catalogue datasets such as
  lm1b or wikipedia prepared on a host with internet).

``tensorflow_datasets`` is imported inside the functions that use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator

import numpy as np

from lcjax.data.corpus import TFDS_PREFIX, describe_skipped, first_texts
from lcjax.data.documents import encode_items, open_documents
from lcjax.data.tokenizer import Tokenizer, load_or_train_tokenizer

VERSION = "1.0.0"
SPLIT = "train"
READ_BATCH = 256  # records per data-source read
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def default_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
    """``data_dir`` if given, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (TFDS's default)."""
    return pathlib.Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def parse_source(source: str) -> tuple[str, str | None]:
    """``"tfds:NAME[/CONFIG]"`` → (NAME, CONFIG or None). Raises ValueError for a malformed name."""
    parts = source[len(TFDS_PREFIX):].strip().split("/")
    if len(parts) > 2 or not all(_NAME.fullmatch(p) or (i == 1 and p) for i, p in enumerate(parts)):
        raise ValueError(f"data.source {source!r} must be 'tfds:NAME[/CONFIG]' with NAME in lower case "
                         f"letters, digits and '_'")
    return parts[0], parts[1] if len(parts) == 2 else None


def dataset_dir(source: str, data_dir: str | os.PathLike | None) -> pathlib.Path:
    """The folder of the newest prepared version of ``source`` under the data dir.

    Raises ValueError (one line naming data.source / data.data_dir) when the data dir or dataset is missing;
    the message lists the datasets that are there.
    """
    name, config = parse_source(source)
    root = default_data_dir(data_dir)
    if not root.is_dir():
        raise ValueError(f"data.data_dir {root} does not exist (needed by data.source {source})")
    folder = root / name / config if config else root / name
    versions = sorted((p for p in folder.glob("*") if (p / "dataset_info.json").is_file()),
                      key=lambda p: _version_key(p.name)) if folder.is_dir() else []
    if not versions:
        found = sorted({p.parent.parent.relative_to(root).as_posix() for p in root.glob("**/dataset_info.json")})
        raise ValueError(f"data.source {source}: no prepared TFDS dataset {name}{'/' + config if config else ''} "
                         f"under data.data_dir {root} (found: {', '.join(found) or 'none'})")
    return versions[-1]


def _version_key(name: str) -> tuple:
    return tuple(int(x) if x.isdigit() else -1 for x in name.split("."))


class TfdsDocuments:
    """The ``train`` split of a prepared TFDS dataset as documents.

    Attributes:
      directory: the dataset version folder.
      feature: ``"tokens"`` (token ids) or the name of the text feature read.
      fingerprint: a 16-hex-digit hash of ``dataset_info.json`` and the names and sizes of the data files
        (a cache key; a re-prepared dataset gets a new one).
    """

    def __init__(self, source: str, data_dir: str | os.PathLike | None = None):
        import tensorflow_datasets as tfds

        self.source = source
        self.directory = dataset_dir(source, data_dir)
        try:
            with _quiet():
                builder = tfds.builder_from_directory(self.directory)
                self._data = builder.as_data_source(split=SPLIT)
        except Exception as e:  # TFDS raises many types for a broken or foreign dataset
            raise ValueError(f"data.source {source}: cannot read {self.directory} as an array_record TFDS "
                             f"dataset with a '{SPLIT}' split ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                             ) from None
        self.feature = _pick_feature(source, builder.info.features)
        self.fingerprint = _fingerprint(self.directory)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def has_tokens(self) -> bool:
        return self.feature == "tokens"

    @property
    def stream_tag(self) -> str:
        """What names this dataset's token stream (with the tokenizer's fingerprint)."""
        return f"tfds:{self.fingerprint}:{self.feature}"

    @property
    def skipped(self) -> dict:
        return {}  # every record is a document

    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer stored with the dataset by :func:`prepare` (None if there is none)."""
        if not (self.directory / "tokenizer.json").is_file():
            return None
        return Tokenizer.load(self.directory, field=f"data.source {self.source}: tokenizer")

    def _records(self) -> Iterator[dict]:
        for lo in range(0, len(self._data), READ_BATCH):
            yield from self._data.__getitems__(list(range(lo, min(lo + READ_BATCH, len(self._data)))))

    def texts(self) -> Iterator[str]:
        """Each document's text, in record order (invalid UTF-8 replaced by U+FFFD)."""
        for record in self._records():
            value = record[self.feature]
            yield value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    def sample_texts(self, max_bytes: int) -> Iterator[str]:
        """The first documents, up to about ``max_bytes`` of text (at least one): the BPE training sample."""
        return first_texts(self.texts(), max_bytes)

    def token_ids(self, tokenizer: Tokenizer | None = None) -> Iterator[np.ndarray]:
        """Each document's token ids (no EOS): stored ids, or the text encoded by ``tokenizer``."""
        if self.has_tokens:
            for record in self._records():
                yield np.asarray(record["tokens"], np.int64)
            return
        batch = []
        for text in self.texts():
            batch.append(text)
            if len(batch) == READ_BATCH:
                yield from (np.asarray(ids, np.int64) for ids in tokenizer.encode_batch(batch))
                batch = []
        yield from (np.asarray(ids, np.int64) for ids in tokenizer.encode_batch(batch))


def _pick_feature(source: str, features) -> str:
    import tensorflow_datasets as tfds

    items = dict(features.items()) if hasattr(features, "items") else {}
    if "tokens" in items and np.issubdtype(np.dtype(items["tokens"].np_dtype), np.integer):
        return "tokens"
    texts = [k for k, f in items.items() if isinstance(f, tfds.features.Text)]
    if "text" in texts:
        return "text"
    if len(texts) == 1:
        return texts[0]
    raise ValueError(f"data.source {source}: needs an integer 'tokens' feature, a 'text' feature or exactly one "
                     f"text feature; it has {', '.join(items) or 'none'}")


def _fingerprint(directory: pathlib.Path) -> str:
    digest = hashlib.blake2b(digest_size=8)
    digest.update((directory / "dataset_info.json").read_bytes())
    for path in sorted(directory.glob(f"*-{SPLIT}.*")):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet():
    """Silence TFDS's progress bars, prints and absl INFO logs."""
    import absl.logging
    import tensorflow_datasets as tfds

    level = absl.logging.get_verbosity()
    absl.logging.set_verbosity(absl.logging.ERROR)
    tfds.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        absl.logging.set_verbosity(level)


# --- prepare ------------------------------------------------------------------------------------------------


def prepare(source: str, out: str | os.PathLike, *, name: str = "lcjax_text", tokenizer: str = "bpe",
            vocab_size: int = 4096, cache_dir: str | os.PathLike | None = None, text_field: str = "text",
            log: Callable[[str], None] = lambda line: None) -> dict:
    """Tokenize the documents of ``source`` (``files:PATH[,PATH...]``, ``stdlib``, ``jsonl:PATH[,PATH...]`` or
    ``parquet:PATH[,PATH...]`` with the text in ``text_field``) into a TFDS dataset.

    Writes ``<out>/<name>/1.0.0/``: array_record shards of split ``train`` (one example per document, in
    corpus order: ``tokens`` int32 [n] without EOS, ``name`` the file's relative path, with ``:LINE`` or
    ``:ROW`` for records), TFDS's
    ``dataset_info.json`` and ``features.json``, the tokenizer's ``tokenizer.json`` and ``lcjax.json`` (counts).
    ``tokenizer``: ``bpe`` (trained on the files with at most ``vocab_size`` ids), ``bytes`` or a path to a
    Hugging Face tokenizer.json. Returns the summary dict (also in ``lcjax.json``) with ``overrides``, the
    ``--set`` arguments that point ``lcjax train`` at the dataset.

    Raises ValueError (one line) before writing anything for a bad source, name, tokenizer or an existing
    dataset of that name in ``out``.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"--name {name!r} must be lower case letters, digits and '_', starting with a letter")
    if source.startswith(TFDS_PREFIX):
        raise ValueError(f"--source {source}: prepare reads text ('files:', 'jsonl:', 'parquet:' or 'stdlib')")
    docs = open_documents(source, text_field=text_field)
    out = pathlib.Path(out).expanduser().absolute()
    target = out / name / VERSION
    if target.exists():
        raise ValueError(f"--out {out}: dataset {name}/{VERSION} already exists there; remove it or pass "
                         f"another --name")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is not a directory")
    log(f"{len(docs.files):,} files{describe_skipped(docs.skipped, ' (skipped: ', ')')}")
    tok = load_or_train_tokenizer(docs, kind=tokenizer, vocab_size=vocab_size, cache_dir=cache_dir)
    log(f"tokenizer {tokenizer}: {tok.vocab_size:,} ids")
    counts = {"documents": 0, "tokens": 0}
    builder_class = _builder_class(name, docs, tok, counts)
    created = [p for p in (out, out / name) if not p.exists()]
    try:
        with tempfile.TemporaryDirectory(prefix="lcjax-tfds-") as downloads, _quiet():
            builder = builder_class(data_dir=str(out), file_format="array_record")
            builder.download_and_prepare(download_dir=downloads)
    except BaseException:  # a bad record found while writing: leave nothing behind
        for path in reversed(created):
            shutil.rmtree(path, ignore_errors=True)
        raise
    tok.save(target)
    summary = {"source": source, "name": name, "dir": str(target), "documents": counts["documents"],
               "tokens": counts["tokens"], "skipped": docs.skipped, "tokenizer": str(target / "tokenizer.json"),
               "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    summary["overrides"] = [f"data.source=tfds:{name}", f"data.data_dir={out}",
                            f"data.tokenizer={target / 'tokenizer.json'}", f"model.vocab_size={tok.vocab_size}"]
    (target / "lcjax.json").write_text(json.dumps(summary, indent=1))
    return summary


def _builder_class(name: str, docs, tok: Tokenizer, counts: dict):
    """A GeneratorBasedBuilder subclass named ``name`` whose ``train`` split is the tokenized ``docs``
    (lcjax.data.documents: files or records)."""
    import tensorflow_datasets as tfds

    class TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(VERSION)

        def _info(self):
            features = tfds.features.FeaturesDict({
                "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "name": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True,
                                         description=f"Text files tokenized by lcjax data prepare "
                                                     f"({tok.vocab_size} ids, EOS {tok.eos_id} not stored).")

        def _split_generators(self, dl_manager):
            return {SPLIT: self._generate_examples()}

        def _generate_examples(self):
            for index, (doc, ids) in enumerate(encode_items(docs.items(), tok)):
                counts["documents"] += 1
                counts["tokens"] += len(ids) + 1
                yield index, {"tokens": ids.astype(np.int32), "name": doc}

    return type(f"TextBuilder_{name}", (TextBuilder,), {"name": name}, skip_registration=True)
