import numpy as np
import pytest

from lcjax.ops.layout import inverse_permutation, permute, permutation, unpermute


def test_design_examples():
    x = np.arange(16)[None]
    assert permute(x, "zigzag", 4)[0].tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    assert permute(x, "striped", 4)[0].tolist() == [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15]
    assert permute(x, "contiguous", 4)[0].tolist() == list(range(16))


@pytest.mark.parametrize("layout", ["zigzag", "striped", "contiguous"])
@pytest.mark.parametrize("shards", [1, 2, 4, 8])
def test_round_trip_numpy_and_jax(layout, shards):
    import jax.numpy as jnp

    x = np.random.default_rng(0).normal(size=(2, 64, 3))
    np.testing.assert_array_equal(unpermute(permute(x, layout, shards), layout, shards), x)
    y = permute(jnp.asarray(x), layout, shards)
    np.testing.assert_array_equal(np.asarray(unpermute(y, layout, shards)), x.astype(np.float32))
    perm, inv = permutation(64, layout, shards), inverse_permutation(64, layout, shards)
    np.testing.assert_array_equal(perm[inv], np.arange(64))


def test_positions_follow_tokens():
    positions = np.tile(np.arange(32), (2, 1))
    tokens = np.random.default_rng(1).integers(0, 100, (2, 32))
    p, t = permute(positions, "zigzag", 4), permute(tokens, "zigzag", 4)
    np.testing.assert_array_equal(np.take_along_axis(tokens, p, axis=1), t)  # position k holds token p[k]


def test_zigzag_shard_holds_chunks_i_and_2p_minus_1_minus_i():
    p = 4
    x = permute(np.arange(64)[None], "zigzag", p)[0].reshape(p, -1)
    chunks = np.arange(64).reshape(2 * p, -1)
    for i in range(p):
        np.testing.assert_array_equal(x[i], np.concatenate([chunks[i], chunks[2 * p - 1 - i]]))


@pytest.mark.parametrize("layout,length,shards", [("zigzag", 12, 4), ("striped", 10, 4), ("bogus", 8, 2)])
def test_bad_lengths_raise(layout, length, shards):
    with pytest.raises(ValueError, match="seq_len|layout"):
        permutation(length, layout, shards)
