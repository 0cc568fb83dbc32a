"""The Pallas Triton flash-attention kernel (interpret mode on CPU) against the XLA kernel and the dense
reference, plus GPU compile checks that run on CPU (``jax.export`` for CUDA; deviceless AOT when the
``aot`` extra, jax-cuda13-plugin, is importable)."""

import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from lcjax.kernels.flash_attention import pallas_triton as pallas
from lcjax.kernels.flash_attention import xla
from lcjax.ops.attention import reference

TOL = 1e-5


def _inputs(b=1, t=48, n=4, k=2, h=16, s=None, dtype=jnp.float32, seed=0):
    s = t if s is None else s
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    kk = jax.random.normal(ks[1], (b, s, k, h), dtype)
    v = jax.random.normal(ks[2], (b, s, k, h), dtype)
    return q, kk, v, jax.random.normal(ks[3], (b, t, n, h), jnp.float32)


def _positions(b, t, packed):
    """(positions, segment ids) [B, T]: one document, or three packed ones with restarting positions."""
    if not packed:
        return jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1)), jnp.ones((b, t), jnp.int32)
    seg = np.ones((b, t), np.int32)
    seg[:, 20:] = 2
    seg[:, 37:] = 3
    pos = np.concatenate([np.arange(20), np.arange(17), np.arange(t - 37)])
    return jnp.asarray(np.tile(pos, (b, 1)), jnp.int32), jnp.asarray(seg)


def _reference_grads(q, k, v, do, pos, seg, **kw):
    f = lambda *a: jnp.sum(reference(*a, positions=pos, segment_ids=seg, **kw).astype(jnp.float32) * do)
    return jax.grad(f, (0, 1, 2))(q, k, v)


def _check_against_oracles(q, k, v, do, pos, seg, tol=TOL, blocks=(16, 16), **kw):
    bq, bk = blocks
    out, lse = pallas.flash_forward(q, k, v, pos, pos, seg, seg, block_q=bq, block_k=bk, **kw)
    x_out, x_lse = xla.flash_forward(q, k, v, pos, pos, seg, seg, block_q=bq, block_k=bk, **kw)
    assert out.dtype == lse.dtype == jnp.float32
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert relative_error(out, x_out) <= tol
    assert relative_error(jnp.where(jnp.isinf(x_lse), 0, lse), jnp.where(jnp.isinf(x_lse), 0, x_lse)) <= tol
    assert np.array_equal(np.isneginf(lse), np.isneginf(x_lse))
    assert relative_error(out, reference(q, k, v, positions=pos, segment_ids=seg, **kw)) <= tol

    grads = pallas.flash_backward(q, k, v, out, lse, do, pos, pos, seg, seg, block_q=bq, block_k=bk, **kw)
    x_grads = xla.flash_backward(q, k, v, x_out, x_lse, do, pos, pos, seg, seg, block_q=bq, block_k=bk, **kw)
    ref_grads = _reference_grads(q, k, v, do, pos, seg, **kw)
    for g, x, r, like in zip(grads, x_grads, ref_grads, (q, k, v)):
        assert g.dtype == jnp.float32 and g.shape == like.shape
        assert relative_error(g, x) <= tol
        assert relative_error(g, r) <= tol


@pytest.mark.parametrize("causal,window,packed,heads", [
    (True, None, False, (4, 2)),    # causal
    (True, 7, False, (8, 2)),       # causal + window, GQA 4:1
    (True, None, True, (8, 1)),     # packed segments with restarting positions, one kv head
    (False, None, True, (4, 4)),    # non-causal, packed, no GQA
])
def test_matches_xla_and_reference(causal, window, packed, heads):
    n, kh = heads
    q, k, v, do = _inputs(n=n, k=kh)
    pos, seg = _positions(q.shape[0], q.shape[1], packed)
    _check_against_oracles(q, k, v, do, pos, seg, causal=causal, window=window)


