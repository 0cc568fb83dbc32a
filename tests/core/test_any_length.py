"""The public attention entry with a length T that the sequence axis does not divide (issue 20, item 5):
contiguous and balanced orders are padded internally and equal the dense reference, forward and
gradients; zigzag and striped refuse with the rule; allgather inside Ulysses groups is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import attention
from lcjax.ops.attention import reference
from lcjax.sharding.mesh import make_mesh

T, SHARDS = 53, 4  # 53 is prime: it divides no mesh


def _case(seed=0):
    rng = np.random.default_rng(seed)
    seg = np.repeat([3, 1, 3, 7, 2], [11, 9, 14, 12, 7])  # id 3 names two documents apart
    pos = np.concatenate([np.arange(11), np.arange(9), np.arange(14), np.full(12, 5), np.arange(7) * 2])
    order = rng.permutation(T)  # an arbitrary order (balanced): positions and ids travel with the tokens
    ks = jax.random.split(jax.random.key(seed), 4)
    q, do = jax.random.normal(ks[0], (1, T, 4, 8)), jax.random.normal(ks[3], (1, T, 4, 8))
    k, v = jax.random.normal(ks[1], (1, T, 2, 8)), jax.random.normal(ks[2], (1, T, 2, 8))
    return q, k, v, do, jnp.asarray(pos, jnp.int32)[None], jnp.asarray(seg, jnp.int32)[None], order


@pytest.mark.parametrize("impl,layout,window", [
    ("allgather", "balanced", 6),
    pytest.param("ring", "contiguous", None, marks=pytest.mark.slow),
    pytest.param("ulysses", "balanced", None, marks=pytest.mark.slow),
    pytest.param("ring", "balanced", 6, marks=pytest.mark.slow)])
def test_a_length_no_mesh_divides_equals_the_dense_reference(impl, layout, window):
    q, k, v, do, pos, seg, order = _case()
    if layout == "contiguous":
        order = np.arange(T)
    mesh = make_mesh(1, SHARDS, 1)

    def sharded(q, k, v):
        out = attention(q[:, order], k[:, order], v[:, order], positions=pos[:, order], segment_ids=seg[:, order],
                        window=window, mesh=mesh, impl=impl, layout=layout)
        return jnp.zeros_like(out).at[:, order].set(out)

    dense = lambda q, k, v: reference(q, k, v, positions=pos, segment_ids=seg, window=window)
    got, got_vjp = jax.vjp(sharded, q, k, v)
    want, want_vjp = jax.vjp(dense, q, k, v)
    assert got.shape == (1, T, 4, 8)
    np.testing.assert_allclose(got, want, atol=2e-5)
    for g, w in zip(got_vjp(do), want_vjp(do)):
        np.testing.assert_allclose(g, w, atol=2e-5)


@pytest.mark.parametrize("layout,rule", [("zigzag", "divisible by 2 x mesh.sequence = 8"),
                                         ("striped", "divisible by mesh.sequence = 4")])
def test_layouts_defined_only_for_divisible_lengths_refuse_with_the_rule(layout, rule):
    q, k, v, _, pos, seg, _ = _case()
    with pytest.raises(ValueError, match=rule):
        attention(q, k, v, positions=pos, segment_ids=seg, mesh=make_mesh(1, SHARDS, 1), impl="ring", layout=layout)


def test_ulysses_size_outside_hybrid_and_allgather_is_refused_with_one_line():
    q, k, v, _, pos, seg, _ = _case()
    with pytest.raises(ValueError, match="ulysses_size is only used by impl 'hybrid' and 'allgather' \\(impl is 'ring'\\)"):
        attention(q[:, :52], k[:, :52], v[:, :52], positions=pos[:, :52], segment_ids=seg[:, :52],
                  mesh=make_mesh(1, SHARDS, 1), impl="ring", layout="contiguous", ulysses_size=2)
