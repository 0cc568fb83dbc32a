"""Run metrics: ``metrics.jsonl`` (one JSON object per record) and TensorBoard event files, and the
``--profile`` window of ``jax.profiler`` traces. Host-side I/O only, never inside the jitted step.

TensorBoard events are written by tensorboardX (no TensorFlow) into ``<run dir>/tensorboard/``; scalars are
tagged ``train/<name>`` and ``eval/<name>``. Open them with ``tensorboard --logdir <run dir>``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def clean(value) -> float | None:
    """A finite float, or None (JSON null) for NaN and infinities."""
    value = float(value)
    return value if math.isfinite(value) else None


def keep_records_up_to(path: Path, step: int) -> None:
    """Drop metrics.jsonl records after ``step`` (steps a resumed run is about to redo)."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


class MetricsWriter:
    """Appends records to ``<run dir>/metrics.jsonl`` and the same scalars to TensorBoard.

    ``start``: the step the run continues from (records and events after it, left by a killed run, are
    dropped: TensorBoard's ``purge_step``). Each record is a dict with an int ``step``; other values are
    numbers or None. ``kind`` ("train" or "eval") prefixes the TensorBoard tags; the JSON line carries the
    keys as given.
    """

    def __init__(self, run_dir: str | Path, start: int = 0):
        from tensorboardX import SummaryWriter

        run_dir = Path(run_dir)
        keep_records_up_to(run_dir / "metrics.jsonl", start)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")
        # the suffix keeps a resumed run (even within the same second) from reusing its event file's name
        self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if start else None,
                                 filename_suffix=f".from{start:010d}")

    def write(self, record: dict, kind: str = "train") -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and value is not None:
                self._tb.add_scalar(f"{kind}/{key}", value, record["step"])
        self._tb.flush()

    def text(self, tag: str, text: str) -> None:
        """A text summary (e.g. the run's config) at step 0."""
        self._tb.add_text(tag, text, 0)

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()


def parse_profile(text: str | None) -> tuple[int, int] | None:
    """``--profile START:END`` -> (START, END), inclusive optimizer steps; raises ValueError naming it."""
    if text is None:
        return None
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        start = end = 0
    if not 1 <= start <= end:
        raise ValueError(f"--profile {text!r} must be START:END with 1 <= START <= END (optimizer steps)")
    return start, end


class Profiler:
    """A ``jax.profiler`` trace of optimizer steps START..END (inclusive) into ``<run dir>/profile/``
    (open with TensorBoard's profile plugin, XProf or Perfetto). ``window`` None: does nothing."""

    def __init__(self, run_dir: str | Path, window: tuple[int, int] | None):
        self.window, self.directory, self.active = window, Path(run_dir) / "profile", False

    def before(self, step: int) -> None:
        if self.window and step == self.window[0]:
            import jax

            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, outputs=None) -> None:
        """Call after the step's outputs are ready (pass them: they are waited for before stopping)."""
        if self.active and step >= self.window[1]:
            import jax

            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False

    def close(self) -> None:
        if self.active:
            import jax

            jax.profiler.stop_trace()
            self.active = False