def test_backward_uses_the_given_lse_and_out():
    """As in ring attention: out/lse come from a merge over more keys than this call sees."""
    q, k, v, do = _inputs(n=4, k=2)
    pos, seg = _positions(1, 48, packed=True)
    out, lse = xla.flash_forward(q, k, v, pos, pos, seg, seg, block_q=16, block_k=16)
    lse = jnp.where(jnp.isinf(lse), lse, lse + 0.3 * jax.random.uniform(jax.random.key(9), lse.shape))
    out = out * 0.7 + 0.1
    args = (q, k, v, out, lse, do, pos, pos, seg, seg)
    for g, x in zip(pallas.flash_backward(*args, block_q=16, block_k=16),
                    xla.flash_backward(*args, block_q=16, block_k=16)):
        assert relative_error(g, x) <= TOL


def test_fully_masked_rows_are_finite_zero():
    """Queries 16.. belong to a segment no key has, keys 16.. to one no query has: whole tiles masked."""
    q, k, v, do = _inputs(t=32)
    pos = jnp.arange(32, dtype=jnp.int32)[None]
    qseg = jnp.ones((1, 32), jnp.int32).at[:, 16:].set(5)
    kseg = jnp.ones((1, 32), jnp.int32).at[:, 16:].set(7)
    out, lse = pallas.flash_forward(q, k, v, pos, pos, qseg, kseg, block_q=16, block_k=16)
    assert np.all(np.asarray(out[:, 16:]) == 0) and np.all(np.isneginf(np.asarray(lse[:, 16:])))
    assert np.all(np.isfinite(np.asarray(lse[:, :16])))
    x_out, _ = xla.flash_forward(q, k, v, pos, pos, qseg, kseg, block_q=16, block_k=16)
    assert relative_error(out, x_out) <= TOL
    dq, dk, dv = pallas.flash_backward(q, k, v, out, lse, do, pos, pos, qseg, kseg, block_q=16, block_k=16)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in (dq, dk, dv))
    assert np.all(np.asarray(dq[:, 16:]) == 0)
    assert np.all(np.asarray(dk[:, 16:]) == 0) and np.all(np.asarray(dv[:, 16:]) == 0)
    assert np.any(np.asarray(dq[:, :16]) != 0)


def test_bf16_against_float32_reference():
    q, k, v, do = _inputs(n=4, k=2, dtype=jnp.bfloat16)
    pos, seg = _positions(1, 48, packed=True)
    out, lse = pallas.flash_forward(q, k, v, pos, pos, seg, seg, block_q=16, block_k=16)
    assert out.dtype == jnp.float32
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    assert relative_error(out, reference(*f32, positions=pos, segment_ids=seg)) <= 2e-2
    grads = pallas.flash_backward(q, k, v, out, lse, do, pos, pos, seg, seg, block_q=16, block_k=16)
    for g, r in zip(grads, _reference_grads(*f32, do, pos, seg)):
        assert g.dtype == jnp.float32
        assert relative_error(g, r) <= 2e-2


def test_lengths_and_head_dim_that_need_padding():
    """T = 40, S = 24 (not multiples of the 16-tiles), H = 24 (not a power of two), a window."""
    q, k, v, do = _inputs(t=40, s=24, n=4, k=2, h=24)
    qpos = jnp.arange(40, dtype=jnp.int32)[None]
    kpos = jnp.arange(24, dtype=jnp.int32)[None] * 2  # keys at even positions 0..46
    qseg, kseg = jnp.ones((1, 40), jnp.int32), jnp.ones((1, 24), jnp.int32)
    kw = dict(block_q=16, block_k=16, window=9)
    out, lse = pallas.flash_forward(q, k, v, qpos, kpos, qseg, kseg, **kw)
    x_out, x_lse = xla.flash_forward(q, k, v, qpos, kpos, qseg, kseg, **kw)
    assert out.shape == q.shape and lse.shape == (1, 40, 4)
    assert relative_error(out, x_out) <= TOL
    grads = pallas.flash_backward(q, k, v, out, lse, do, qpos, kpos, qseg, kseg, **kw)
    x_grads = xla.flash_backward(q, k, v, x_out, x_lse, do, qpos, kpos, qseg, kseg, **kw)
    for g, x, like in zip(grads, x_grads, (q, k, v)):
        assert g.shape == like.shape
        assert relative_error(g, x) <= TOL


