"""Documents from JSON Lines and Parquet files (``data.source: jsonl:PATH[,PATH...]`` / ``parquet:PATH[,PATH...]``).

One JSONL line (a JSON object) or one Parquet row is one document; its text is the field / column named by
``data.text_field`` (default ``text``). A PATH is a file (taken as is) or a folder (its ``*.jsonl``,
``*.jsonl.gz`` and ``*.ndjson`` / ``*.parquet`` files, recursively, sorted by path, hidden entries left
out). Records whose text is null or empty are left out (counted in :attr:`RecordDocuments.skipped` while
reading). A malformed line, a missing field, a non-string value or an unreadable file stops with one line
naming the file and the line or row. Parquet is read with pyarrow, imported only for Parquet sources.
"""

from __future__ import annotations

import gzip
import json
import pathlib
from collections.abc import Iterator

from lcjax.data import cache
from lcjax.data.corpus import _walk, corpus_fingerprint, first_texts, relative_names

KINDS = {"jsonl": (".jsonl", ".jsonl.gz", ".ndjson"), "parquet": (".parquet",)}
PARQUET_BATCH_ROWS = 1024


def record_kind(source: str) -> str | None:
    """``"jsonl"`` or ``"parquet"`` for a record source (``jsonl:...`` / ``parquet:...``), else None."""
    kind = source.split(":", 1)[0]
    return kind if kind in KINDS and ":" in source else None


def record_files(source: str) -> list[pathlib.Path]:
    """The files of a ``jsonl:`` / ``parquet:`` source, in document order (see the module docstring).

    Raises ValueError (one line naming ``data.source``) when no path is given, a path does not exist, or a
    folder holds no file of the kind.
    """
    kind = record_kind(source)
    paths = [p.strip() for p in source[len(kind) + 1:].split(",") if p.strip()]
    if not paths:
        raise ValueError(f"data.source {source!r} must name at least one path after '{kind}:'")
    files: list[pathlib.Path] = []
    for raw in paths:
        path = pathlib.Path(raw).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = [p for p in _walk(path) if p.name.endswith(KINDS[kind])]
            if not found:
                raise ValueError(f"data.source {source}: folder {raw} holds no {' / '.join(KINDS[kind])} files")
            files.extend(found)
        else:
            raise ValueError(f"data.source {source}: path {raw} does not exist")
    return files


def jsonl_texts(path: pathlib.Path, field: str, where: str = "data.source") -> Iterator[tuple[int, str | None]]:
    """``(line number, text)`` of every non-blank line of a JSON Lines file (gzip when it ends in ``.gz``);
    text is None for a null value. Raises ValueError (one line starting with ``where``, naming the file and
    line) for a line that is not a JSON object, lacks ``field`` or holds a non-string there."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield number, _text_of(line, field, f"{where}: {path} line {number}")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ValueError(f"{where}: {path} cannot be read as UTF-8 JSON Lines ({e})") from None


def _text_of(line: str, field: str, where: str) -> str | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: must be a JSON object, not {type(record).__name__}")
    if field not in record:
        raise ValueError(f"{where}: has no field {field!r} (data.text_field; it has "
                         f"{', '.join(map(repr, list(record)[:5])) or 'none'})")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} (data.text_field) must be a string, not {type(value).__name__}")
    return value


def parquet_texts(path: pathlib.Path, field: str, where: str = "data.source") -> Iterator[tuple[int, str | None]]:
    """``(row number from 0, text)`` of every row of a Parquet file's string column ``field`` (None for null).
    Raises ValueError (one line starting with ``where``) when pyarrow is missing, the file is not Parquet, or
    the column is missing or not a string column."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{where}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{where}: {path} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise ValueError(f"{where}: {path} has no column {field!r} (data.text_field; columns: "
                         f"{', '.join(schema.names[:8])})")
    kind = schema.field(field).type
    values = kind.value_type if pa.types.is_dictionary(kind) else kind  # a categorical column of strings too
    if not (pa.types.is_string(values) or pa.types.is_large_string(values)
            or getattr(pa.types, "is_string_view", lambda _: False)(values)):
        raise ValueError(f"{where}: {path} column {field!r} (data.text_field) must hold strings, not {kind}")
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
        for text in batch.column(0).to_pylist():
            yield row, text
            row += 1


class RecordDocuments:
    """The documents of a ``jsonl:`` or ``parquet:`` source.

    Attributes:
      source: the ``data.source`` string; text_field: the field / column read.
      files: the files, in document order.
      fingerprint: 16 hex digits from the files' relative names and contents and ``text_field`` (a cache key).
      skipped: records left out so far, by reason (``{"empty": 3}``), filled while reading.
    """

    def __init__(self, source: str, text_field: str = "text"):
        self.source, self.text_field = source, text_field
        self.kind = record_kind(source)
        if self.kind is None:
            raise ValueError(f"data.source {source!r} must start with 'jsonl:' or 'parquet:'")
        self.files = record_files(source)
        self.fingerprint = cache.short_hash(self.kind, text_field, corpus_fingerprint(self.files))
        self.skipped: dict[str, int] = {}

    @property
    def stream_tag(self) -> str:
        """What names this source's token stream (with the tokenizer's fingerprint)."""
        return f"{self.kind}:{self.fingerprint}"

    def items(self) -> Iterator[tuple[str, str]]:
        """``(name, text)`` of each document in order: name is ``FILE:LINE`` (JSONL, from 1) or ``FILE:ROW``
        (Parquet, from 0), FILE relative to the files' common folder."""
        read = jsonl_texts if self.kind == "jsonl" else parquet_texts
        self.skipped = {}
        for path, name in zip(self.files, relative_names(self.files)):
            for where, text in read(path, self.text_field, f"data.source {self.source}"):
                if not text:
                    self.skipped["empty"] = self.skipped.get("empty", 0) + 1
                    continue
                yield f"{name}:{where}", text

    def texts(self) -> Iterator[str]:
        """Each document's text, in order."""
        return (text for _, text in self.items())

    def sample_texts(self, max_bytes: int) -> Iterator[str]:
        """The first documents, up to about ``max_bytes`` of text (at least one): the BPE training sample."""
        return first_texts(self.texts(), max_bytes)
