"""Packing and the Grain loader: token stream → seq_len windows → shuffled global batches in layout order.

The stream is cut into consecutive windows of T+1 tokens that overlap by one: window w is
``stream[w·T : w·T + T + 1]``, its inputs the first T tokens and its labels the last T, so there are
(len − 1) // T windows and every token but the first is a label exactly once per epoch; the only tokens
an epoch leaves out of the labels are those of the final partial window (:func:`epoch_summary`). The
stream is never padded; a window is, at its end, only to the length its layout needs on the mesh
(:func:`pad_window`; T itself may be any length). A window may hold the end of one document, whole
documents and the start of another; each token carries its position and segment (document) id inside the
window, so attention masks never cross documents (unless asked to).

The pipeline is a Grain ``MapDataset``: window indices shuffled with ``data.seed`` (a fresh permutation each
epoch) → batched to the global batch → :class:`Rows` (this process's rows, packed) → :class:`LayOut` (each
window padded to what the layout needs, :func:`pad_window`, and permuted into it, every field alike);
the mesh only enters in the last step, so the same seed gives the same global batches on every mesh. The
iterator position is the number of global batches delivered: restoring slices the ``MapDataset`` there,
so a resumed loader continues exactly, whatever threads, worker processes or process count either side
used.

Grain is imported inside the functions that use it: importing it imports JAX, which the rest of the data
pipeline (and a CLI that provisions devices before JAX starts) should not pay for or trigger.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lcjax.config import balance_chunk, padded_seq_len
from lcjax.data.balance import balanced_permutation, relabel_documents
from lcjax.ops.layout import LAYOUTS, permutation

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


def pad_window(window: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """A natural-order window (int32 [T] arrays named as :data:`FIELDS`) padded at its end to ``length``.

    The padding is its own segment (id one above the window's largest, so no real token sees it and it
    sees no real token) with positions 0, 1, … and no loss (``loss_mask`` 0, ``tokens`` and ``labels``
    0): the loss, a mean over ``loss_mask``, is the unpadded window's.
    """
    extra = length - len(window["tokens"])
    if extra <= 0:
        return window
    fill = {"positions": np.arange(extra), "segment_ids": np.full(extra, window["segment_ids"].max() + 1)}
    return {name: np.concatenate([x, fill.get(name, np.zeros(extra, x.dtype)).astype(x.dtype)])
            for name, x in window.items()}


def order_window(window: dict[str, np.ndarray], layout: str, num_shards: int, *, chunk: int,
                 attention_window: int | None = None) -> np.ndarray:
    """int64 [T]: the permutation (``permuted = x[order]``) of one padded natural-order window into
    ``layout``: the fixed one of lcjax.ops.layout, or for ``balanced`` chunks of ``chunk`` tokens
    dispatched by their causal + document + ``attention_window`` work (lcjax.data.balance)."""
    t = len(window["positions"])
    if layout != "balanced" or num_shards == 1:
        return permutation(t, layout, num_shards)
    return balanced_permutation(window["positions"], window["segment_ids"], num_shards, chunk=chunk,
                                window=attention_window)


class LayOut:
    """The layout as one Grain map transform on a batch of natural-order windows (dict of [B, T] arrays:
    tokens, labels, positions, segment ids, loss mask): each row padded to
    :func:`lcjax.config.padded_seq_len` (:func:`pad_window`), then permuted along T into ``layout`` order
    for ``num_shards`` sequence shards (``attention.layout``, ``mesh.sequence``), all fields alike;
    ``balanced`` decides each row's order from its own documents and ``attention_window``, after renumbering
    the row's segment ids (lcjax.data.balance.relabel_documents: same documents, same mask)."""

    def __init__(self, layout: str, num_shards: int, attention_window: int | None = None):
        self.layout, self.num_shards, self.attention_window = layout, num_shards, attention_window

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seq_len = batch["tokens"].shape[1]
        padded = padded_seq_len(seq_len, self.layout, self.num_shards)
        chunk = balance_chunk(seq_len, self.num_shards)
        rows = []
        for b in range(batch["tokens"].shape[0]):
            row = pad_window({name: array[b] for name, array in batch.items()}, padded)
            if self.layout == "balanced" and self.num_shards > 1:  # documents sharing a chunk: consecutive ids
                row = {**row, "segment_ids": relabel_documents(row["segment_ids"], chunk)}
            order = order_window(row, self.layout, self.num_shards, chunk=chunk,
                                 attention_window=self.attention_window)
            rows.append({name: x[order] for name, x in row.items()})
        return {name: np.stack([row[name] for row in rows]) for name in batch}


