"""The balance metric, the balanced layout and window padding (lcjax.data.balance, lcjax.data.loader)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lcjax import config as config_lib
from lcjax.data import balance as B
from lcjax.data.loader import (FIELDS, LayOut, LoaderSpec, make_loader, order_window, pad_window,
                               windows_of_lengths)
from lcjax.ops.layout import permutation

ROOT = Path(__file__).resolve().parents[2]


def _mask(pos, seg, causal=True, window=None):
    m = seg[:, None] == seg[None, :]
    if causal:
        m &= pos[None, :] <= pos[:, None]
    if window is not None:
        m &= pos[:, None] - pos[None, :] < window
    return m


def test_exact_area_by_hand_and_against_the_dense_mask():
    one = np.arange(4)
    assert B.exact_area(one, np.ones(4)) == 10  # 1 + 2 + 3 + 4
    assert B.exact_area(np.array([0, 1, 0, 1]), np.array([1, 1, 2, 2])) == 6  # two documents of 2
    assert B.exact_area(one, np.ones(4), window=2) == 7  # 1 + 2 + 2 + 2
    assert B.exact_area(one, np.ones(4), causal=False) == 16
    assert B.exact_area(one, np.ones(4), real=np.array([1, 1, 1, 0])) == 6
    rng = np.random.default_rng(0)
    for trial in range(100):  # any positions (repeated, negative, unordered), reused segment ids
        t = int(rng.integers(1, 30))
        pos, seg = rng.integers(-3, 8, t), rng.integers(0, 3, t)
        causal, window = trial % 4 != 0, [None, 1, 3][trial % 3] if trial % 4 else None
        assert B.exact_area(pos, seg, causal=causal, window=window) == _mask(pos, seg, causal, window).sum()


def test_shard_areas_by_hand():
    """8 tokens of one causal document, 2 shards, tiles of 2: contiguous shard 0 computes tiles
    (0,0) (1,0) (1,1) = 12 pairs, shard 1 the other 7 tiles = 28; zigzag (0 1 6 7 | 2 3 4 5) gives 20
    and 20; the exact area is 36, so balance 28/18 and 20/18."""
    pos, seg = np.arange(8), np.ones(8, int)
    assert B.shard_areas(pos, seg, 2, tile=2).tolist() == [12, 28]
    zig = permutation(8, "zigzag", 2)
    assert B.shard_areas(pos[zig], seg, 2, tile=2).tolist() == [20, 20]
    assert B.shard_areas(pos[zig], seg, 2, impl="ulysses", tile=2).tolist() == [20, 20]
    assert B.balance(pos, seg, 2, tile=2) == pytest.approx(28 / 18)
    assert B.balance(pos[zig], seg, 2, tile=2) == pytest.approx(20 / 18)
    striped = permutation(8, "striped", 2)  # 0 2 4 6 | 1 3 5 7: equal, but 48 pairs computed for 36
    assert B.shard_areas(pos[striped], seg, 2, tile=2).tolist() == [24, 24]


def test_shard_areas_match_a_tile_by_tile_count():
    rng = np.random.default_rng(1)
    for _ in range(20):
        p, tile = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        t = p * int(rng.integers(1, 12))
        pos, seg = rng.integers(0, 10, t), rng.integers(0, 3, t)
        window = [None, 3][int(rng.integers(2))]
        local, want = t // p, np.zeros(p)
        tiles = [(s, min(s + tile, (s // local + 1) * local))
                 for r in range(p) for s in range(r * local, (r + 1) * local, tile)]
        for qa, qb in tiles:
            for ka, kb in tiles:
                q, k = slice(qa, qb), slice(ka, kb)
                maybe = (seg[k].min() <= seg[q].max() and seg[k].max() >= seg[q].min()
                         and pos[k].min() <= pos[q].max() and (window is None or pos[k].max() > pos[q].min() - window))
                want[qa // local] += maybe * (qb - qa) * (kb - ka)
        assert B.shard_areas(pos, seg, p, tile=tile, window=window).tolist() == want.tolist()


def test_chunks_are_cut_at_document_starts():
    """Runs of 5 and 3 tokens, chunks of 2: whole chunks [1 2] [3 4] [6 7] from each run's end, the heads
    (tokens 0 and 5) share the last chunk."""
    assert B.chunks_of(np.array([1, 1, 1, 1, 1, 2, 2, 2]), 2).tolist() == [[1, 2], [3, 4], [6, 7], [0, 5]]
    assert B.chunks_of(np.ones(6, int), 3).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_remainders_split_the_shortest_document_and_the_ids_follow_the_chunks():
    """Chunks of 4; documents of 3, 10, 7 and 4 tokens: remainders 3, 2, 3, 0. The 10-token document
    (2 whole chunks) takes a shared chunk alone with room; the 3-token one (no whole chunk) straddles."""
    seg = np.repeat([1, 2, 3, 4], [3, 10, 7, 4])
    assert B.remainder_order(seg, 4).tolist() == [1, 0, 2, 3]
    new = B.relabel_documents(seg, 4)
    assert new.tolist() == np.repeat([2, 1, 3, 4], [3, 10, 7, 4]).tolist()
    chunks = B.chunks_of(seg, 4)
    assert chunks[-2:].tolist() == [[3, 4, 0, 1], [2, 13, 14, 15]]
    reused = np.array([5, 5, 7, 7, 7, 5, 9])  # id 5 names two runs: they keep one id
    out = B.relabel_documents(reused, 2)
    assert (out[:, None] == out[None, :]).tolist() == (reused[:, None] == reused[None, :]).tolist()


def test_remainders_fill_shared_chunks_exactly_where_they_can():
    """Chunks of 8; documents of 26, 19, 14 and 5 tokens: remainders 2, 3, 6, 5 (3, 2, 1, 0 whole chunks).
    The 2 goes first (most whole chunks) and the 6 closes its chunk; the 3 and the 5 fill the next one:
    no document straddles two shared chunks."""
    seg = np.repeat([1, 2, 3, 4], [26, 19, 14, 5])
    assert B.remainder_order(seg, 8).tolist() == [0, 2, 1, 3]
    chunks = B.chunks_of(B.relabel_documents(seg, 8), 8)
    shared = [set(seg[c].tolist()) for c in chunks[-2:]]
    assert shared == [{1, 3}, {2, 4}]


def test_area_lower_bound_holds_for_every_order_and_is_reached_by_tile_aligned_documents():
    rng = np.random.default_rng(2)
    for _ in range(12):
        lengths = rng.integers(1, 40, 12)
        w = windows_of_lengths(lengths, 192)[0]
        pos, seg = w["positions"], w["segment_ids"]
        window = [None, 16][int(rng.integers(2))]
        for impl in ("ring", "ulysses"):
            bound = B.area_lower_bound(pos, seg, 4, impl=impl, tile=8, window=window)
            for order in (np.arange(192), rng.permutation(192), permutation(192, "zigzag", 4),
                          B.balanced_permutation(pos, B.relabel_documents(seg, 8), 4, chunk=8, window=window)):
                s = B.relabel_documents(seg, 8)[order]
                assert bound <= B.shard_areas(pos[order], s, 4, impl=impl, tile=8, window=window).sum()
    seg = np.repeat([1, 2, 3], [16, 8, 8])
    pos = np.concatenate([np.arange(16), np.arange(8), np.arange(8)])
    assert B.area_lower_bound(pos, seg, 2, tile=8) == B.shard_areas(pos, seg, 2, tile=8).sum() == 5 * 64
    with pytest.raises(ValueError, match="share a position"):
        B.area_lower_bound(np.zeros(8, int), np.ones(8, int), 2, tile=4)


def test_balanced_layout_of_short_heavy_tailed_documents_stays_near_the_bound():
    """Pareto lengths (mostly 40-100 tokens, chunks of 32, 8 shards): the loader's renumbered, balanced
    order is within 30 % of the least area any order has; without renumbering the shared chunks' segment
    ranges span other documents and it is several times worse."""
    lengths = (40 * (1 + np.random.default_rng(5).pareto(1.2, 400))).astype(int)
    w = windows_of_lengths(lengths, 8192)[0]
    pos, seg = w["positions"], w["segment_ids"]
    bound = B.area_lower_bound(pos, seg, 8, tile=32) / B.exact_area(pos, seg)
    new = B.relabel_documents(seg, 32)
    got = {}
    for name, ids in (("renumbered", new), ("kept", seg)):
        order = B.balanced_permutation(pos, ids, 8, chunk=32)
        got[name] = B.balance(pos[order], ids[order], 8, tile=32)
    assert 1.1 < bound <= got["renumbered"] <= 1.3 * bound and got["kept"] > 2 * got["renumbered"]


def test_dispatch_is_longest_first_to_the_least_loaded_shard_with_room():
    owner = B.dispatch(np.array([5, 4, 3, 3, 2, 1]), 2)
    assert owner.tolist() == [0, 1, 1, 0, 1, 0]  # loads 9 and 9, three chunks each
    with pytest.raises(ValueError, match="cannot be split evenly"):
        B.dispatch(np.ones(5), 2)


def _packed(lengths, seq_len):
    w = windows_of_lengths(lengths, seq_len)[0]
    return {**w, "tokens": np.arange(seq_len, dtype=np.int32), "labels": np.arange(1, seq_len + 1, dtype=np.int32)}


def test_balanced_layout_balances_a_packed_window_that_zigzag_does_not():
    lengths = [3000, 40, 200, 700, 90, 10, 1500, 300, 2500, 64]  # 8192 tokens: a few long documents
    w, p, chunk = _packed(lengths, 8192), 8, 32
    got = {}
    for layout in ("zigzag", "balanced"):
        order = order_window(w, layout, p, chunk=chunk)
        assert sorted(order.tolist()) == list(range(8192))
        got[layout] = B.balance(w["positions"][order], w["segment_ids"][order], p, tile=chunk)
    floor = B.balance(w["positions"], w["segment_ids"], p, impl="ulysses", tile=chunk)  # all tiles / P
    assert got["balanced"] <= 1.02 * floor < 1.1 and got["zigzag"] > 1.3
    order = B.balanced_permutation(w["positions"], w["segment_ids"], p, chunk=chunk)
    chunks = {tuple(c) for c in B.chunks_of(w["segment_ids"], chunk).tolist()}
    assert {tuple(c) for c in order.reshape(-1, chunk).tolist()} == chunks  # each shard: whole chunks
    with pytest.raises(ValueError, match="divisible by 8 shards x chunk 32"):
        B.balanced_permutation(w["positions"][:100], w["segment_ids"][:100], p, chunk=chunk)


def test_window_padding_is_its_own_segment_without_loss():
    w = _packed([2, 3], 6)
    padded = pad_window(w, 9)
    assert all(len(x) == 9 for x in padded.values())
    assert padded["segment_ids"][6:].tolist() == [3, 3, 3] and w["segment_ids"].max() == 2
    assert padded["positions"][6:].tolist() == [0, 1, 2]
    assert padded["loss_mask"][6:].tolist() == [0, 0, 0] and padded["tokens"][6:].tolist() == [0, 0, 0]
    assert pad_window(w, 6) is w


@pytest.mark.parametrize("seq_len,layout,shards,want", [
    (4096, "zigzag", 4, 4096), (77, "zigzag", 4, 80), (77, "contiguous", 4, 80), (77, "striped", 1, 77),
    (77, "balanced", 2, 80), (2000, "balanced", 4, 2048), (131072, "balanced", 8, 131072),
    (131000, "balanced", 8, 131072)])
def test_padded_seq_len(seq_len, layout, shards, want):
    assert config_lib.padded_seq_len(seq_len, layout, shards) == want
    chunk = config_lib.balance_chunk(seq_len, shards)
    assert layout != "balanced" or want % (shards * chunk) == 0


def test_padded_runs_tile_well():
    """Every layout's runs (2·P for zigzag, P otherwise) are padded so the XLA kernel's blocks (divisors of
    the run) never drop below 16 tokens for runs longer than a tile, by at most 15 tokens per run. 4096
    tokens in zigzag on 3 shards (runs of 683, a prime: 1-token blocks before) pad to 4,104."""
    from lcjax.kernels.flash_attention.xla import fit_block

    for seq_len in range(100, 6000, 97):
        for shards in (1, 2, 3, 5, 8):
            for layout in ("zigzag", "contiguous", "striped"):
                padded = config_lib.padded_seq_len(seq_len, layout, shards)
                pieces = 2 * shards if layout == "zigzag" else shards
                run = padded // pieces
                assert padded % pieces == 0 and run - -(-seq_len // pieces) < config_lib.MIN_BLOCK
                assert run <= config_lib.TILE_GRAIN or fit_block(run, 512) >= config_lib.MIN_BLOCK, (seq_len, shards)
    assert config_lib.padded_seq_len(4096, "zigzag", 3) == 4104
    assert config_lib.padded_seq_len(4096, "zigzag", 4) == 4096


STREAM = np.arange(400, dtype=np.uint16)
STARTS = np.array([0, 5, 9, 40, 41, 100, 180, 181, 260, 300], np.int64)


def _batches(layout, shards, seq_len=37, n=3):
    spec = LoaderSpec(seq_len=seq_len, global_batch=2, seed=3, layout=layout, num_shards=shards, prefetch=0)
    lo = make_loader(STREAM, spec, doc_starts=STARTS)
    return [next(lo) for _ in range(n)]


@pytest.mark.parametrize("layout,shards", [("zigzag", 4), ("balanced", 2), ("striped", 3)])
def test_loader_pads_any_seq_len_and_keeps_every_token_with_its_fields(layout, shards):
    """Odd seq_len: padded rows; the real tokens are the 1-shard loader's, each with its label, position,
    segment id and loss mask; padding has no loss and a segment of its own."""
    ref = _batches("contiguous", 1)
    for got, want in zip(_batches(layout, shards), ref):
        assert want["tokens"].shape == (2, 37)
        assert got["tokens"].shape == (2, config_lib.padded_seq_len(37, layout, shards))
        padded = config_lib.padded_seq_len(37, layout, shards)
        for b in range(2):
            ids = want["segment_ids"][b]
            if layout == "balanced":  # the loader renumbers the documents: same ones, new ids
                natural = pad_window({f: want[f][b] for f in FIELDS}, padded)["segment_ids"]
                new = B.relabel_documents(natural, config_lib.balance_chunk(37, shards))
                rename = dict(zip(natural.tolist(), new.tolist()))
                assert len(set(rename.values())) == len(rename)  # a bijection
                ids, pad = np.array([rename[i] for i in ids.tolist()]), rename[int(natural.max())]
            else:
                pad = ids.max() + 1
            real = got["segment_ids"][b] != pad
            rows = lambda d, keep, seg: sorted(zip(*(d[f][b][keep].tolist() if f != "segment_ids" else
                                                     seg[keep].tolist() for f in FIELDS)))
            assert rows(got, real, got["segment_ids"][b]) == rows(want, slice(None), ids)
            assert not got["loss_mask"][b][~real].any()
            assert got["loss_mask"].sum() == want["loss_mask"].sum()


def test_loader_layout_transform_accepts_a_window_and_refuses_unknown_layouts():
    batch = {k: v[None] for k, v in _packed([100, 28], 128).items()}
    batch["segment_ids"] = batch["segment_ids"]
    batch["loss_mask"] = batch["loss_mask"]
    out = LayOut("balanced", 4, attention_window=16)(batch)
    assert sorted(out["tokens"][0].tolist()) == list(range(128))
    with pytest.raises(ValueError, match="attention.layout 'spiral' must be one of"):
        _batches("spiral", 2)


def test_any_seq_len_is_a_valid_config_and_tiles_name_the_padded_length():
    cfg = config_lib.load(ROOT / "configs/demo.yaml", ["data.seq_len=1001", "attention.layout=balanced"])
    assert (cfg.data.seq_len, cfg.attention.layout) == (1001, "balanced")
    with pytest.raises(ValueError, match="train.loss_tile 5 must be 0 .* / mesh.sequence = 252"):
        config_lib.load(ROOT / "configs/demo.yaml", ["data.seq_len=1001", "train.loss_tile=5"])


def test_bench_attention_balance_only_records(tmp_path):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("\n".join(map(str, [900, 30, 300, 2000, 5, 700, 64, 3000, 12, 400, 800])) + "\n")
    out = tmp_path / "b.json"
    cmd = [sys.executable, "scripts/bench_attention.py", "--doc-lengths", str(lengths), "--balance-only",
           "--shards", "4", "--seq-len", "2000", "--tile", "32", "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    records = {(r["impl"], r["layout"]): r for r in json.loads(out.read_text())}
    assert set(records) == {(i, lay) for i in ("ring", "allgather", "ulysses")
                            for lay in ("zigzag", "striped", "contiguous", "balanced")}
    assert all({"impl", "layout", "n_shards", "balance", "recv_bytes_max"} <= set(r) for r in records.values())
    assert records["ring", "balanced"]["balance"] < records["ring", "zigzag"]["balance"]
    assert records["ring", "balanced"]["balance"] < records["ring", "striped"]["balance"]
    assert min(r["balance"] for r in records.values()) >= 1.0
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "missing.txt"), "--balance-only"], cwd=ROOT,
                         capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--doc-lengths" in bad.stderr
    negative = tmp_path / "negative.txt"
    negative.write_text("5\n-3\n")
    for extra, message in ((["--shards", "0"], "--shards 0 must be >= 1"),
                           (["--window", "-5"], "--window -5 must be >= 1"),
                           (["--max-windows", "0"], "--max-windows 0 must be >= 1"),
                           (["--layouts", "zigzag,bogus"], "--layouts bogus: must be among"),
                           (["--doc-lengths", str(negative)], "length -3 (entry 2) must be >= 1")):
        bad = subprocess.run(cmd[:-2] + extra, cwd=ROOT, capture_output=True, text=True,
                             env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr, bad.stderr


@pytest.mark.parametrize("impl,window", [pytest.param("ring", None, marks=pytest.mark.slow), ("ulysses", 8)])
def test_attention_in_the_balanced_order_equals_the_dense_reference(impl, window):
    """The loader's balanced, padded order through the public entry (4 shards, GQA): outputs and gradients
    of the real tokens equal the dense reference on the natural, unpadded window."""
    import jax
    import jax.numpy as jnp

    from lcjax.attention import attention
    from lcjax.ops.attention import reference
    from lcjax.sharding.mesh import make_mesh

    t, shards = 53, 4
    w = _packed([20, 3, 25, 9], t)
    padded = pad_window(w, config_lib.padded_seq_len(t, "balanced", shards))
    chunk = config_lib.balance_chunk(t, shards)
    padded = {**padded, "segment_ids": B.relabel_documents(padded["segment_ids"], chunk)}  # as the loader
    order = order_window(padded, "balanced", shards, chunk=chunk, attention_window=window)
    n = len(order)
    assert n == 56 and not np.array_equal(order, np.arange(n))
    ks = jax.random.split(jax.random.key(0), 4)
    q, do = jax.random.normal(ks[0], (1, t, 4, 8)), jax.random.normal(ks[3], (1, t, 4, 8))
    k, v = jax.random.normal(ks[1], (1, t, 2, 8)), jax.random.normal(ks[2], (1, t, 2, 8))
    field = lambda name, src: jnp.asarray(src[name], jnp.int32)[None]
    lay = lambda x: jnp.pad(x, ((0, 0), (0, n - t), (0, 0), (0, 0)))[:, order]
    mesh = make_mesh(1, shards, 1)

    def sharded(q, k, v):
        out = attention(lay(q), lay(k), lay(v), positions=field("positions", padded)[:, order],
                        segment_ids=field("segment_ids", padded)[:, order], window=window, mesh=mesh, impl=impl,
                        layout="balanced")
        return jnp.zeros((1, n, 4, 8)).at[:, order].set(out)[:, :t]  # back to natural order, real tokens

    dense = lambda q, k, v: reference(q, k, v, positions=field("positions", w), segment_ids=field("segment_ids", w),
                                      window=window)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * do)
    np.testing.assert_allclose(sharded(q, k, v), dense(q, k, v), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.grad(loss(sharded), (0, 1, 2))(q, k, v), jax.grad(loss(dense), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_needed_kv_tokens_counts_remote_keys_some_local_query_sees():
    rng = np.random.default_rng(2)
    for trial in range(30):
        p = int(rng.integers(1, 4))
        t = p * int(rng.integers(1, 8))
        pos, seg = rng.integers(0, 9, t), rng.integers(0, 3, t)
        window = [None, 2][trial % 2]
        seen = _mask(pos, seg, True, window)  # [query, key]
        local = t // p
        want = max(sum(seen[r * local:(r + 1) * local, j].any() for j in range(t) if j // local != r)
                   for r in range(p))
        assert B.needed_kv_tokens(pos, seg, p, window=window) == want
    # one causal document of 16 tokens, 4 shards, window 3: each shard needs the 2 keys just before it
    assert B.needed_kv_tokens(np.arange(16), np.ones(16, int), 4, window=3) == 2
