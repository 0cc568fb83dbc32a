"""The on-disk cache shared by the tokenizer and the token memmap: where it lives, keys, atomic writes.

Every cached artefact is a folder ``<cache dir>/<kind>/<key>/``. It is built in a temporary sibling folder and
renamed into place in one step, so a run killed half-way never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import tempfile

CACHE_ENV = "LCJAX_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The cache folder: ``cache_dir`` if given, else ``$LCJAX_CACHE``, else ``~/.cache/lcjax``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "lcjax"


def short_hash(*parts: object) -> str:
    """A 16-hex-digit BLAKE2b hash of the ``repr`` of ``parts`` (stable across runs and machines)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


@contextlib.contextmanager
def atomic_dir(final: pathlib.Path):
    """Yield a fresh temporary folder; on success rename it to ``final`` (which must not exist yet).

    If another process created ``final`` meanwhile, its copy wins and ours is discarded. On an exception the
    temporary folder is removed and ``final`` is left untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
