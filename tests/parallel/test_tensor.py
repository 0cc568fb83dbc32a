"""Sequence-parallel TP's collective matmuls (lcjax.parallel.tensor) against the plain collectives they
replace, forward and gradients, on 4 and 2 simulated model shards (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from tests.conftest import relative_error
from lcjax.parallel import tensor
from lcjax.sharding.mesh import make_mesh

B, T, D, F = 2, 16, 8, 12


def _run(fn, mesh, in_specs, out_specs, *args):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))(*args)


@pytest.mark.parametrize("tp", [2, 4])
def test_all_gather_matmul_equals_gather_then_matmul(tp):
    """Tokens come back in order and the gradients (x and both weights) match the plain all-gather's."""
    mesh = make_mesh(1, 1, tp)
    rng = np.random.default_rng(0)
    x, w1, w2 = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((B, T, D), (D, F), (D, 4)))
    cot = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)

    def loss(collective, x, w1, w2):
        def local(x, w1, w2):  # x: tokens split over model; w1 columns split over model; w2 replicated
            if collective:
                a, b = tensor.all_gather_matmul(x, (w1, w2), "model")
            else:
                g = lax.all_gather(x, "model", axis=1, tiled=True)
                a, b = g @ w1, g @ w2
            return a, lax.psum(jnp.sum(b * b), "model")
        a, b = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "model"), P(None, "model"), P()),
                             out_specs=(P(None, None, "model"), P()))(x, w1, w2)
        return jnp.sum(a * cot) + b

    got = jax.jit(jax.value_and_grad(lambda *a: loss(True, *a), argnums=(0, 1, 2)))(x, w1, w2)
    want = jax.jit(jax.value_and_grad(lambda *a: loss(False, *a), argnums=(0, 1, 2)))(x, w1, w2)
    assert relative_error(got[0], want[0]) <= 1e-6
    for g, w in zip(got[1], want[1]):
        assert relative_error(g, w) <= 1e-5


@pytest.mark.parametrize("tp", [2, 4])
def test_matmul_reduce_scatter_equals_psum_scatter(tp):
    """Each shard gets its own block of tokens of the summed product; gradients match psum_scatter's;
    a wrong block order (the un-rotated sum of the blocks) is caught (negative control)."""
    mesh = make_mesh(1, 1, tp)
    rng = np.random.default_rng(1)
    x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((B, T, F * tp), (F * tp, D)))
    cot = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    specs = (P(None, None, "model"), P("model", None))

    def loss(collective, x, w):
        def local(x, w):
            if collective:
                return tensor.matmul_reduce_scatter(x, w, "model")
            return lax.psum_scatter(x @ w, "model", scatter_dimension=1, tiled=True)
        y = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(None, "model"))(x, w)
        return jnp.sum(y * cot)

    got = jax.jit(jax.value_and_grad(lambda *a: loss(True, *a), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.value_and_grad(lambda *a: loss(False, *a), argnums=(0, 1)))(x, w)
    assert relative_error(got[0], want[0]) <= 1e-6
    for g, w_ in zip(got[1], want[1]):
        assert relative_error(g, w_) <= 1e-5
    wrong = _run(lambda x, w: lax.psum(x @ w, "model")[:, : T // tp], mesh, specs, P(None, "model"), x, w)
    right = _run(lambda x, w: tensor.matmul_reduce_scatter(x, w, "model"), mesh, specs, P(None, "model"), x, w)
    assert relative_error(wrong, right) > 0.1


def test_embedding_scatter_is_the_token_block_of_the_sum():
    mesh = make_mesh(1, 1, 2)
    rng = np.random.default_rng(2)
    table = jnp.asarray(rng.normal(size=(10, D)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 10, (B, T)), jnp.int32)
    fn = lambda scatter: _run(lambda t, tab: tensor.vocab_parallel_embed(t, tab, "model", scatter=scatter),
                              mesh, (P(), P("model")), P(None, "model") if scatter else P(), tokens, table)
    np.testing.assert_array_equal(fn(True), fn(False))
    np.testing.assert_array_equal(fn(False), table[tokens])
