"""Masked attention work per sequence shard, measured and balanced on the host (numpy only).

A packed window holds documents of very different lengths; attention sees key j from query i when they
share a segment id, (causal) pos_j ≤ pos_i and (window W) pos_i − pos_j < W (docs/design.md). How much of that
work each of the P sequence shards computes depends on the layout (which tokens a shard holds) and on the
kernel's tiles: a kernel computes a whole (query tile × key tile) whenever the tiles' position and segment
ranges do not prove it empty (lcjax.kernels.flash_attention.tiling, ``maybe``), so a tile is the unit of
work and a mask inside it is free only where the ranges exclude the whole tile.

- :func:`exact_area`: the number of visible (query, key) pairs of a window — the work no schedule avoids.
- :func:`shard_areas`: the tile-level area each shard computes for a window in some token order, for the
  all-gather and ring strategies (each shard's query tiles against every shard's key tiles) and for
  Ulysses (every shard computes the whole gathered sequence for 1/P of the heads).
- :func:`balance`: max over shards of the computed area ÷ (exact area ÷ P); 1.0 means no shard idles and
  no masked tile is computed. Striped layouts spread work evenly but their tiles mix distant positions, so
  few tiles are skipped; zigzag skips well but, with documents, leaves shards idle.
- :func:`balanced_permutation`: the ``balanced`` layout. The window's segment ids are renumbered
  (:func:`relabel_documents`) so the documents sharing a chunk are consecutive; the window (in natural
  order) is cut into chunks of C tokens (lcjax.config.balance_chunk: a kernel tile, 128), whole chunks of
  one document where it can, the documents' remainders packed into the rest, each chunk filled exactly
  by whole remainders where they allow (:func:`chunks_of`, :func:`remainder_order`); each chunk's cost is the tile-level area of its queries; chunks go to shards
  greedily, largest first, each to the least-loaded shard that still has room (a min-heap over shard
  loads; every shard takes T/(P·C) chunks). This is the longest-processing-time rule (Graham 1969), whose
  largest overshoot is one chunk's cost; MagiAttention (2025) also balances masked attention across ranks
  with a dispatch solver.
- :func:`area_lower_bound`: the least tile-level area any order of the window can give (each tile
  against itself, less what its documents can make visible there): balance ≥ that ÷ the exact area.
- :func:`recv_bytes`: bytes one shard receives over ``sequence`` per attention forward for each strategy;
  :func:`needed_kv_tokens`: the remote keys a shard needs at least (what a send plan could trim to).

The loader's side (padding, the per-window permutation) is lcjax.data.loader.order_window.

Arrays: positions, segment_ids int [T] (one window) in the order given; ``real`` bool [T] marks tokens that
are not loader padding (padding is excluded from the exact area but computed like any token).
"""

from __future__ import annotations

import heapq

import numpy as np

IMPLS = ("ring", "allgather", "ulysses")


def exact_area(positions: np.ndarray, segment_ids: np.ndarray, *, causal: bool = True,
               window: int | None = None, real: np.ndarray | None = None) -> int:
    """Visible (query, key) pairs among the ``real`` tokens of one window (any order, any positions).

    Counted from the tokens sorted by (segment, position), O(T log T): for each query the keys of its
    segment with pos_q − W < pos_k ≤ pos_q (causal), or all keys of its segment (not causal).
    """
    pos, seg = np.asarray(positions, np.int64), np.asarray(segment_ids, np.int64)
    if real is not None:
        pos, seg = pos[np.asarray(real, bool)], seg[np.asarray(real, bool)]
    if not len(pos):
        return 0
    span = int(pos.max() - pos.min()) + 2 + (window or 0)
    key = np.sort((seg - seg.min()) * span + (pos - pos.min()) + (window or 0))
    query = (seg - seg.min()) * span + (pos - pos.min()) + (window or 0)
    first = (seg - seg.min()) * span  # below every key of the segment, above every key of the one before
    if not causal:
        return int(np.sum(np.searchsorted(key, first + span, side="left") - np.searchsorted(key, first)))
    lo = (np.searchsorted(key, first, side="left") if window is None
          else np.searchsorted(key, query - window, side="right"))
    return int(np.sum(np.searchsorted(key, query, side="right") - lo))


