"""Corpus selection: which text files a ``data.source`` names, and a fingerprint of them for cache keys.

A document is one file, read as UTF-8. Inside folders, files that are empty, binary (holding a NUL byte)
or not valid UTF-8 are skipped and counted (:func:`scan`), never fatal; a file named explicitly must be
readable text.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig

FILES_PREFIX = "files:"
TFDS_PREFIX = "tfds:"
SOURCE_FORMS = "'stdlib', 'files:PATH[,PATH...]' or 'tfds:NAME[/CONFIG]'"
_SITE_DIRS = frozenset({"site-packages", "dist-packages"})


def corpus_files(source: str) -> list[pathlib.Path]:
    """The files of the corpus named by ``source`` (the ``data.source`` config key), in document order.

    - ``"stdlib"``: the running Python's standard library ``.py`` files, sorted by path, without anything
      under ``site-packages``/``dist-packages`` and without files that are not readable text.
    - ``"files:PATH[,PATH...]"``: each PATH in the given order; a file is taken as is (it must be readable
      text: non-empty UTF-8 without NUL bytes), a folder contributes all its regular files recursively,
      sorted by path, skipping hidden entries (names starting with ``.``) and files that are empty, binary
      or not UTF-8 (counted by :func:`scan`).

    Raises ValueError (one line naming ``data.source``) for any other form, a missing path, a named file
    that is not readable text, or a selection without files.
    """
    return scan(source)[0]


def scan(source: str) -> tuple[list[pathlib.Path], dict[str, int]]:
    """``(files, skipped)``: :func:`corpus_files` and how many files of folders were skipped, by reason
    (``"empty"``, ``"binary"``, ``"not UTF-8"``, ``"unreadable"``; reasons with no file are left out)."""
    skipped: dict[str, int] = {}
    if source == "stdlib":
        files = _readable(_walk(pathlib.Path(sysconfig.get_paths()["stdlib"]), skip_dirs=_SITE_DIRS,
                                suffix=".py"), skipped)
    elif source.startswith(FILES_PREFIX):
        files = _listed_files(source, skipped)
    else:
        raise ValueError(f"data.source {source!r} must be {SOURCE_FORMS}")
    if not files:
        raise ValueError(f"data.source {source}: no readable text files found{describe_skipped(skipped, ' (skipped: ', ')')}")
    return files, skipped


def describe_skipped(skipped: dict[str, int], before: str = "", after: str = "") -> str:
    """``"2 binary, 1 empty"`` (wrapped in ``before``/``after``), or ``""`` when nothing was skipped."""
    if not skipped:
        return ""
    return before + ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) + after


def read_text(path: pathlib.Path) -> str:
    """The UTF-8 text of ``path`` (raises UnicodeDecodeError for other encodings)."""
    return path.read_bytes().decode("utf-8")


def corpus_fingerprint(files: list[pathlib.Path]) -> str:
    """A 16-hex-digit hash of the corpus: each file's path relative to the files' common folder and content.

    Identical trees in different places (or with different mtimes) give the same fingerprint; any change of
    content, name or order gives another. Used as a cache key.
    """
    digest = hashlib.blake2b(digest_size=8)
    for path, name in zip(files, relative_names(files)):
        data = path.read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(hashlib.blake2b(data, digest_size=16).digest())
    return digest.hexdigest()


def relative_names(files: list[pathlib.Path]) -> list[str]:
    """Each file's path relative to the common folder of all ``files`` (POSIX separators)."""
    if not files:
        return []
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in files])
    return [pathlib.Path(os.path.relpath(os.path.abspath(p), root)).as_posix() for p in files]


def _listed_files(source: str, skipped: dict[str, int]) -> list[pathlib.Path]:
    paths = [p.strip() for p in source[len(FILES_PREFIX):].split(",") if p.strip()]
    if not paths:
        raise ValueError(f"data.source {source!r} must name at least one path after 'files:'")
    files: list[pathlib.Path] = []
    for raw in paths:
        path = pathlib.Path(raw).expanduser()
        if path.is_dir():
            files.extend(_readable(_walk(path), skipped))
        elif path.is_file():
            reason = why_unreadable(path)
            if reason:
                raise ValueError(f"data.source {source}: file {raw} is not readable text ({reason})")
            files.append(path)
        else:
            raise ValueError(f"data.source {source}: path {raw} does not exist")
    return files


def _readable(paths: list[pathlib.Path], skipped: dict[str, int]) -> list[pathlib.Path]:
    kept = []
    for path in paths:
        reason = why_unreadable(path)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            kept.append(path)
    return kept


def _walk(root: pathlib.Path, skip_dirs: frozenset[str] = frozenset(), suffix: str = "") -> list[pathlib.Path]:
    """Regular, non-hidden files under ``root`` (symlinked folders not followed), sorted by path."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip_dirs and not d.startswith(".")]
        found.extend(pathlib.Path(folder, n) for n in names if not n.startswith(".") and n.endswith(suffix))
    return sorted(p for p in found if p.is_file())


def why_unreadable(path: pathlib.Path) -> str | None:
    """None for a non-empty UTF-8 text file without NUL bytes, else the reason: ``"empty"``, ``"binary"``
    (holds a NUL byte), ``"not UTF-8"`` or ``"unreadable"`` (an OS error)."""
    try:
        data = path.read_bytes()
    except OSError:
        return "unreadable"
    if not data:
        return "empty"
    if b"\0" in data:
        return "binary"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    return None


def first_texts(texts, max_bytes: int):
    """The leading texts of the iterable ``texts`` up to about ``max_bytes`` characters in all (at least one):
    the BPE training sample of sources read in order (records, TFDS)."""
    total = 0
    for text in texts:
        yield text
        total += len(text)
        if total >= max_bytes:
            return
