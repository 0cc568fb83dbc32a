"""Packing and the Grain loader: token stream → seq_len windows → shuffled global batches in layout order.

The stream is cut into consecutive windows of T+1 tokens that overlap by one: window w is
``stream[w·T : w·T + T + 1]``, its inputs the first T tokens and its labels the last T, so there are
(len − 1) // T windows and every token but the first is a label exactly once per epoch. A window may hold
the end of one document, whole documents and the start of another; each token carries its position and
segment (document) id inside the window, so attention masks never cross documents (unless asked to).

The order of windows is a Grain ``MapDataset`` shuffle with ``data.seed`` (a fresh permutation each epoch),
batched to the global batch; the mesh only enters in the last step, the layout permutation, so the same
seed gives the same global batches on every mesh.

Grain is imported inside the functions that use it: importing it imports JAX, which the rest of the data
pipeline (and a CLI that provisions devices before JAX starts) should not pay for or trigger.
"""

from __future__ import annotations

import functools

import numpy as np

from lcjax.ops.layout import check_divisible, permute

FIELDS = ("tokens", "labels", "positions", "segment_ids", "loss_mask")


def num_windows(num_tokens: int, seq_len: int) -> int:
    """How many windows of ``seq_len`` + 1 tokens (overlapping by one) a stream of ``num_tokens`` holds."""
    return max(num_tokens - 1, 0) // seq_len


def boundaries(doc_starts: np.ndarray, start: int, seq_len: int) -> np.ndarray:
    """bool [T+1]: entry i is True when stream offset ``start + i`` (0 < i <= T) begins a document.

    Entry 0 is always False: a window's first token starts its first segment whether or not a document
    starts there. ``doc_starts`` is the sorted int64 array of document start offsets.
    """
    lo, hi = np.searchsorted(doc_starts, [start, start + seq_len], side="right")
    is_start = np.zeros(seq_len + 1, bool)
    is_start[doc_starts[lo:hi] - start] = True
    return is_start


def packing(is_start: np.ndarray) -> dict[str, np.ndarray]:
    """Positions, segment ids and loss mask (int32 [T] each) of a window from its :func:`boundaries`.

    Segment ids count from 1 and grow at each document start; positions restart at 0 there; the loss mask
    is 0 where the label is the first token of the next document (the input is the EOS ending a document).
    """
    seq_len = len(is_start) - 1
    index = np.arange(seq_len)
    starts = is_start[:seq_len]
    return {
        "positions": (index - np.maximum.accumulate(np.where(starts, index, 0))).astype(np.int32),
        "segment_ids": (1 + np.cumsum(starts)).astype(np.int32),
        "loss_mask": (~is_start[1:]).astype(np.int32),
    }


def unpacked(seq_len: int) -> dict[str, np.ndarray]:
    """Positions 0…T−1, segment ids all 1 and loss mask all 1 (int32 [T]): one sequence, no documents."""
    return {"positions": np.arange(seq_len, dtype=np.int32),
            "segment_ids": np.ones(seq_len, np.int32),
            "loss_mask": np.ones(seq_len, np.int32)}


def window(stream: np.ndarray, doc_starts: np.ndarray | None, index: int, seq_len: int,
           cross_document_attention: bool = False) -> dict[str, np.ndarray]:
    """Window ``index`` of the stream in natural order: a dict of int32 [T] arrays named as :data:`FIELDS`.

    ``labels`` are ``tokens`` shifted by one. With ``cross_document_attention`` or without ``doc_starts``
    the window is one sequence (:func:`unpacked`), else documents are separated (:func:`packing`).
    """
    start = index * seq_len
    chunk = np.asarray(stream[start:start + seq_len + 1], dtype=np.int32)
    if cross_document_attention or doc_starts is None:
        extra = unpacked(seq_len)
    else:
        extra = packing(boundaries(doc_starts, start, seq_len))
    return {"tokens": chunk[:-1], "labels": chunk[1:], **extra}


def lay_out(batch: dict[str, np.ndarray], layout: str, num_shards: int) -> dict[str, np.ndarray]:
    """Every [B, T] array of ``batch`` permuted along T from natural order into ``layout`` order."""
    return {name: permute(array, layout, num_shards, axis=1) for name, array in batch.items()}


