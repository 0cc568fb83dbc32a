"""The run's data on the devices: the dataset (tokenized with the run's or ``--init-from``'s tokenizer),
global [B, T] batches placed so that every process puts only its own devices' rows, the fixed validation
batches, and zero batches of a step's shape (for compiling ahead of it)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from lcjax import config as config_lib
from lcjax.config import Config
from lcjax.data import Dataset, LoaderSpec
from lcjax.data.curriculum import stage_index
from lcjax.data.mixture import build_data
from lcjax.train.step import BATCH_FIELDS


def zeros_batch(cfg: Config, step: int) -> dict:
    """A batch of the shape of 1-based ``step``'s batches (for compiling ahead of it; data.curriculum)."""
    stages = config_lib.stages(cfg)
    _, seq_len, batch = stages[stage_index(stages, step)]
    padded = config_lib.padded_seq_len(seq_len, cfg.attention.layout, cfg.mesh.sequence)  # as the loader pads
    return {k: np.zeros((batch, padded), np.int32) for k in BATCH_FIELDS}


def process_rows(sharding, global_shape: tuple[int, int]) -> slice:
    """The rows (sequences) of a [B, T] global batch that this process's devices hold: a contiguous block
    when ``data`` is split across processes (devices are laid out process by process), else all rows."""
    rows = [index[0] for index in sharding.addressable_devices_indices_map(global_shape).values()]
    return slice(min(r.start or 0 for r in rows), max(global_shape[0] if r.stop is None else r.stop for r in rows))


def _device_batch(local: dict, sharding, rows: slice, global_shape: tuple[int, int]) -> dict:
    """Global [B, T] arrays from ``local``, this process's ``rows`` of the global batch; every process places
    only its own devices' shards."""
    def put(v):
        v = np.asarray(v, np.int32)

        def shard(index):
            r = index[0]
            return v[slice((r.start or 0) - rows.start, (rows.stop if r.stop is None else r.stop) - rows.start),
                     index[1]]
        return jax.make_array_from_callback(global_shape, sharding, shard)
    return {k: put(v) for k, v in local.items()}


def placer(sharding):
    """``put(global_batch) -> device batch``: global [B, T] arrays of which every process places only the
    rows its devices hold (:func:`process_rows`). The loader builds the whole global batch, the same in every
    process; a loader that builds only a process's rows can replace the slice here. B and T may change
    from batch to batch (``data.curriculum``)."""
    def put(batch: dict) -> dict:
        shape = next(iter(batch.values())).shape
        rows = process_rows(sharding, shape)
        return _device_batch({k: v[rows] for k, v in batch.items()}, sharding, rows, shape)
    return put


def device_batches(loader, put):
    """Endless device batches from ``loader``'s global batches."""
    while True:
        yield put(next(loader))


def load_data(cfg: Config, tokenizer_dir: Path | None) -> Dataset:
    """The run's :class:`lcjax.data.Dataset`, tokenized with ``data.tokenizer`` or, for ``--init-from``, the
    tokenizer saved in ``tokenizer_dir`` (when it holds one)."""
    d, m = cfg.data, cfg.model
    what = " + ".join(s.source for s in d.mixture) or d.source
    print(f"lcjax: data {what}: loading (tokenized on first use, then cached)", flush=True)
    own = tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file()
    try:
        dataset = build_data(d, tokenizer_kind=str(tokenizer_dir) if own else None, vocab_size=m.vocab_size)
    except OSError as e:
        raise ValueError(f"data.cache_dir {d.cache_dir or '~/.cache/lcjax'}: {e.strerror or e}") from None
    print("\n".join(f"lcjax: {line}" for line in dataset.summary(d.seq_len)), flush=True)
    padded = config_lib.padded_seq_len(d.seq_len, cfg.attention.layout, cfg.mesh.sequence)
    if padded != d.seq_len:
        print(f"lcjax: data: each window padded from {d.seq_len:,} to {padded:,} tokens for attention.layout "
              f"{cfg.attention.layout} on mesh.sequence = {cfg.mesh.sequence} (a segment of its own, no loss)",
              flush=True)
    if dataset.tokenizer.vocab_size > m.vocab_size:
        raise ValueError(f"model.vocab_size {m.vocab_size} must be >= the tokenizer's {dataset.tokenizer.vocab_size}")
    return dataset


def eval_batches(cfg: Config, heldout: Dataset, put) -> list[dict]:
    """The fixed validation batches: the first ``eval.batches`` global batches of the held-out split (in a
    fixed shuffled order), placed on the devices. Raises ValueError when the split is too small."""
    d = cfg.data
    try:
        loader = heldout.loader(LoaderSpec(seq_len=d.seq_len, global_batch=d.global_batch, seed=0, prefetch=0,
                                           layout=cfg.attention.layout, num_shards=cfg.mesh.sequence,
                                           cross_document_attention=d.cross_document_attention,
                                           attention_window=cfg.attention.window))
    except ValueError as e:
        raise ValueError(f"eval.holdout {cfg.eval.holdout}: the held-out split is too small ({e})") from None
    batches = [put(next(loader)) for _ in range(cfg.eval.batches)]
    loader.close()
    return batches
