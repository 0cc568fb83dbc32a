"""``lcjax train --resume auto``: what to do with a run directory when the same command runs again.

A scheduler that requeues a preempted job (SLURM ``--requeue``, a Kubernetes JobSet restart) runs the same
command line again. :func:`auto_resume` decides from the run directory alone, reading and writing nothing
else: start fresh (missing or empty), continue (it holds this run), nothing to do (this run is complete),
or refuse (anything else). Import after the devices are provisioned (it imports JAX through the loop).
"""

from __future__ import annotations

from pathlib import Path

from lcjax import config as config_lib
from lcjax.checkpoint import saved_steps
from lcjax.config import Config
from lcjax.train.run_files import check_resume_compatible

FRESH, CONTINUE, DONE = "fresh", "continue", "done"


def auto_resume(run_dir: str | Path, cfg: Config) -> str:
    """``"fresh"``, ``"continue"`` or ``"done"`` for running ``cfg`` into ``run_dir`` with ``--resume auto``.

    - ``fresh``: ``run_dir`` does not exist or is an empty folder;
    - ``continue``: it holds a run (``config.yaml``) of the same model, data (source, tokenizer, sequence
      length, batch, seed, mixture) and ``train.seed``, whose newest checkpoint (if any) is before
      ``train.steps``; as with ``--resume``, ``train.steps``, the mesh, logging, checkpoint and memory keys
      may differ;
    - ``done``: the same, with a checkpoint at or after ``train.steps``.

    Raises ValueError (one line naming ``--resume auto`` and the run dir) when it holds anything else: a
    file, a folder with other contents and no ``config.yaml``, an unreadable ``config.yaml``, or another
    run (the first differing key is named).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return FRESH
    if not run_dir.is_dir():
        raise ValueError(f"--resume auto: --run-dir {run_dir} is a file, not a run directory")
    entries = sorted(p.name for p in run_dir.iterdir())
    if not entries:
        return FRESH
    if not (run_dir / "config.yaml").is_file():
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(f"--resume auto: --run-dir {run_dir} is not empty and holds no lcjax run (no config.yaml; "
                         f"found {shown})")
    try:
        saved = config_lib.load(run_dir / "config.yaml")
    except ValueError as e:
        raise ValueError(f"--resume auto: --run-dir {run_dir} holds a config.yaml that cannot be read ({e})") from None
    problem = other_run(saved, cfg)
    if problem:
        raise ValueError(f"--resume auto: --run-dir {run_dir} holds another run ({problem}); pick another --run-dir")
    steps = saved_steps(run_dir / "checkpoints")
    return DONE if steps and steps[-1] >= cfg.train.steps else CONTINUE


def other_run(saved: Config, cfg: Config) -> str | None:
    """None when ``cfg`` continues the run whose config is ``saved`` (same model, data and ``train.seed``),
    else the first difference, e.g. ``"model.d_model: 256 -> 128"``."""
    try:
        check_resume_compatible(saved, cfg)
    except ValueError as e:
        message = str(e).replace(": --resume cannot change it (", ": ", 1)
        return message[:-1] if message.endswith(")") else message
    if saved.train.seed != cfg.train.seed:
        return f"train.seed: {saved.train.seed!r} -> {cfg.train.seed!r}"
    return None
