"""Preemption: SIGTERM and SIGINT ask the loop to save and stop after the current step."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def preemption_signals():
    """While open, SIGTERM and SIGINT only set ``flag["signal"]`` (the loop saves and stops after the current
    step); a second one raises KeyboardInterrupt. In a thread other than the main one signals cannot be
    caught and nothing is installed."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        if flag["signal"] is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        flag["signal"] = signum
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
