"""Weights & Biases logging (``log.wandb``; the optional ``wandb`` extra: ``pip install -e '.[wandb]'``).

One W&B run per lcjax run directory: its id is kept in ``<run dir>/wandb_run_id``, so a resumed or requeued
run appends to the same W&B run. ``log.wandb.mode: offline`` writes under ``<run dir>/wandb/`` without a
network (``wandb sync <run dir>/wandb/offline-run-*`` uploads it later).
"""

from __future__ import annotations

import secrets
from pathlib import Path

ID_FILE = "wandb_run_id"


def run_id(run_dir: str | Path) -> str:
    """The W&B run id of ``run_dir``: read from ``wandb_run_id``, or made (8 random hex digits) and written."""
    path = Path(run_dir) / ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    value = secrets.token_hex(4)
    path.write_text(value + "\n")
    return value


def check_available(cfg) -> None:
    """Raise ValueError (one line naming ``log.wandb.project``) when W&B logging is asked for and the
    ``wandb`` package is missing. Call before anything is written."""
    if cfg.log.wandb.project is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError(f"log.wandb.project {cfg.log.wandb.project!r}: W&B logging needs the wandb package "
                         f"(pip install -e '.[wandb]', or set log.wandb.project=null)") from None


class WandbSink:
    """A metrics sink (``write(record)``, ``close()``) that logs every record to a W&B run."""

    def __init__(self, cfg, run_dir: str | Path):
        import wandb

        from lcjax import config as config_lib

        w, run_dir = cfg.log.wandb, Path(run_dir)
        self._run = wandb.init(project=w.project, name=w.name or run_dir.name, id=run_id(run_dir), resume="allow",
                               dir=str(run_dir), mode=w.mode, config=config_lib.to_dict(cfg))

    def write(self, record: dict) -> None:
        values = {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v for k, v in record.items()
                  if k != "step" and v is not None}
        self._run.log(values, step=record["step"])

    def close(self) -> None:
        self._run.finish()


def sinks(cfg, run_dir: str | Path) -> list:
    """The extra metrics sinks ``cfg`` asks for: a :class:`WandbSink` when ``log.wandb.project`` is set."""
    return [WandbSink(cfg, run_dir)] if cfg.log.wandb.project is not None else []
