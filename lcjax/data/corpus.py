"""Corpus selection: which text files a ``data.source`` names, and a fingerprint of them for cache keys.

A document is one file, read as UTF-8; files that are not valid UTF-8 are left out of folders.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig

FILES_PREFIX = "files:"
_SITE_DIRS = frozenset({"site-packages", "dist-packages"})


def corpus_files(source: str) -> list[pathlib.Path]:
    """The files of the corpus named by ``source`` (the ``data.source`` config key), in document order.

    - ``"stdlib"``: the running Python's standard library ``.py`` files, sorted by path, without anything
      under ``site-packages``/``dist-packages`` and without files that are not valid UTF-8.
    - ``"files:PATH[,PATH...]"``: each PATH in the given order; a file is taken as is (it must be UTF-8),
      a folder contributes all its regular files recursively, sorted by path, skipping hidden entries
      (names starting with ``.``) and files that are not valid UTF-8.

    Raises ValueError (one line naming ``data.source``) for any other form, a missing path, a named file
    that is not UTF-8, or a selection without files.
    """
    if source == "stdlib":
        files = _stdlib_files()
    elif source.startswith(FILES_PREFIX):
        files = _listed_files(source)
    else:
        raise ValueError(f"data.source {source!r} must be 'stdlib' or 'files:PATH[,PATH...]'")
    if not files:
        raise ValueError(f"data.source {source}: no UTF-8 text files found")
    return files


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


def _stdlib_files() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return [p for p in _walk(root, skip_dirs=_SITE_DIRS) if p.suffix == ".py" and _is_utf8(p)]


def _listed_files(source: str) -> list[pathlib.Path]:
    paths = [p.strip() for p in source[len(FILES_PREFIX):].split(",") if p.strip()]
    if not paths:
        raise ValueError(f"data.source {source!r} must name at least one path after 'files:'")
    files: list[pathlib.Path] = []
    for raw in paths:
        path = pathlib.Path(raw).expanduser()
        if path.is_dir():
            files.extend(p for p in _walk(path) if _is_utf8(p))
        elif path.is_file():
            if not _is_utf8(path):
                raise ValueError(f"data.source {source}: file {raw} is not valid UTF-8 text")
            files.append(path)
        else:
            raise ValueError(f"data.source {source}: path {raw} does not exist")
    return files


def _walk(root: pathlib.Path, skip_dirs: frozenset[str] = frozenset()) -> list[pathlib.Path]:
    """Regular, non-hidden files under ``root`` (symlinked folders not followed), sorted by path."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip_dirs and not d.startswith(".")]
        found.extend(pathlib.Path(folder, n) for n in names if not n.startswith("."))
    return sorted(p for p in found if p.is_file())


def _is_utf8(path: pathlib.Path) -> bool:
    try:
        read_text(path)
    except (UnicodeDecodeError, OSError):
        return False
    return True

