"""The blockwise XLA kernel and RoPE against float64 / dense oracles on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import relative_error
from lcjax.kernels.flash_attention import xla as flash
from lcjax.ops import rope
from lcjax.ops.attention import reference


def _inputs(b=2, t=48, n=4, k=2, h=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, n, h))
    kk = jax.random.normal(ks[1], (b, t, k, h))
    v = jax.random.normal(ks[2], (b, t, k, h))
    return q, kk, v, jax.random.normal(ks[3], (b, t, n, h))


def _packed(b, t):
    seg = np.ones((b, t), np.int32)
    seg[:, 20:] = 2
    seg[:, 37:] = 3
    pos = np.concatenate([np.arange(20), np.arange(17), np.arange(t - 37)])
    return jnp.asarray(np.tile(pos, (b, 1)), jnp.int32), jnp.asarray(seg)


@pytest.mark.parametrize("causal,window,packed", [(True, None, False), (True, 7, False), (True, None, True),
                                                  (False, None, True), (True, 5, True)])
def test_flash_matches_reference(causal, window, packed):
    q, k, v, do = _inputs()
    b, t = q.shape[:2]
    pos, seg = _packed(b, t) if packed else (jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1)),
                                             jnp.ones((b, t), jnp.int32))
    kw = dict(causal=causal, window=window)
    out, lse = flash.flash_forward(q, k, v, pos, pos, seg, seg, block_q=16, block_k=8, **kw)
    ref = reference(q, k, v, positions=pos, segment_ids=seg, **kw)
    assert relative_error(out, ref) < 1e-5
    grads = flash.flash_backward(q, k, v, out, lse, do, pos, pos, seg, seg, block_q=8, block_k=16, **kw)
    ref_grads = jax.grad(lambda *a: jnp.sum(reference(*a, positions=pos, segment_ids=seg, **kw) * do),
                         (0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
        assert relative_error(g, r) < 1e-5


def test_fully_masked_rows_are_finite_zero():
    q, k, v, do = _inputs(t=16)
    qpos = jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1))
    kpos = qpos + 100  # every key is in the future of every query
    seg = jnp.ones((2, 16), jnp.int32)
    out, lse = flash.flash_forward(q, k, v, qpos, kpos, seg, seg, block_q=8, block_k=8)
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
    grads = flash.flash_backward(q, k, v, out, lse, do, qpos, kpos, seg, seg, block_q=8, block_k=8)
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_fit_block():
    assert flash.fit_block(1024, 256) == 256
    assert flash.fit_block(96, 64) == 48
    assert flash.fit_block(7, 512) == 7


@pytest.mark.parametrize("position", [0, 1, 4095, 131_071, 999_999])
def test_rope_angles_accurate_far_out(position):
    head_dim, base = 128, 5e5
    tables = rope.rope_tables(position + 1, head_dim, base)
    cos, sin = rope.cos_sin(jnp.full((1, 1), position, jnp.int32), tables)
    angle = position * rope.inv_frequencies(head_dim, base)
    assert np.max(np.abs(np.asarray(cos[0, 0], np.float64) - np.cos(angle))) < 1e-6
    assert np.max(np.abs(np.asarray(sin[0, 0], np.float64) - np.sin(angle))) < 1e-6


def test_rope_rotates_half_pairs():
    x = jnp.arange(8, dtype=jnp.float32).reshape(1, 1, 1, 8)
    tables = rope.rope_tables(4, 8, 10000.0)
    cos, sin = rope.cos_sin(jnp.full((1, 1), 3, jnp.int32), tables)
    out = np.asarray(rope.apply_rope(x, cos, sin))[0, 0, 0]
    theta = 3 * rope.inv_frequencies(8, 10000.0)
    x1, x2 = np.arange(4.0), np.arange(4.0, 8.0)
    expect = np.concatenate([x1 * np.cos(theta) - x2 * np.sin(theta), x2 * np.cos(theta) + x1 * np.sin(theta)])
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)