def tile_stats(positions: np.ndarray, segment_ids: np.ndarray, starts: np.ndarray, stops: np.ndarray):
    """(pos_min, pos_max, seg_min, seg_max, size), int64 [n_tiles] each, of the tiles [starts, stops)."""
    pos, seg = np.asarray(positions, np.int64), np.asarray(segment_ids, np.int64)
    return (np.minimum.reduceat(pos, starts), np.maximum.reduceat(pos, starts),
            np.minimum.reduceat(seg, starts), np.maximum.reduceat(seg, starts), stops - starts)


def tile_maybe(q, k, *, causal: bool = True, window: int | None = None) -> np.ndarray:
    """bool [n_q, n_k]: some query of tile i may see some key of tile j, from :func:`tile_stats` of the
    query and key tiles — the range rule of lcjax.kernels.flash_attention.tiling.tile_visibility."""
    qc = lambda x: x[:, None]
    kc = lambda x: x[None, :]
    maybe = (kc(k[2]) <= qc(q[3])) & (kc(k[3]) >= qc(q[2]))
    if causal:
        maybe &= kc(k[0]) <= qc(q[1])
    if window is not None:
        maybe &= kc(k[1]) > qc(q[0]) - window
    return maybe


def tiles_of(length: int, num_shards: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of the kernel tiles when each of ``num_shards`` equal parts of ``length`` tokens is
    tiled from its own start by ``tile`` tokens (the last tile of a part may be shorter)."""
    local = length // num_shards
    starts = np.concatenate([np.arange(r * local, (r + 1) * local, tile) for r in range(num_shards)])
    stops = np.minimum(starts + tile, (starts // local + 1) * local)
    return starts, stops


def shard_areas(positions: np.ndarray, segment_ids: np.ndarray, num_shards: int, *, impl: str = "ring",
                tile: int = 128, causal: bool = True, window: int | None = None) -> np.ndarray:
    """Tile-level query–key area each shard computes, float64 [P], for one window in layout order.

    positions, segment_ids: int [T] in layout order, T divisible by P (shard r holds [r·T/P, (r+1)·T/P)).
    ``ring`` and ``allgather``: shard r's query tiles (tiled within its T/P tokens) against every key tile
    of every shard. ``ulysses``: the gathered sequence tiled as one, 1/P of it per shard (the head split).
    Raises ValueError for an unknown impl or T not divisible by P.
    """
    t = len(positions)
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} must be one of {', '.join(IMPLS)}")
    if t % num_shards:
        raise ValueError(f"window length {t} must be divisible by the {num_shards} shards")
    parts = 1 if impl == "ulysses" else num_shards
    starts, stops = tiles_of(t, parts, tile)
    stats = tile_stats(positions, segment_ids, starts, stops)
    size = stats[4].astype(np.float64)
    per_tile = (tile_maybe(stats, stats, causal=causal, window=window) @ size) * size
    if impl == "ulysses":
        return np.full(num_shards, per_tile.sum() / num_shards)
    return np.bincount(starts // (t // num_shards), weights=per_tile, minlength=num_shards)


def balance(positions: np.ndarray, segment_ids: np.ndarray, num_shards: int, *, impl: str = "ring",
            tile: int = 128, causal: bool = True, window: int | None = None,
            real: np.ndarray | None = None) -> float:
    """max over shards of :func:`shard_areas` ÷ (:func:`exact_area` ÷ P) for one window in layout order
    (1.0: perfect; inf when nothing is visible)."""
    exact = exact_area(positions, segment_ids, causal=causal, window=window, real=real)
    areas = shard_areas(positions, segment_ids, num_shards, impl=impl, tile=tile, causal=causal, window=window)
    return float(areas.max() / (exact / num_shards)) if exact else float("inf")


def area_lower_bound(positions: np.ndarray, segment_ids: np.ndarray, num_shards: int, *, impl: str = "ring",
                     tile: int = 128, causal: bool = True, window: int | None = None,
                     real: np.ndarray | None = None) -> float:
    """The least total tile-level area (summed over shards, :func:`shard_areas`) that any token order of
    the window can give: a bound on every layout, balanced or not. float.

    Every query tile is computed against the key tile of its own tokens (each token sees itself), an
    area of (tile size)² per tile whatever the order; among those pairs a document contributes at most
    n(n+1)/2 visible ones for its n tokens in the tile (causal, distinct positions; n² without causal),
    so at most q·C(C+1)/2 + r(r+1)/2 in all for L = qC + r tokens (the convex sum is largest for the
    fewest, fullest pieces). Hence area ≥ exact + Σ_tiles size² − Σ_documents that maximum. With
    nested block_q ≠ block_k tiles the same holds with C = max(block_q, block_k). Padding (``real``
    False) counts as area but never as visible. Raises ValueError when two real tokens of one segment
    share a position (the causal count assumes distinct positions).
    """
    pos, seg = np.asarray(positions, np.int64), np.asarray(segment_ids, np.int64)
    keep = np.ones(len(pos), bool) if real is None else np.asarray(real, bool)
    exact = exact_area(pos, seg, causal=causal, window=window, real=keep)
    parts = 1 if impl == "ulysses" else num_shards
    starts, stops = tiles_of(len(pos), parts, tile)
    diagonal = float(np.sum((stops - starts).astype(np.float64) ** 2))
    ps = np.stack([seg[keep], pos[keep]])
    if causal and ps.shape[1] and np.any(np.all(np.diff(ps[:, np.lexsort(ps[::-1])], axis=1) == 0, axis=0)):
        raise ValueError("area_lower_bound: two real tokens of one segment share a position")
    _, count = np.unique(seg[keep], return_counts=True)
    q, r = (count // tile).astype(np.float64), (count % tile).astype(np.float64)
    most = (q * tile * (tile + 1) / 2 + r * (r + 1) / 2) if causal else (q * tile * tile + r * r)
    return float(exact + diagonal - most.sum())


def _runs(segment_ids: np.ndarray):
    """(run index of each token, start, length) of the runs of equal ids of ``segment_ids`` [T]."""
    seg = np.asarray(segment_ids)
    new = np.r_[True, seg[1:] != seg[:-1]]
    start = np.flatnonzero(new)
    return np.cumsum(new) - 1, start, np.diff(np.r_[start, len(seg)])


def remainder_order(segment_ids: np.ndarray, chunk: int) -> np.ndarray:
    """int64 [n_runs]: the order in which the runs of equal segment ids (documents, padding) of a window
    give their first L mod C tokens to the shared chunks (:func:`chunks_of`); runs with L mod C = 0 last.

    Greedy over the stream of shared chunks: while the current chunk has room for the whole remainder of
    a run that also has whole chunks, one of those goes next (:func:`_fitting_remainder`: one that fills
    the room exactly, else one whose leftover room another such remainder fills exactly, else the one
    with the most whole chunks, then the longest remainder), so it shares one chunk only; otherwise the next run without whole chunks (window order) goes
    next and may straddle two chunks; when none is left, the run with the fewest whole chunks. A
    remainder in a shared chunk is computed against every whole chunk of its document (the tile ranges
    cannot exclude them), once per shared chunk it lies in: splitting a document of q whole chunks costs
    q tiles, so the splits fall on the shortest documents. O(n_runs · n_long) for n_long runs with whole
    chunks (≤ T/C).
    """
    _, _, length = _runs(segment_ids)
    q, r = length // chunk, length % chunk
    long = np.flatnonzero((r > 0) & (q > 0))
    long = long[np.lexsort((-r[long], -q[long]))]  # most whole chunks, then longest remainder, first
    lr = r[long]
    left = np.ones(len(long), bool)
    short = np.flatnonzero((r > 0) & (q == 0)).tolist()[::-1]  # a stack: window order
    order, fill = [], 0
    while left.any() or short:
        pick = _fitting_remainder(lr, left, chunk - fill)
        if pick is None and short:
            order.append(short.pop())
            fill = (fill + int(r[order[-1]])) % chunk
            continue
        if pick is None:
            pick = np.flatnonzero(left)[-1]  # the fewest whole chunks
        left[pick] = False
        order.append(long[pick])
        fill = (fill + int(lr[pick])) % chunk
    return np.array(order + np.flatnonzero(r == 0).tolist(), np.int64)


def _fitting_remainder(lr: np.ndarray, left: np.ndarray, room: int) -> int | None:
    """Index into ``lr`` (remainders of runs with whole chunks, most whole chunks first) of the next one to
    put in a shared chunk with ``room`` tokens free, or None when none of those still ``left`` fits.

    The first (most whole chunks) of: a remainder that fills the room exactly; one that leaves a room
    another remainder left fills exactly (so the next pick closes the chunk); any that fits. Exact fills
    end a shared chunk on a document boundary, so no document straddles two shared chunks there.
    """
    fits = np.flatnonzero(left & (lr <= room))
    if not len(fits):
        return None
    exact = fits[lr[fits] == room]
    if len(exact):
        return int(exact[0])
    count = np.bincount(lr[left], minlength=room + 1)
    need = room - lr[fits]
    pair = count[need] - (need == lr[fits]) > 0
    return int(fits[np.argmax(pair)]) if pair.any() else int(fits[0])


def relabel_documents(segment_ids: np.ndarray, chunk: int) -> np.ndarray:
    """int32 [T]: the window's segment ids renumbered 1, 2, … in :func:`remainder_order` (natural order
    kept; equal ids stay equal, different ids stay different, so the attention mask is unchanged).

    A kernel skips a tile pair only when the tiles' segment ranges (min..max) do not overlap; renumbering
    makes the documents that share a chunk consecutive, so a shared chunk's range holds only its own
    documents. The balanced layout applies it before :func:`balanced_permutation` (the loader does).
    A segment id used by several runs takes the rank of its earliest run in that order.
    """
    seg = np.asarray(segment_ids)
    if not len(seg):
        return seg.astype(np.int32)
    run, start, _ = _runs(seg)
    rank = np.empty(len(start), np.int64)
    rank[remainder_order(seg, chunk)] = np.arange(len(start))
    values, inverse = np.unique(seg[start], return_inverse=True)
    first = np.full(len(values), len(start), np.int64)
    np.minimum.at(first, inverse, rank)  # a reused id: its earliest run
    label = np.empty(len(values), np.int64)
    label[np.argsort(first, kind="stable")] = np.arange(1, len(values) + 1)
    return label[inverse][run].astype(np.int32)


def chunks_of(segment_ids: np.ndarray, chunk: int) -> np.ndarray:
    """int64 [T/C, C]: the natural-order token indices of each chunk of a window cut for the balanced layout.

    Every run of equal segment ids (a document, or the padding) is cut from its end into whole chunks of
    C tokens, each holding one document only (so its tile's ranges are tight); the first L mod C tokens of
    each run are concatenated in :func:`remainder_order` and cut into the remaining (shared) chunks.
    Cutting documents at their own starts rather than at multiples of C halves the tiles that straddle
    two documents — such a tile is computed against every tile of both. T must be divisible by C.
    """
    seg = np.asarray(segment_ids)
    t = len(seg)
    run, start, length = _runs(seg)
    head = length % chunk  # tokens of each run before its whole chunks
    mixed = np.arange(t) - start[run] < head[run]
    index = np.arange(t)
    order = remainder_order(seg, chunk)
    shared = np.concatenate([start[i] + np.arange(head[i]) for i in order] + [np.zeros(0, np.int64)])
    return np.concatenate([index[~mixed], shared]).reshape(-1, chunk)


def chunk_costs(positions: np.ndarray, segment_ids: np.ndarray, chunks: np.ndarray, *, causal: bool = True,
                window: int | None = None) -> np.ndarray:
    """float64 [n]: the tile-level area of each chunk's queries against every chunk, for ``chunks`` (int
    [n, C] token indices, :func:`chunks_of`) of one window: C² × the chunks it may see (:func:`tile_maybe`'s
    rule, on int32 ranges)."""
    pos, seg = np.asarray(positions, np.int32)[chunks], np.asarray(segment_ids, np.int32)[chunks]
    pmin, pmax, smin, smax = pos.min(axis=1), pos.max(axis=1), seg.min(axis=1), seg.max(axis=1)
    maybe = smin[None, :] <= smax[:, None]
    maybe &= smax[None, :] >= smin[:, None]
    if causal:
        maybe &= pmin[None, :] <= pmax[:, None]
    if window is not None:
        maybe &= pmax[None, :] > (pmin - window)[:, None]
    return np.count_nonzero(maybe, axis=1).astype(np.float64) * chunks.shape[1] ** 2


def dispatch(costs: np.ndarray, num_shards: int) -> np.ndarray:
    """int64 [n]: the shard of each of ``n`` chunks (n divisible by P), every shard taking n/P of them.

    Largest cost first, each chunk to the least-loaded shard with room (ties: the lower shard); a min-heap
    of (load, shard). Deterministic for given costs.
    """
    n = len(costs)
    if n % num_shards:
        raise ValueError(f"{n} chunks cannot be split evenly over {num_shards} shards")
    room = n // num_shards
    owner = np.empty(n, np.int64)
    taken = [0] * num_shards
    heap = [(0.0, r) for r in range(num_shards)]
    for c in np.argsort(-np.asarray(costs, np.float64), kind="stable"):
        load, r = heapq.heappop(heap)
        owner[c] = r
        taken[r] += 1
        if taken[r] < room:
            heapq.heappush(heap, (load + float(costs[c]), r))
    return owner


def balanced_permutation(positions: np.ndarray, segment_ids: np.ndarray, num_shards: int, *, chunk: int,
                         causal: bool = True, window: int | None = None) -> np.ndarray:
    """int64 [T]: the ``balanced`` layout of one window given in natural order (``permuted = x[perm]``).

    The window is cut into chunks of ``chunk`` tokens (:func:`chunks_of`), which are dispatched by their
    :func:`chunk_costs` (:func:`dispatch`); each shard holds its chunks ordered by their first token.
    ``segment_ids`` as renumbered by :func:`relabel_documents` (the loader does): with other ids the order
    is as valid, only less balanced (shared chunks' segment ranges may span other documents).
    Raises ValueError when T is not divisible by P·C.
    """
    t = len(positions)
    if t % (num_shards * chunk):
        raise ValueError(f"window length {t} must be divisible by {num_shards} shards x chunk {chunk} "
                         f"for the balanced layout")
    chunks = chunks_of(segment_ids, chunk)
    owner = dispatch(chunk_costs(positions, segment_ids, chunks, causal=causal, window=window), num_shards)
    order = np.lexsort((chunks[:, 0], owner))  # by shard, then by first token
    return chunks[order].reshape(-1)


def kv_bytes(tokens: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of K and V for ``tokens`` tokens, plus their int32 positions and segment ids."""
    return tokens * (2 * kv_heads * head_dim * itemsize + 8)


def recv_bytes(impl: str, *, num_shards: int, local_len: int, heads: int, kv_heads: int, head_dim: int,
               itemsize: int, remote_blocks: float | None = None) -> int:
    """Bytes one shard receives over ``sequence`` in one attention forward (one sequence, one layer).

    ring, allgather: K/V blocks of T/P tokens (kv heads only) with positions and segment ids, from
    ``remote_blocks`` other shards (default P − 1: all of them). ulysses: the all-to-all of q, k, v (kv
    heads repeated to P when fewer, lcjax.parallel.ulysses) and of the output back, (P−1)/P of each, plus
    the gathered positions and segment ids.
    """
    p = num_shards
    if impl == "ulysses":
        kv = max(kv_heads, p)
        per_token = head_dim * itemsize * (2 * heads + 2 * kv) // p + 8
        return (p - 1) * local_len * per_token
    blocks = p - 1 if remote_blocks is None else remote_blocks
    return int(round(blocks * kv_bytes(local_len, kv_heads, head_dim, itemsize)))


def needed_kv_tokens(positions: np.ndarray, segment_ids: np.ndarray, num_shards: int, *, causal: bool = True,
                     window: int | None = None) -> int:
    """Max over shards of how many other shards' key tokens some local query sees (exactly, from the
    window's positions and segment ids): the K/V a shard needs at least, whatever the send plan. Arrays in
    layout order, T divisible by P."""
    pos, seg = np.asarray(positions, np.int64), np.asarray(segment_ids, np.int64)
    local = len(pos) // num_shards
    reach = (window if window is not None else int(pos.max() - pos.min()) + 1) if causal else None
    span = int(pos.max() - pos.min()) + 2 + (reach or 0)
    key = (seg - seg.min()) * span + (pos - pos.min())
    most = 0
    for r in range(num_shards):
        mine = slice(r * local, (r + 1) * local)
        queries = np.sort(key[mine])
        others = np.delete(key, np.arange(r * local, (r + 1) * local))
        if causal:  # a query of the same segment at pos_k ≤ pos_q < pos_k + W
            seen = np.searchsorted(queries, others + reach, side="left") > np.searchsorted(queries, others)
        else:  # any query of the same segment
            base = others - others % span
            seen = np.searchsorted(queries, base + span, side="left") > np.searchsorted(queries, base)
        most = max(most, int(seen.sum()))
    return most