def lay_out(batch: dict[str, np.ndarray], layout: str, num_shards: int,
            attention_window: int | None = None) -> dict[str, np.ndarray]:
    """Every [B, T] array of ``batch`` padded and permuted from natural order into ``layout`` (:class:`LayOut`)."""
    return LayOut(layout, num_shards, attention_window)(batch)


def windows_of_lengths(doc_lengths, seq_len: int) -> list[dict[str, np.ndarray]]:
    """The packing of documents of ``doc_lengths`` tokens, as the loader packs a corpus: each document
    followed by its EOS in one stream (lcjax.data.tokens), cut into windows of T + 1 tokens overlapping by
    one (:func:`window`). Returns each window's ``positions``, ``segment_ids`` and ``loss_mask`` (int32 [T],
    natural order); the final partial window is left out, as the loader leaves it."""
    lengths = np.asarray(doc_lengths, np.int64) + 1
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return [packing(boundaries(starts, w * seq_len, seq_len)) for w in range(num_windows(int(lengths.sum()), seq_len))]


class Rows:
    """Grain map transform: an int array of global-batch window indices → this process's rows, packed.

    Holds the token stream; a memmap travels to worker processes as its file name and is reopened there
    (pickling never copies the corpus).
    """

    def __init__(self, stream, doc_starts, seq_len: int, cross_document_attention: bool, rows: slice):
        self.stream, self.doc_starts, self.seq_len = stream, doc_starts, seq_len
        self.cross, self.rows = cross_document_attention, rows

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        windows = [window(self.stream, self.doc_starts, int(i), self.seq_len, self.cross)
                   for i in np.asarray(indices)[self.rows]]
        return {name: np.stack([w[name] for w in windows]) for name in FIELDS}

    def __getstate__(self):
        state = dict(self.__dict__)
        if isinstance(self.stream, np.memmap) and self.stream.filename:
            state["stream"] = ("memmap", self.stream.filename, self.stream.dtype.str, len(self.stream),
                               self.stream.offset)
        return state

    def __setstate__(self, state):
        if isinstance(state["stream"], tuple):
            _, name, dtype, length, offset = state["stream"]
            state["stream"] = np.memmap(name, dtype=dtype, mode="r", shape=(length,), offset=offset)
        self.__dict__.update(state)


class Loader:
    """An endless iterator of batches; its position can be saved and restored exactly.

    ``next(loader)`` returns a dict of int32 numpy arrays [global_batch / process_count, padded seq_len]
    (lcjax.config.padded_seq_len) named as :data:`FIELDS`, in layout order: this process's rows of the next
    global batch. ``get_state()`` returns a flat dict of ints (JSON-serialisable; the trainer keeps it as
    ``TrainState.data_state`` in the Orbax checkpoint): ``batch``, the number of global batches delivered,
    plus what identifies the data.
    ``set_state(state)`` on a loader made from the same token stream, seq_len, global_batch and seed
    continues with exactly the next batch, whatever the layout, number of shards, worker processes,
    prefetch depth or process count of either loader.
    """

    def __init__(self, dataset: "grain.MapDataset", identity: dict, *, prefetch: int, workers: int):
        self._dataset, self._identity = dataset, identity
        self._prefetch, self._workers = prefetch, workers
        self._next = 0
        self._iterator = None  # started by the first next(): a restore before it starts nothing twice

    def _start(self, batch: int):
        import grain

        options = grain.ReadOptions(num_threads=self._prefetch, prefetch_buffer_size=self._prefetch)
        dataset = self._dataset[batch:].to_iter_dataset(options)
        if self._workers:
            _absl_flags_parsed()
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._workers, per_worker_buffer_size=max(self._prefetch, 1)))
        return iter(dataset)

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start(self._next)
        batch = next(self._iterator)
        self._next += 1
        return batch

    def get_state(self) -> dict:
        """The position of the loader: ``{"batch": global batches delivered, **identity}`` (all ints)."""
        return {"batch": self._next, **self._identity}

    def set_state(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`get_state`). Raises ValueError if it belongs to other data."""
        for key, value in self._identity.items():
            if key in state and state[key] != value:
                raise ValueError(_mismatch(key, state[key], value))
        missing = [key for key in self._identity if key not in state]
        if missing:
            raise ValueError(f"data loader state lacks {', '.join(missing)}: the data iterator cannot be restored")
        self.close()
        self._next = int(state["batch"])

    def close(self) -> None:
        """Stop the prefetch threads and worker processes (the next ``next`` starts them again)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
        self._iterator = None


