"""What the trainer reports while it runs: a progress bar on a terminal, else one log line per ``log.every``
optimizer steps through Python's ``logging`` (logger ``lcjax``; on stdout, next to the start-up summary and
the final line, so stderr keeps holding only errors), and the measured MFU and device memory that go into
every metrics record.

Measured MFU follows the PaLM convention (Chowdhery et al. 2022, App. B; what MaxText and torchtitan
report): model FLOPs per token 6N + 12·L·n_h·d_h·T (lcjax.plan.flops, no causal discount, no
rematerialisation) × the measured tokens/s ÷ (devices × the device's dense peak FLOP/s for the compute
dtype). It is left out (null) on CPU devices, whose "peak" would be a guess.
"""

from __future__ import annotations

import logging
import math
import sys
import time

from tqdm import tqdm

LOGGER = logging.getLogger("lcjax")


def ensure_handler() -> None:
    """Send the ``lcjax`` logger's INFO lines to stdout (``2026-01-31 12:00:00 lcjax: step 5/100 loss …``)
    unless a handler was attached to that logger already (an application routing them elsewhere)."""
    if LOGGER.level == logging.NOTSET:
        LOGGER.setLevel(logging.INFO)
    if not LOGGER.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s lcjax: %(message)s", "%Y-%m-%d %H:%M:%S"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False


class _StdoutHandler(logging.StreamHandler):
    """A stream handler writing to whatever ``sys.stdout`` is at the time of each record."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def peak_flops(platform: str, device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device for compute ``dtype`` (the planner's presets, lcjax.plan.hardware),
    or None on CPU devices."""
    from lcjax import plan as plan_lib
    from lcjax.train.metrics import preset_for

    preset = preset_for(platform, device_kind)
    return None if preset == "cpu" else plan_lib.device(preset).peak(2 if dtype == "bfloat16" else 4)


def model_flops_per_token(model_cfg, seq_len: int) -> int:
    """PaLM model FLOPs per trained token at sequence length ``seq_len`` (6N + 12·L·n_h·d_h·T)."""
    from lcjax.plan import Shape
    from lcjax.plan.flops import flops_per_token

    return flops_per_token(Shape.from_model_config(model_cfg), seq_len, causal=False)


def measured_mfu(tokens_per_sec: float | None, flops_per_token: float, devices: int,
                 peak: float | None) -> float | None:
    """Model FLOPs utilisation: tokens/s (global) × FLOPs per token ÷ (devices × peak FLOP/s); None when
    the peak is unknown or the throughput is not a finite number."""
    if peak is None or tokens_per_sec is None or not math.isfinite(tokens_per_sec) or devices < 1:
        return None
    return tokens_per_sec * flops_per_token / (devices * peak)


def device_memory_bytes(devices) -> int | None:
    """The largest peak (else current) bytes in use over ``devices`` (this process's), from
    ``device.memory_stats()``; None when the backend does not report it (CPU)."""
    used = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # backends without the call
            stats = None
        if stats:
            value = stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))
            if value is not None:
                used.append(int(value))
    return max(used) if used else None


class StepMeter:
    """Measured MFU (PaLM convention) and device memory of each step, for its metrics record."""

    def __init__(self, cfg, devices):
        self.cfg, self.devices = cfg, list(devices)
        first = self.devices[0]
        self.peak = peak_flops(first.platform, first.device_kind, cfg.train.dtype)
        self.n_devices = cfg.mesh.data * cfg.mesh.sequence * cfg.mesh.model

    def measure(self, tokens_per_sec: float | None, seq_len: int) -> dict:
        """``{"mfu": …, "device_memory_gb": …}`` (None where unknown) for a step at ``tokens_per_sec``
        (global) on sequences of ``seq_len`` tokens."""
        flops = model_flops_per_token(self.cfg.model, seq_len)
        used = device_memory_bytes(self.devices)
        return {"mfu": measured_mfu(tokens_per_sec, flops, self.n_devices, self.peak),
                "device_memory_gb": None if used is None else used / 1e9}


def duration(seconds: float | None) -> str:
    """``1h02m``, ``3m07s`` or ``12s``; ``?`` for None."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def log_line(record: dict, total_steps: int, eta_s: float | None = None) -> str:
    """One line for a metrics record: ``step N/TOTAL loss L lr … grad_norm … tokens/s … [mfu …] [mem …]
    [eval_loss …] eta …``; a skipped (non-finite) step says so."""
    num = lambda key, fmt: "null" if record.get(key) is None else format(record[key], fmt)
    parts = [f"step {record['step']}/{total_steps}", f"loss {num('loss', '.4f')}", f"lr {num('lr', '.3e')}",
             f"grad_norm {num('grad_norm', '.3f')}", f"tokens/s {num('tokens_per_sec', ',.0f')}"]
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if record.get("device_memory_gb") is not None:
        parts.append(f"mem {record['device_memory_gb']:.2f} GB")
    if record.get("eval_loss") is not None:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    if record.get("skipped"):
        parts.append("skipped (non-finite)")
    parts.append(f"eta {duration(eta_s)}")
    return " ".join(parts)


def use_bar(progress: bool, stream=None) -> bool:
    """The progress bar only when asked for and ``stream`` (default stderr) is a terminal; batch jobs and
    ``--no-progress`` get log lines."""
    stream = sys.stderr if stream is None else stream
    return bool(progress and getattr(stream, "isatty", lambda: False)())


class StepReporter:
    """A tqdm bar (loss, tokens/s, ETA) or a log line every ``every`` optimizer steps and at the last step.

    ``start``: the step the run continues from; ``total``: ``train.steps``; ``enabled`` False (processes
    other than the first) reports nothing.
    """

    def __init__(self, total: int, start: int, every: int, *, bar: bool, enabled: bool = True):
        self.total, self.every, self.enabled, self.start = total, every, enabled, start
        self._t0, self._bar, self._shown = time.perf_counter(), None, {}
        if enabled and bar:
            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)
        elif enabled:
            ensure_handler()

    def eta_s(self, step: int) -> float | None:
        """Seconds left at the rate of the steps done since this run started."""
        done = step - self.start
        return (time.perf_counter() - self._t0) / done * (self.total - step) if done > 0 else None

    def report(self, record: dict, bad: int = 0) -> None:
        """Show one metrics record (after the step it describes)."""
        if not self.enabled:
            return
        step = record["step"]
        if self._bar is not None:
            if not record.get("skipped"):
                self._bar.update(1)
            loss = "nan" if record.get("loss") is None else f"{record['loss']:.4f}"
            if record.get("eval_loss") is not None:
                self._shown = {"val": f"{record['eval_loss']:.4f}"}
            self._bar.set_postfix(loss=loss, **self._shown, tok_s=f"{record.get('tokens_per_sec') or 0:.0f}",
                                  bad=bad)
        elif step % self.every == 0 or step == self.total or record.get("skipped"):
            LOGGER.info(log_line(record, self.total, self.eta_s(step)))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
