"""A length curriculum (``data.curriculum``): short windows first, then longer ones, with exact resume.

:class:`StagedLoader` chains one :class:`lcjax.data.loader.Loader` per stage. Global batch n (0-based; the
batch of optimizer step n + 1) comes from the stage that step belongs to, read at that stage loader's
position n, so the batch counter alone determines every batch, across stage changes and resumes alike.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from lcjax.data.loader import Loader, LoaderSpec


def stage_index(stages: list[tuple[int, int, int]], step: int) -> int:
    """Index of the stage (until_step, seq_len, global_batch) that 1-based optimizer ``step`` falls in."""
    for i, (until, _, _) in enumerate(stages):
        if step <= until:
            return i
    return len(stages) - 1


class StagedLoader:
    """An endless iterator of batches whose window length and batch size follow ``stages``, a list of
    (until_step, seq_len, global_batch) with increasing until_step (the last stage extends past its own).

    ``get_state``/``set_state`` work as :class:`Loader`'s: ``{"batch": global batches delivered, ...}``
    with the identity of the last stage's loader (the run's ``data.seq_len`` and ``data.global_batch``).
    """

    def __init__(self, stages: list[tuple[int, int, int]], loaders: list[Loader]):
        self.stages, self._loaders = stages, loaders
        self._next, self._active = 0, None

    def seq_len_at(self, step: int) -> tuple[int, int]:
        """(seq_len, global_batch) of 1-based optimizer ``step``."""
        _, seq_len, batch = self.stages[stage_index(self.stages, step)]
        return seq_len, batch

    def __iter__(self) -> "StagedLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        stage = stage_index(self.stages, self._next + 1)
        if self._active != stage:
            self.close()
            loader = self._loaders[stage]
            loader.set_state({**loader.get_state(), "batch": self._next})
            self._active = stage
        batch = next(self._loaders[stage])
        self._next += 1
        return batch

    def get_state(self) -> dict:
        return {**self._loaders[-1].get_state(), "batch": self._next}

    def set_state(self, state: dict) -> None:
        """Continue from ``state``; raises ValueError (like :meth:`Loader.set_state`) for other data."""
        self._loaders[-1].set_state(state)
        self.close()
        self._next = int(state["batch"])

    def close(self) -> None:
        for loader in self._loaders:
            loader.close()
        self._active = None


def curriculum_loader(make: Callable[[LoaderSpec], Loader], stages: list[tuple[int, int, int]], spec: LoaderSpec):
    """A :class:`Loader` (one stage) or a :class:`StagedLoader` over ``stages``; ``make(stage_spec)`` builds
    one stage's loader (e.g. :meth:`lcjax.data.Dataset.loader`) from ``spec`` with the stage's seq_len and
    global_batch."""
    loaders = [make(dataclasses.replace(spec, seq_len=seq_len, global_batch=batch)) for _, seq_len, batch in stages]
    return loaders[0] if len(loaders) == 1 else StagedLoader(stages, loaders)
