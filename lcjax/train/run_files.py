"""The run directory's files (docs/design.md, "Public contracts"): the checks a command makes before it
writes (:func:`check_inputs`), and the writes themselves: ``config.yaml`` (resolved), ``tokenizer/``,
``metrics.jsonl`` (one JSON object per optimizer step, appended across resumes) and the set-aside folder of
``--resume --step``. Every write replaces a file in one step or appends; nothing here needs JAX."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lcjax import config as config_lib
from lcjax import rundir
from lcjax.checkpoint import check_directory
from lcjax.config import Config
from lcjax.train.init_from import check_init_from, check_init_optimizer

RESUME_FREE = ("cache_dir", "data_dir", "workers")  # keys of the model/data sections that do not affect a resumed run


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Raise ValueError unless ``run_dir`` is new (missing or empty) and creatable (fresh run) or holds a
    run (``--resume``), and is writable."""
    if resume and not (run_dir / "config.yaml").is_file():
        what = "does not exist" if not run_dir.exists() else "holds no run (no config.yaml)"
        raise ValueError(f"--resume: run dir {run_dir} {what}")
    if not resume and (rundir.holds_run(run_dir) or (run_dir.exists() and not run_dir.is_dir())):
        raise ValueError(f"--run-dir {run_dir} already exists; pass --resume to continue it")
    rundir.check_writable(run_dir)


def check_resume_compatible(saved: Config, cfg: Config) -> None:
    """Raise ValueError when a resumed run changes what a checkpoint cannot follow (the model shape,
    the data order)."""
    for section in ("model", "data"):
        a, b = config_lib.to_dict(saved)[section], config_lib.to_dict(cfg)[section]
        for key in a:
            if a[key] != b[key] and key not in RESUME_FREE:
                raise ValueError(f"{section}.{key}: --resume cannot change it ({a[key]!r} -> {b[key]!r})")


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop metrics.jsonl records of the steps a run resumed at ``step`` is about to redo: those after
    ``step`` and the skipped (non-finite) ones that followed it."""
    if path.is_file():
        kept = []
        for line in path.read_text().splitlines(keepends=True):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if not isinstance(r, dict) or not isinstance(r.get("step"), int):
                continue
            if r["step"] < step or (r["step"] == step and not r.get("skipped")):
                kept.append(line if line.endswith("\n") else line + "\n")
        write_atomic(path, "".join(kept))


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step (a kill leaves the old file or the new one, never half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def set_aside(run_dir: Path, start: int) -> list[int]:
    """Move the checkpoints after step ``start`` (a ``--resume --step`` to an older one) and a copy of
    metrics.jsonl into ``run_dir/set-aside/after-<start>[-N]/``, so the continued run never mixes with
    them and nothing is lost; say so on stderr. Returns the steps moved."""
    import shutil
    import sys

    later = [s for s in check_directory(run_dir / "checkpoints") if s > start]
    if not later:
        return []
    dest = rundir.new_name(run_dir / "set-aside" / f"after-{start}")
    (dest / "checkpoints").mkdir(parents=True)
    for s in later:
        os.replace(run_dir / "checkpoints" / str(s), dest / "checkpoints" / str(s))
    if (run_dir / "metrics.jsonl").is_file():
        shutil.copy2(run_dir / "metrics.jsonl", dest / "metrics.jsonl")
    print(f"lcjax: --resume --step {start}: set aside the later checkpoints {', '.join(map(str, later))} "
          f"and a copy of metrics.jsonl in {dest}", file=sys.stderr, flush=True)
    return later


def check_inputs(cfg: Config, run_dir: Path, resume: bool, init_from, init_optimizer: bool = False,
                 step: int | None = None) -> list[int]:
    """Check the run dir and what ``--resume`` (``--step``) or ``--init-from`` (and ``--init-optimizer``)
    point at (ValueError, one line); return the steps of the run dir's complete checkpoints up to the one
    to continue (none for a new run). ``--resume`` needs a checkpoint: a run dir without one is refused."""
    check_run_dir(run_dir, resume)
    if resume and init_from is not None:
        raise ValueError("--resume and --init-from exclude each other")
    if init_from is not None:
        check_init_from(Path(init_from), cfg)
    check_init_optimizer(init_from, init_optimizer)
    if step is not None and not resume:
        raise ValueError("--step needs --resume (the checkpoint of --run-dir to continue)")
    if not resume:
        return []
    saved = check_directory(run_dir / "checkpoints")
    if not saved:
        raise ValueError(f"--resume: run dir {run_dir} holds no checkpoint to continue (its run stopped before "
                         f"the first save); start afresh with --config {run_dir / 'config.yaml'} and a new --run-dir")
    if step is not None:
        if step not in saved:
            raise ValueError(f"--step {step}: run dir {run_dir} has no checkpoint at that step "
                             f"(saved: {', '.join(map(str, saved))})")
        saved = [s for s in saved if s <= step]
    check_resume_compatible(config_lib.load(run_dir / "config.yaml"), cfg)
    if saved and cfg.train.steps <= saved[-1]:
        raise ValueError(f"train.steps {cfg.train.steps} must be greater than the newest checkpoint's step "
                         f"{saved[-1]} to --resume")
    return saved


def write_run_files(run_dir: Path, cfg: Config, tokenizer, start: int) -> None:
    """Create the run dir (or continue it from step ``start``): config.yaml, tokenizer/, metrics.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_metrics_up_to(run_dir / "metrics.jsonl", start)
    write_atomic(run_dir / "config.yaml", config_lib.to_yaml(cfg))
    if not (run_dir / "tokenizer" / "tokenizer.json").is_file():  # a resumed run keeps its own
        tokenizer.save(run_dir / "tokenizer")
