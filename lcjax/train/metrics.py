"""Run metrics: ``metrics.jsonl`` (one JSON object per record) and TensorBoard event files, and the
``--profile`` window of ``jax.profiler`` traces. Host-side I/O only, never inside the jitted step.

TensorBoard events are written by tensorboardX (no TensorFlow) into ``<run dir>/tensorboard/``; scalars are
tagged ``train/<name>`` and ``eval/<name>``. Open them with ``tensorboard --logdir <run dir>``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lcjax.memcheck import compiled_bytes  # noqa: F401  (re-exported: scripts and tests use lcjax.train.metrics.compiled_bytes)


def clean(value) -> float | None:
    """A finite float, or None (JSON null) for NaN and infinities."""
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsWriter:
    """Appends records to ``<run dir>/metrics.jsonl`` and the same scalars to TensorBoard.

    ``start``: the step the run continues from (TensorBoard events after it, left by a killed run, are
    dropped: ``purge_step``; the trainer trims metrics.jsonl itself). Each record is a dict with an int
    ``step``; other values are numbers, booleans or None. Keys ``eval_*`` are tagged ``eval/*``, the others
    ``<kind>/<key>``; the JSON line carries the keys as given. ``sinks``: objects with ``write(record)`` and
    ``close()`` that receive every record too (W&B).
    """

    def __init__(self, run_dir: str | Path, start: int = 0, sinks: list = ()):
        from tensorboardX import SummaryWriter

        run_dir = Path(run_dir)
        self._sinks = list(sinks)  # more destinations of every record, e.g. lcjax.train.wandb_log.WandbSink
        self._jsonl = open(run_dir / "metrics.jsonl", "a")
        # the suffix keeps a resumed run (even within the same second) from reusing its event file's name
        self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if start else None,
                                 filename_suffix=f".from{start:010d}")

    def write(self, record: dict, kind: str = "train") -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and value is not None:
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"{kind}/{key}"
                self._tb.add_scalar(tag, float(value), record["step"])
        self._tb.flush()
        for sink in self._sinks:
            sink.write(record)

    def text(self, tag: str, text: str) -> None:
        """A text summary (e.g. the run's config) at step 0."""
        self._tb.add_text(tag, text, 0)

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()
        for sink in self._sinks:
            sink.close()


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


def preset_for(platform: str, device_kind: str) -> str:
    """The planner's device preset for a JAX device: ``cpu`` for host devices, else matched on the
    device kind (e.g. "NVIDIA H100 80GB HBM3" -> h100), h100 when nothing matches."""
    if platform == "cpu":
        return "cpu"
    kind = device_kind.lower()
    return next((name for name in ("h200", "h800", "h100", "a100") if name in kind), "h100")


def startup_summary(cfg, memory_analysis, *, platform: str, device_kind: str, n_params: int) -> list[str]:
    """The one-screen summary printed before the first step: mesh, parameters, tokens per step, XLA's
    compiled per-device memory next to the planner's prediction, and the planner's tokens/s and MFU.

    ``memory_analysis``: ``compiled.memory_analysis()`` of the train step (None: not available).
    On the CPU backend the planner is asked for its CPU-backend figure (bf16 kept as float32)."""
    from lcjax import plan as plan_lib

    gb = lambda b: f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"
    m, d, t = cfg.mesh, cfg.data, cfg.train
    preset = preset_for(platform, device_kind)
    inputs = plan_lib.StepInputs.from_config(cfg, stored_bytes=4 if platform == "cpu" else None)
    plan = plan_lib.plan_step(inputs, plan_lib.device(preset))
    lines = [f"mesh data={m.data} sequence={m.sequence} model={m.model} ({m.data * m.sequence * m.model} "
             f"{platform} devices), {n_params:,} parameters, {d.global_batch * d.seq_len:,} tokens/step "
             f"({d.global_batch} x {d.seq_len:,}), {t.dtype} compute, {t.param_dtype} parameters, "
             f"remat {t.remat}, fsdp {t.fsdp}, shard_optimizer {t.shard_optimizer}, grad_accum {t.grad_accum}"]
    predicted = plan.memory.total
    if memory_analysis is not None:
        xla = compiled_bytes(memory_analysis)
        gap = (predicted - xla["total"]) / max(xla["total"], 1)
        lines.append(f"memory per device: XLA {gb(xla['total'])} compiled (arguments {gb(xla['argument'])}, "
                     f"temporaries {gb(xla['temp'])}); planner {gb(predicted)} ({gap:+.0%})")
    else:
        lines.append(f"memory per device: planner {gb(predicted)} (XLA's analysis not available)")
    if preset == "cpu":  # simulated devices share the host's cores: no meaningful speed prediction
        lines.append("planner speed and MFU: predicted for GPUs only (lcjax plan --device h100 ...)")
    else:
        lines.append(f"planner ({preset} preset, efficiency {plan.device.efficiency}): "
                     f"{plan.tokens_per_sec_per_device:,.0f} tokens/s/device, MFU {plan.mfu['causal']:.2f} "
                     f"causal / {plan.mfu['palm']:.2f} PaLM")
    return lines