def test_invalid_arguments_raise_value_error():
    q, k, v, _ = _inputs(t=16, n=4, k=2)
    pos, seg = _positions(1, 16, packed=False)
    with pytest.raises(ValueError, match="divisible"):
        pallas.flash_forward(q[:, :, :3], k, v, pos, pos, seg, seg)
    with pytest.raises(ValueError, match="block size"):
        pallas.flash_forward(q, k, v, pos, pos, seg, seg, block_q=0)
    with pytest.raises(ValueError, match="same shape"):
        pallas.flash_backward(q, k, v[:, :8], q, seg, q, pos, pos, seg, seg)


def test_tiles_are_powers_of_two_and_capped():
    assert pallas._tile(512, 128, 4096) == 128
    assert pallas._tile(48, 128, 4096) == 32
    assert pallas._tile(8, 128, 4096) == 16
    assert pallas._tile(512, 128, 40) == 64
    assert pallas._head_dim(24) == 32 and pallas._head_dim(8) == 16 and pallas._head_dim(128) == 128


# ----------------------------------------------------------------------------- GPU compile checks on CPU

GPU_SHAPE = dict(b=1, t=4096, n=32, k=8, h=128)  # bf16, one LLaMA-style layer on one GPU


def _abstract_args(sharding=None, b=1, t=4096, n=32, k=8, h=128):
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    q, kv = sds((b, t, n, h), jnp.bfloat16), sds((b, t, k, h), jnp.bfloat16)
    ints, lse, f32 = sds((b, t), jnp.int32), sds((b, t, n), jnp.float32), sds((b, t, n, h), jnp.float32)
    return (q, kv, kv, ints, ints), (q, kv, kv, f32, lse, q, ints, ints)


def _gpu_fns(**kw):
    def fwd(q, k, v, pos, seg):
        return pallas.flash_forward(q, k, v, pos, pos, seg, seg, interpret=False, **kw)

    def bwd(q, k, v, out, lse, dout, pos, seg):
        return pallas.flash_backward(q, k, v, out, lse, dout, pos, pos, seg, seg, interpret=False, **kw)

    return fwd, bwd


@pytest.mark.parametrize("window", [None, 1024])
def test_lowers_for_cuda(window):
    """Lowers the Triton kernels for CUDA: catches ops Triton lacks and non-power-of-two tiles."""
    disabled = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    fwd, bwd = _gpu_fns(window=window)
    fwd_args, bwd_args = _abstract_args(**GPU_SHAPE)
    for f, args, n_kernels in ((fwd, fwd_args, 1), (bwd, bwd_args, 2)):
        exported = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=disabled)(*args)
        assert exported.mlir_module().count("__gpu$xla.gpu.triton") == n_kernels


def _gpu_targets_dir() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpu_targets"
    return Path(os.environ.get("LCJAX_GPU_TARGETS", default))


def _cuda_plugin_importable() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda13") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not _cuda_plugin_importable(),
                    reason="deviceless GPU compile needs the `aot` extra (jax-cuda13-plugin)")
@pytest.mark.parametrize("target", ["h100_sxm", "h200"])
def test_compiles_for_gpu_without_one(target):
    """Deviceless AOT compile with XLA's GPU pipeline: catches shared-memory overflow of the tiles."""
    spec = _gpu_targets_dir() / f"{target}.txtpb"
    if not spec.exists():
        pytest.skip(f"GPU description {spec} not found (set LCJAX_GPU_TARGETS)")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc("", "cuda", target_config=spec.read_text(), topology="1x1x1")
    mesh = topologies.make_mesh(topo, (1,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    fwd, bwd = _gpu_fns(window=1024)
    fwd_args, bwd_args = _abstract_args(sharding, **GPU_SHAPE)
    for f, args in ((fwd, fwd_args), (bwd, bwd_args)):
        jax.jit(f).lower(*args).compile()  # RESOURCE_EXHAUSTED when a tile overflows shared memory