def _mismatch(key: str, saved, now) -> str:
    what = {"vocab_size": "the tokenizer's vocabulary size (data.tokenizer)",
            "stream": "the token stream id (data.source or data.tokenizer changed)",
            "num_windows": "the number of windows (data.source or data.tokenizer changed)"}.get(key, f"data.{key}")
    return (f"{what}: the checkpoint's data state has {saved!r} but this run has {now!r}; "
            f"the data iterator cannot be restored")


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; mark them parsed when the host program does not use absl."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def stream_id(key: str) -> int:
    """A hex cache key (e.g. :attr:`lcjax.data.Dataset.key`) as a non-negative int63 for the loader state."""
    return int(key[:15], 16)


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    """What a loader delivers and how: the ``data.*``, ``attention.*`` and ``mesh.sequence`` settings it
    reads (the stream itself comes separately: :func:`make_loader`, :meth:`lcjax.data.Dataset.loader`).

    Fields:
      seq_len: T, tokens per sequence (``data.seq_len``).
      global_batch: B, sequences per global batch (``data.global_batch``).
      seed: ``data.seed`` in [0, 2**32); each epoch is a fresh permutation of the windows drawn from it.
      layout, num_shards: the sequence layout (contiguous, zigzag, striped, balanced) and ``mesh.sequence``.
        Batches are [B, padded T] with T padded to what the layout needs (lcjax.config.padded_seq_len;
        :func:`pad_window`: padding sees and is seen by no real token and has no loss).
      attention_window: ``attention.window`` (None: none), weighs the balanced layout's chunks.
      cross_document_attention: if True positions run 0…T−1 and segment ids are 1 across whole windows.
      passkey_fraction, passkey_synthetic: the PassKey training mixture
        (:class:`lcjax.data.passkey.PassKeyMix`, applied in natural order before the layout; its draws
        depend on the seed and the global batch index only); needs the tokenizer when the fraction > 0.
      prefetch: batches computed ahead (0: none); with ``workers`` = 0 by as many threads, else per worker.
      workers: Grain worker processes (``data.workers``); 0 computes batches in this process's threads.
      process_index, process_count: per-process slices for multi-host runs. The global batch is the same
        whatever the process count; process i of n gets its contiguous rows [i·B/n, (i+1)·B/n) of every
        global batch (the batch axis is sharded over ``data`` first, in mesh order, so process i feeds the
        i-th block of data-parallel rows). Processes that share rows (a sequence axis spanning hosts)
        pass the same index, and n is then the number of distinct row blocks. B must be divisible by n.
    """

    seq_len: int
    global_batch: int
    seed: int
    layout: str
    num_shards: int
    attention_window: int | None = None
    cross_document_attention: bool = False
    passkey_fraction: float = 0.0
    passkey_synthetic: float = 0.5
    prefetch: int = 2
    workers: int = 0
    process_index: int = 0
    process_count: int = 1


