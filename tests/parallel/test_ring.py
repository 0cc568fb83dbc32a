"""Ring attention over the `sequence` axis against the dense reference: forward and dq, dk, dv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.conftest import relative_error
from lcjax.ops.attention import reference
from lcjax.ops.layout import permute
from lcjax.parallel.ring import merge, ring_attention
from lcjax.sharding.mesh import make_mesh

B, T, N, K, H = 2, 64, 8, 2, 16  # GQA: 8 query heads share 2 kv heads


def _data(packed, t=T):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, t, N, H))
    k = jax.random.normal(ks[1], (B, t, K, H))
    v = jax.random.normal(ks[2], (B, t, K, H))
    do = jax.random.normal(ks[3], (B, t, N, H))
    if packed:  # three documents, positions restart in each
        seg = np.repeat([1, 2, 3], [23, 30, T - 53])
        pos = np.concatenate([np.arange(23), np.arange(30), np.arange(T - 53)])
    else:
        seg, pos = np.ones(t), np.arange(t)
    tile = lambda a: jnp.asarray(np.tile(a, (B, 1)), jnp.int32)
    return q, k, v, do, tile(pos), tile(seg)


def _ring_on_mesh(sp, layout, window, check_vma):
    mesh = make_mesh(1, sp, 1)
    spec = P(None, "sequence")
    fn = lambda q, k, v, p, s: ring_attention(q, k, v, p, s, axis_name="sequence", layout=layout,
                                              window=window, block_q=8, block_k=8)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec, check_vma=check_vma)


@pytest.mark.parametrize("sp", [1, 2, 4, 8])
@pytest.mark.parametrize("layout", ["zigzag", "striped", "contiguous"])
@pytest.mark.parametrize("packed,window", [(False, None), (True, None), (True, 9)])
def test_ring_matches_reference(sp, layout, packed, window):
    q, k, v, do, pos, seg = _data(packed)
    kw = dict(positions=pos, segment_ids=seg, window=window)
    ref = reference(q, k, v, **kw)
    ref_grads = jax.grad(lambda *a: jnp.sum(reference(*a, **kw) * do), (0, 1, 2))(q, k, v)
    lay = lambda x: permute(x, layout, sp)
    ring = _ring_on_mesh(sp, layout, window, check_vma=True)
    out = jax.jit(ring)(lay(q), lay(k), lay(v), lay(pos), lay(seg))
    assert relative_error(out, lay(ref)) <= 1e-5
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ring(*a, lay(pos), lay(seg)) * lay(do)), (0, 1, 2)))(
        lay(q), lay(k), lay(v))
    for g, r in zip(grads, ref_grads):
        assert relative_error(g, lay(r)) <= 1e-5


@pytest.mark.slow  # the ring with check_vma off stays covered by the Pallas and check_vma-off model tests
def test_ring_without_check_vma():
    q, k, v, do, pos, seg = _data(True)
    lay = lambda x: permute(x, "zigzag", 4)
    ring = _ring_on_mesh(4, "zigzag", None, check_vma=False)
    grads = jax.grad(lambda *a: jnp.sum(ring(*a, lay(pos), lay(seg)) * lay(do)), (0, 1, 2))(
        lay(q), lay(k), lay(v))
    ref_grads = jax.grad(lambda *a: jnp.sum(reference(*a, positions=pos, segment_ids=seg) * do),
                         (0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
        assert relative_error(g, lay(r)) <= 1e-5


def test_backward_does_not_store_visiting_blocks():
    """The custom VJP keeps O(T/P) residuals: at a fixed T/P, temporaries do not grow with the ring size
    (autodiff through the forward ring would keep all P visiting blocks: twice as many at P = 8 as at 4).
    Both sizes run the double-buffered loop (P = 2 has no loop, so fewer buffers)."""
    def temp_bytes(sp):
        q, k, v, do, pos, seg = _data(False, t=64 * sp)
        ring = _ring_on_mesh(sp, "zigzag", None, check_vma=True)
        f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(ring(q, k, v, pos, seg) * do), (0, 1, 2)))
        return f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(8) <= 1.25 * temp_bytes(4)


def test_merge_handles_empty_sides():
    o = jnp.ones((1, 2, 1, 3))
    lse = jnp.array([[[0.5], [-jnp.inf]]])
    out, l = merge(o, lse, jnp.zeros_like(o), jnp.full_like(lse, -jnp.inf))
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out[0, 0]), 1.0)
    np.testing.assert_array_equal(np.asarray(out[0, 1]), 0.0)
    assert np.isneginf(np.asarray(l[0, 1, 0]))


@pytest.mark.parametrize("mesh_shape,layout", [(None, "zigzag"), ((2, 2, 2), "striped"), ((1, 1, 1), "contiguous")])
def test_public_entry_on_global_arrays(mesh_shape, layout):
    from lcjax.attention import attention

    q, k, v, do, pos, seg = _data(True)
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    sp = 8 if mesh is None else mesh.shape["sequence"]
    lay = lambda x: permute(x, layout, sp)
    out = attention(lay(q), lay(k), lay(v), positions=lay(pos), segment_ids=lay(seg), mesh=mesh, layout=layout,
                    impl="local" if sp == 1 else "ring", block_q=8, block_k=8)
    assert relative_error(out, lay(reference(q, k, v, positions=pos, segment_ids=seg))) <= 1e-5


@pytest.mark.parametrize("kwargs,message", [({"impl": "spiral"}, "attention.impl"),
                                            ({"kernel": "cuda"}, "attention.kernel"),
                                            ({"causal": False, "window": 4}, "window requires causal"),
                                            ({"window": 0}, "window 0 must be >= 1"),
                                            ({"impl": "hybrid", "ulysses_size": 3}, "ulysses_size 3 must divide"),
                                            ({"impl": "ulysses"}, "ulysses_size 8 must divide the 8 query heads|kv")])
def test_public_entry_rejects_bad_arguments(kwargs, message):
    from lcjax.attention import attention

    q, k, v, _, pos, seg = _data(False)
    if kwargs.get("impl") == "ulysses":  # 8 query heads but 3 kv heads cannot be split over 8 shards
        k, v = k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2)
        q = q[:, :, :6]
        message = "must divide"
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, positions=pos, **kwargs)


def test_public_entry_rejects_bad_positions():
    from lcjax.attention import attention

    q, k, v, _, pos, _ = _data(False)
    with pytest.raises(ValueError, match="positions must be int32"):
        attention(q, k, v, positions=pos.astype(jnp.float32))


def test_zigzag_balances_the_work_that_the_ring_schedule_computes():
    from lcjax.parallel.ring import computed_area

    t, p = 4096, 8
    pos, seg = np.arange(t)[None], np.ones((1, t), np.int64)
    area = {layout: computed_area(permute(pos, layout, p), seg, ring_size=p, layout=layout, block_q=64, block_k=64)
            for layout in ("zigzag", "striped", "contiguous")}
    balance = {layout: a.max() / a.mean() for layout, a in area.items()}
    assert balance["zigzag"] <= 1.05 and balance["contiguous"] > 1.5
    assert area["zigzag"].sum() <= 1.05 * t * t / 2  # skipped blocks: close to the causal half


@pytest.mark.slow  # the script's --doc-lengths path runs in tests/data/test_balance.py
def test_bench_attention_script_writes_records(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "scripts/bench_attention.py", "--seq-len", "256", "--shards", "4",
                             "--impls", "ring,ulysses", "--layouts", "zigzag", "--iters", "1", "--block", "32",
                             "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())
    assert {(r["impl"], r["pass"]) for r in records} == {("ring", "fwd"), ("ring", "fwd_bwd"), ("ulysses", "fwd"),
                                                         ("ulysses", "fwd_bwd")}
    assert all({"layout", "n_shards", "iters_per_sec", "efficiency", "balance"} <= set(r) for r in records)


def test_bfloat16_dkv_on_the_wire_stays_close_and_unknown_dtype_is_refused():
    """dK/dV partial sums sent in bf16 (attention.dkv_dtype) round once per hop: close to the float32 ring,
    not equal to it; another dtype name is one ValueError."""
    q, k, v, do, pos, seg = _data(True)
    lay = lambda x: permute(x, "zigzag", 4)
    mesh, spec = make_mesh(1, 4, 1), P(None, "sequence")

    def grads(dtype):
        fn = lambda q, k, v, p, s: ring_attention(q, k, v, p, s, axis_name="sequence", block_q=8, block_k=8,
                                                  dkv_dtype=dtype)
        ring = jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)
        return jax.jit(jax.grad(lambda *a: jnp.sum(ring(*a, lay(pos), lay(seg)) * lay(do)), (0, 1, 2)))(
            lay(q), lay(k), lay(v))

    full, low = grads("float32"), grads("bfloat16")
    assert relative_error(low[0], full[0]) == 0  # dq never travels
    for g, r in zip(low[1:], full[1:]):
        assert 0 < relative_error(g, r) <= 2e-2
    with pytest.raises(ValueError, match="attention.dkv_dtype"):
        ring_attention(q, k, v, pos, seg, axis_name=None, dkv_dtype="float16")