class Loader:
    """An endless iterator of global batches; its position can be saved and restored.

    ``next(loader)`` returns a dict of int32 numpy arrays [global_batch, seq_len] named as :data:`FIELDS`,
    in layout order. ``get_state()`` returns a JSON-serialisable dict; ``set_state(state)`` on a loader
    made with the same corpus, seq_len, global_batch and seed continues exactly where the saved one was
    (the layout and number of shards may differ).
    """

    def __init__(self, dataset: "grain.MapDataset", identity: dict, prefetch: int):
        import grain

        options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
        self._identity = identity
        self._iterator = iter(dataset.to_iter_dataset(options))

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict:
        """The position of the loader: Grain's iterator state plus what the loader was built with."""
        return {"grain": self._iterator.get_state(), **self._identity}

    def set_state(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`get_state`). Raises ValueError if it belongs to other data."""
        for key, value in self._identity.items():
            if state.get(key) != value:
                raise ValueError(f"data loader state has {key} {state.get(key)!r} but this run has {value!r}: "
                                 f"the data iterator cannot be restored")
        self._iterator.set_state(state["grain"])

    def close(self) -> None:
        """Stop the prefetch threads."""
        self._iterator.close()


def make_loader(tokens: np.ndarray, *, seq_len: int, global_batch: int, seed: int, layout: str,
                num_shards: int, cross_document_attention: bool = False,
                doc_starts: np.ndarray | None = None, prefetch: int = 2) -> Loader:
    """A :class:`Loader` of shuffled, packed global batches from a token stream.

    Args:
      tokens: [num_tokens] integer token stream (a memmap is fine; it is read lazily).
      seq_len: T, tokens per sequence (``data.seq_len``).
      global_batch: B, sequences per batch (``data.global_batch``).
      seed: ``data.seed`` in [0, 2**32); epoch e is shuffled with seed + e.
      layout, num_shards: the sequence layout (contiguous, zigzag, striped) and ``mesh.sequence``.
      cross_document_attention: if True positions run 0…T−1 and segment ids are 1 across whole windows.
      doc_starts: int64 [num_docs] sorted document start offsets; None means one long document.
      prefetch: batches computed ahead by as many background threads (0: none).

    Batches span epochs without a gap; the loader never ends. Raises ValueError (one line naming the
    data field) when seq_len or global_batch is below 1, the layout cannot split seq_len on num_shards,
    the seed is out of range, or the corpus has fewer windows than one global batch.
    """
    import grain

    windows = _check(len(tokens), seq_len, global_batch, seed, layout, num_shards)
    make_window = functools.partial(window, tokens, doc_starts, seq_len=seq_len,
                                    cross_document_attention=cross_document_attention)
    dataset = (grain.MapDataset.range(windows)
               .shuffle(seed=seed)
               .repeat(None)
               .map(make_window)
               .batch(global_batch, drop_remainder=True)
               .map(functools.partial(lay_out, layout=layout, num_shards=num_shards)))
    identity = {"seed": seed, "seq_len": seq_len, "global_batch": global_batch, "num_windows": windows}
    return Loader(dataset, identity, prefetch)


def _check(num_tokens: int, seq_len: int, global_batch: int, seed: int, layout: str, num_shards: int) -> int:
    """Validate the loader arguments; return the number of windows."""
    for name, value in (("data.seq_len", seq_len), ("data.global_batch", global_batch)):
        if value < 1:
            raise ValueError(f"{name} {value} must be >= 1")
    if not 0 <= seed < 2**32:
        raise ValueError(f"data.seed {seed} must be in [0, 2**32)")
    check_divisible(seq_len, layout, num_shards)
    windows = num_windows(num_tokens, seq_len)
    if windows < global_batch:
        raise ValueError(
            f"data.global_batch {global_batch} needs {global_batch} windows of data.seq_len {seq_len} + 1 tokens, "
            f"but the corpus of {num_tokens} tokens has only {windows}; use a smaller data.seq_len or "
            f"data.global_batch, or a larger data.source")
    return windows