def make_loader(tokens: np.ndarray, spec: LoaderSpec, *, doc_starts: np.ndarray | None = None,
                stream: int | None = None, vocab_size: int | None = None, tokenizer=None) -> Loader:
    """A :class:`Loader` of shuffled, packed batches from a token stream, as ``spec`` asks.

    Args:
      tokens: [num_tokens] integer token stream (a memmap is fine; it is read lazily).
      spec: the batches' shape, order and mixture and how they are produced (:class:`LoaderSpec`).
      doc_starts: int64 [num_docs] sorted document start offsets; None means one long document.
      stream, vocab_size: ints identifying the token stream and tokenizer, checked by ``set_state`` (so a
        checkpoint of another corpus or tokenizer is refused with a clear error); None leaves them out.
      tokenizer: the tokenizer, needed when ``spec.passkey_fraction`` > 0.

    Batches span epochs without a gap; the loader never ends. Raises ValueError (one line naming the
    data field) when seq_len or global_batch is below 1, the layout is unknown, the seed is out of range,
    the process slice is impossible, or the corpus has fewer windows than one global batch.
    """
    import grain

    windows = _check(len(tokens), spec.seq_len, spec.global_batch, spec.seed, spec.layout, spec.num_shards)
    if spec.workers < 0 or spec.prefetch < 0:
        raise ValueError(f"data.workers {spec.workers} and prefetch {spec.prefetch} must be >= 0")
    index, count = spec.process_index, spec.process_count
    if count < 1 or not 0 <= index < count or spec.global_batch % count:
        raise ValueError(f"data.global_batch {spec.global_batch} cannot be split into {count} per-process "
                         f"slices for process {index} (B must be divisible by the process count)")
    rows = spec.global_batch // count
    rows_of = Rows(tokens, doc_starts, spec.seq_len, spec.cross_document_attention,
                   slice(index * rows, (index + 1) * rows))
    dataset = (grain.MapDataset.range(windows)
               .shuffle(seed=spec.seed)
               .repeat(None)
               .batch(spec.global_batch, drop_remainder=True)
               .map(rows_of))
    if spec.passkey_fraction > 0:
        dataset = dataset.map_with_index(_passkey_mix(tokenizer, spec.seq_len, spec.passkey_fraction,
                                                      spec.passkey_synthetic, spec.seed, index * rows))
    dataset = dataset.map(LayOut(spec.layout, spec.num_shards, spec.attention_window))
    identity = {"seed": spec.seed, "seq_len": spec.seq_len, "global_batch": spec.global_batch, "num_windows": windows}
    identity.update({k: v for k, v in (("stream", stream), ("vocab_size", vocab_size)) if v is not None})
    return Loader(dataset, identity, prefetch=spec.prefetch, workers=spec.workers)


def _passkey_mix(tokenizer, seq_len: int, fraction: float, synthetic: float, seed: int, row_offset: int):
    from lcjax.data.passkey import END, PassKeyMix, overhead

    if tokenizer is None:
        raise ValueError("data.passkey_fraction > 0 needs the tokenizer")
    mix = PassKeyMix(tokenizer, fraction=fraction, seed=seed, synthetic=synthetic, row_offset=row_offset)
    need = overhead(mix.encode, task=False, end=END)
    if need > seq_len:
        raise ValueError(f"data.seq_len {seq_len} is too short for PassKey examples (data.passkey_fraction): "
                         f"they need more than {need} tokens")
    return mix


def epoch_summary(num_tokens: int, seq_len: int, num_docs: int | None = None) -> str:
    """One line on what packing costs: windows per epoch and the tokens of the final partial window.

    Windows are cut from one token stream, so no padding is ever added; the only tokens an epoch does not
    train on as labels are the (num_tokens − 1) mod T at the end of the stream (the final partial window).
    """
    windows = num_windows(num_tokens, seq_len)
    tail = num_tokens - 1 - windows * seq_len if num_tokens else 0
    docs = f" from {num_docs:,} documents" if num_docs is not None else ""
    share = 100 * tail / max(num_tokens, 1)
    return (f"{windows:,} windows of {seq_len:,} tokens per epoch{docs}; no padding between documents; "
            f"the final partial window leaves {tail:,} tokens ({share:.3f}%) of each epoch out of the labels")


def _check(num_tokens: int, seq_len: int, global_batch: int, seed: int, layout: str, num_shards: int) -> int:
    """Validate the loader arguments; return the number of windows."""
    for name, value in (("data.seq_len", seq_len), ("data.global_batch", global_batch)):
        if value < 1:
            raise ValueError(f"{name} {value} must be >= 1")
    if not 0 <= seed < 2**32:
        raise ValueError(f"data.seed {seed} must be in [0, 2**32)")
    if layout not in LAYOUTS:
        raise ValueError(f"attention.layout {layout!r} must be one of {', '.join(LAYOUTS)}")
    if num_shards < 1:
        raise ValueError(f"mesh.sequence {num_shards} must be >= 1")
    windows = num_windows(num_tokens, seq_len)
    if windows < global_batch:
        raise ValueError(
            f"data.global_batch {global_batch} needs {global_batch} windows of data.seq_len {seq_len} + 1 tokens, "
            f"but the corpus of {num_tokens} tokens has only {windows}; use a smaller data.seq_len or "
            f"data.global_batch, or a larger data.source")
    return windows
