"""``lcjax checkpoints DIR``: list a run's checkpoints and verify each (lcjax.checkpoint.verify).

One line per checkpoint: its step, ``intact`` or ``damaged`` and, when damaged, which file and which check
failed. Exit code 0 when every checkpoint is intact, 1 when one is damaged, 2 for a DIR that is neither a
run dir nor a folder of checkpoints. ``--quick`` checks the structure and the arrays' headers without
reading the data (a truncated data file is found only without it).
"""

from __future__ import annotations

import logging
from pathlib import Path

EXIT_DAMAGED = 1


def quiet_libraries() -> None:
    """Keep library log records below ERROR (Orbax's and absl's INFO and WARNING lines) off stderr: a
    command's own output is its one-line messages."""
    for name in ("absl", "orbax"):
        logging.getLogger(name).setLevel(logging.ERROR)


def add_parser(sub) -> None:
    """The ``checkpoints`` sub-command of the ``lcjax`` parser ``sub``."""
    ck = sub.add_parser("checkpoints", help="list a run's checkpoints and verify each (intact or damaged, why)")
    ck.add_argument("dir", metavar="DIR", help="a run dir, or its checkpoints/ folder")
    ck.add_argument("--quick", action="store_true",
                    help="check files and metadata only, without reading every stored byte")


def checkpoints_folder(path: Path) -> Path:
    """The folder of checkpoints that ``path`` names: ``path/checkpoints`` of a run dir, or ``path`` itself
    when it holds numbered checkpoint folders. Raises ValueError (one line) otherwise."""
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
        return path
    what = "does not exist" if not path.exists() else "is neither a run dir nor a folder of checkpoints"
    raise ValueError(f"DIR {path} {what}")


def table(rows: list[tuple[int, str | None]]) -> list[str]:
    """Lines ``step N  intact`` / ``step N  damaged: FILE: CHECK`` for (step, problem) rows."""
    return [f"step {step:>8}  " + ("intact" if problem is None else f"damaged: {problem}") for step, problem in rows]


def run(args) -> int:
    """List and verify the checkpoints of ``args.dir``; the exit code (see the module doc)."""
    from lcjax.checkpoint import survey

    folder = checkpoints_folder(Path(args.dir))
    rows = survey(folder, data=not args.quick)
    if not rows:
        print(f"lcjax: {folder}: no checkpoint")
        return 0
    print(f"lcjax: {folder}: {len(rows)} checkpoint(s)")
    print("\n".join(table(rows)))
    return EXIT_DAMAGED if any(problem for _, problem in rows) else 0
