"""Ulysses (all-to-all) and hybrid (Ulysses inside, ring across) against the dense reference."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.conftest import relative_error
from lcjax.ops.attention import reference
from lcjax.ops.layout import permute
from lcjax.parallel.sequence import sequence_parallel_attention
from lcjax.parallel.ulysses import zigzag_group_order
from lcjax.sharding.mesh import make_mesh

B, T, H = 2, 64, 16


def _data(n, kv, mask, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (B, T, n, H), dtype)
    k = jax.random.normal(ks[1], (B, T, kv, H), dtype)
    v = jax.random.normal(ks[2], (B, T, kv, H), dtype)
    do = jax.random.normal(ks[3], (B, T, n, H))
    seg, pos = np.ones(T), np.arange(T)
    if mask == "segments":
        seg = np.repeat([1, 2, 3], [21, 30, T - 51])
        pos = np.concatenate([np.arange(21), np.arange(30), np.arange(T - 51)])
    tile = lambda a: jnp.asarray(np.tile(a, (B, 1)), jnp.int32)
    return q, k, v, do, tile(pos), tile(seg)


WINDOWS = {"window": 5, "window_big": 20, "window1": 1}  # smaller / larger than a shard, and 1


def check(impl, sp, layout, n, kv, mask="causal", group=None, kernel="xla", dtype=jnp.float32, tol=1e-5):
    """Forward and dq, dk, dv of ``impl`` on ``sp`` shards vs the float32 dense reference; returns the
    largest relative error."""
    q, k, v, do, pos, seg = _data(n, kv, mask, dtype)
    causal = mask != "noncausal"
    window = T // sp if mask == "window_shard" else WINDOWS.get(mask)
    kw = dict(positions=pos, segment_ids=seg, causal=causal, window=window)
    f32 = lambda x: x.astype(jnp.float32)
    ref = reference(f32(q), f32(k), f32(v), **kw)
    ref_grads = jax.grad(lambda *a: jnp.sum(reference(*a, **kw) * do), (0, 1, 2))(f32(q), f32(k), f32(v))
    lay = lambda x: permute(x, layout, sp)
    spec = P(None, "sequence")
    fn = jax.shard_map(
        lambda q, k, v, p, s: sequence_parallel_attention(
            q, k, v, p, s, impl=impl, axis_name="sequence", layout=layout, causal=causal, window=window,
            block_q=8, block_k=8, ulysses_size=group, kernel=kernel),
        mesh=make_mesh(1, sp, 1), in_specs=(spec,) * 5, out_specs=spec, check_vma=kernel != "pallas")
    out = jax.jit(fn)(lay(q), lay(k), lay(v), lay(pos), lay(seg))
    errors = [relative_error(f32(out), lay(ref))]
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(f32(fn(*a, lay(pos), lay(seg))) * lay(do)), (0, 1, 2)))(
        lay(q), lay(k), lay(v))
    errors += [relative_error(f32(g), lay(r)) for g, r in zip(grads, ref_grads)]
    assert max(errors) <= tol, errors
    return max(errors)


@pytest.mark.parametrize("sp,n,kv", [(2, 8, 2), (4, 8, 8), (8, 8, 2), (8, 8, 1)])
def test_ulysses(sp, n, kv):
    check("ulysses", sp, "zigzag", n, kv, mask="segments")


@pytest.mark.parametrize("sp,group,layout,mask", [(8, 2, "zigzag", "causal"), (8, 4, "zigzag", "segments"),
                                                  (4, 2, "striped", "window"), (8, 2, "contiguous", "window"),
                                                  (4, 2, "zigzag", "noncausal")])
def test_hybrid(sp, group, layout, mask):
    check("hybrid", sp, layout, 8, 2, mask=mask, group=group)


@pytest.mark.parametrize("layout,mask", [("contiguous", "window"), ("contiguous", "window_big"),
                                         ("contiguous", "window_shard"), ("contiguous", "window1"),
                                         ("zigzag", "window"), ("striped", "noncausal")])
def test_ring_masks(layout, mask):
    check("ring", 8, layout, 8, 1, mask=mask)


@pytest.mark.parametrize("impl,kernel", [("ring", "xla"), pytest.param("ulysses", "xla", marks=pytest.mark.slow),
                                         pytest.param("ring", "pallas", marks=pytest.mark.slow)])
def test_bfloat16_error_does_not_grow_with_the_ring(impl, kernel):
    errors = [check(impl, sp, "zigzag", 8, 2, mask="segments", kernel=kernel, dtype=jnp.bfloat16, tol=2e-2)
              for sp in (1, 2, 4, 8)]
    assert max(errors) <= 1.5 * errors[0] + 2e-3, errors


@pytest.mark.parametrize("impl,sp,layout", [("ring", 4, "zigzag"), ("hybrid", 4, "zigzag"), ("ulysses", 2, "striped")])
def test_pallas_kernel_in_every_impl(impl, sp, layout):
    check(impl, sp, layout, 8, 2, mask="segments", kernel="pallas", group=2 if impl == "hybrid" else None)


@pytest.mark.slow
@pytest.mark.parametrize("impl,layout,mask,heads,sp", [
    (impl, layout, mask, heads, sp)
    for impl, layout, mask, heads, sp in itertools.product(
        ["ring", "ulysses", "hybrid"], ["zigzag", "striped", "contiguous"],
        ["causal", "window", "window_big", "window_shard", "window1", "segments", "noncausal"],
        [(8, 8), (8, 2), (8, 1)], [1, 2, 4, 8])
    if not (impl == "hybrid" and sp < 4)])
def test_full_matrix(impl, layout, mask, heads, sp):
    check(impl, sp, layout, *heads, mask=mask, group=2 if impl == "hybrid" else None)


def test_zigzag_group_order():
    # two shards of 4 tokens, each [early(2), late(2)] -> early_0 early_1 late_1 late_0
    assert zigzag_group_order(4, 2).tolist() == [0, 1, 4, 5, 6, 7, 2, 3]


def test_heads_that_cannot_be_divided_are_refused():
    q, k, v, _, pos, seg = _data(6, 2, "causal")
    spec = P(None, "sequence")
    fn = jax.shard_map(lambda q, k, v, p, s: sequence_parallel_attention(q, k, v, p, s, impl="ulysses",
                                                                         axis_name="sequence"),
                       mesh=make_mesh(1, 4, 1), in_specs=(spec,) * 5, out_specs=spec)
    with pytest.raises(ValueError, match="ulysses_size 4 must divide the 6 query heads"):
        fn(q, k, v, pos, seg)
