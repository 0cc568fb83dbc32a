"""One writer per run directory, and output files that are never replaced unless asked.

A command that writes into a run directory (``lcjax train``, ``--resume``, ``eval passkey``, ``convert
hf-to-lcjax``) holds the directory's lock, ``<run dir>/.lcjax.lock``, for as long as it runs: an exclusive
``fcntl.flock`` on that file, which also records the holder (host, pid, start time, command). The operating
system drops the lock when the process ends, however it ends (``kill -9`` included), so a lock file left
behind by a killed process is stale: the next command takes it over and says so on stderr. A lock file that
names another host is never taken over automatically (the file system may not share locks across hosts);
the message tells how to remove it. In a multi-process run only the process that writes (process 0) takes
it. A command that created the run directory removes it again, with its lock file, when it fails before
the directory holds a run (:meth:`RunLock.keep`), so a refused start leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".lcjax.lock"


class RunDirBusy(ValueError):
    """Another live process holds the run directory's lock (CLI exit 2, one line naming the holder)."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a run directory's lock."""

    host: str
    pid: int
    started: str  # UTC, ISO 8601
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} ({self.command}, since {self.started})"


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in the lock file ``path``, or None when it is missing, empty or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
        return Holder(str(data["host"]), int(data["pid"]), str(data["started"]), str(data.get("command", "?")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _this_holder(command: str) -> Holder:
    return Holder(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), command)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def check_writable(directory: Path, field: str = "--run-dir", shown: Path | None = None) -> None:
    """Raise ValueError (one line naming ``field`` and ``shown``, default ``directory``) unless files can be
    created in ``directory`` or, when it does not exist yet, in its nearest existing ancestor (which must
    be a folder)."""
    directory = Path(directory)
    where = directory.absolute()
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise ValueError(f"{field} {shown or directory}: {where} is not a directory")
    try:  # a real probe: permissions, read-only mounts and quotas all show here
        tempfile.TemporaryFile(dir=where).close()
    except OSError as e:
        raise ValueError(f"{field} {shown or directory}: cannot write in {where} ({e.strerror or e})") from None


class RunLock:
    """The held lock of one run directory (:func:`acquire`). ``release()`` gives it back; a directory this
    lock created is removed then too, unless :meth:`keep` was called."""

    def __init__(self, run_dir: Path, fd: int, created: list[Path]):
        self.run_dir, self._fd, self._created = run_dir, fd, created

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_NAME

    def keep(self) -> None:
        """The run directory now holds a run: it stays when the command fails later."""
        self._created = []

    def release(self) -> None:
        """Remove the lock file and drop the lock; remove the folders this lock created (not kept) when they
        are empty. Safe to call twice."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # before unlocking: a waiter that opened it re-checks the inode (see acquire)
        os.close(self._fd)
        self._fd = None
        for folder in self._created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


def _create_dirs(run_dir: Path) -> list[Path]:
    """mkdir -p ``run_dir``; return the folders created, deepest first."""
    missing = []
    path = run_dir.absolute()
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process got there first: the lock decides
            folder.mkdir()
    return missing


def acquire(run_dir: str | Path, *, command: str, create: bool = False, log=None) -> RunLock:
    """Take the lock of ``run_dir`` for ``command`` (e.g. "lcjax train"), creating the folder (and its
    parents) first when ``create``. ``log`` (default: stderr) gets one line when a stale lock of a dead
    process on this host is taken over.

    Raises RunDirBusy (one line naming the holder: host, pid, start time) when a live process holds it or
    a lock file left on another host is found; ValueError (one line) when the folder is missing (without
    ``create``) or not writable. Returns the held :class:`RunLock`.
    """
    run_dir = Path(run_dir)
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    check_writable(run_dir)
    created = _create_dirs(run_dir) if create else []
    if not run_dir.is_dir():
        raise ValueError(f"--run-dir {run_dir}: {'not a directory' if run_dir.exists() else 'does not exist'}")
    path = run_dir / LOCK_NAME
    try:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ValueError(f"--run-dir {run_dir}: cannot create its lock file ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise ValueError(f"--run-dir {run_dir}: cannot lock {path} ({e.strerror})") from None
                holder = read_holder(path)
                who = holder.describe() if holder else "another process"
                raise RunDirBusy(f"--run-dir {run_dir} is in use by {who}; one writer per run dir "
                                 f"(wait for it to finish or stop it)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:  # its holder released it (and removed the file) meanwhile
                same = False
            if same:
                break
            os.close(fd)
        _take_over(path, fd, command, log)
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                (folder / LOCK_NAME).unlink()
                folder.rmdir()
        raise
    return RunLock(run_dir, fd, created)


def _take_over(path: Path, fd: int, command: str, log) -> None:
    """Record this process as the holder in the locked file ``fd``; a holder recorded there before is
    stale (no live process holds the lock): taken over when it was on this host, refused otherwise."""
    old, me = read_holder(path), _this_holder(command)
    if old is not None and old.pid != me.pid:
        if old.host != me.host:
            os.close(fd)
            raise RunDirBusy(f"--run-dir {path.parent}: its lock names {old.describe()}, another host, which "
                             f"may still run; if it does not, delete {path}")
        state = "no longer running" if not _pid_alive(old.pid) else "no longer holding it"
        log(f"lcjax: --run-dir {path.parent}: taking over the stale lock of {old.describe()}, {state}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(vars(me)).encode(), 0)
    os.fsync(fd)


@contextlib.contextmanager
def locked(run_dir: str | Path, *, command: str, create: bool = False, enabled: bool = True, log=None):
    """``with locked(run_dir, command=...) as lock:`` hold the lock of ``run_dir`` for the block (see
    :func:`acquire`; ``enabled`` False: no lock, ``lock`` is None, e.g. in processes other than 0)."""
    lock = acquire(run_dir, command=command, create=create, log=log) if enabled else None
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def holds_run(run_dir: Path) -> bool:
    """True when ``run_dir`` holds anything besides a lock file."""
    return run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir())


def check_new_file(path: str | Path, *, overwrite: bool, field: str = "--out") -> Path:
    """``path`` as a Path when a result may be written there: it does not exist, or ``overwrite`` and it
    is a file; its folder exists or can be created, and is writable. Raises ValueError (one line naming
    ``field``) otherwise."""
    path = Path(path)
    if path.exists() and (path.is_dir() or not overwrite):
        why = "is a directory" if path.is_dir() else "already exists (pass --overwrite to replace it)"
        raise ValueError(f"{field} {path} {why}")
    check_writable(path.parent, field, shown=path)
    return path


def new_name(path: str | Path) -> Path:
    """``path`` if free, else the first free ``stem-2.suffix``, ``stem-3.suffix``, ... beside it."""
    path = Path(path)
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def is_inside(path: str | Path, directory: str | Path) -> bool:
    """True when ``path`` lies in ``directory`` (after resolving both)."""
    return Path(directory).resolve() in Path(path).resolve().parents


def write_new(path: str | Path, data: bytes, *, overwrite: bool = False, field: str = "--out") -> Path:
    """Write ``data`` to ``path`` whole (a temporary file beside it, then one rename or link): with
    ``overwrite`` replacing what is there, else never replacing a file, even one that appeared since it
    was checked (ValueError naming ``field``). Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    try:
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails when path exists: never replaces
    except FileExistsError:
        raise ValueError(f"{field} {path} already exists (pass --overwrite to replace it)") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path
