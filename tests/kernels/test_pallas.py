"""The flash-attention kernels against the dense reference (Pallas Triton in interpret mode on CPU), their
loop bounds, their tile table, and what they compile to on a GPU without one: ``jax.export`` for CUDA, and
a deviceless H100 compile (the ``aot`` extra, jax-cuda13-plugin) whose PTX must show asynchronous loads
and full-size ``wgmma`` in every matmul kernel."""

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import relative_error
from lcjax.kernels.flash_attention import pallas_triton as pallas
from lcjax.kernels.flash_attention import ptx, tiling, triton_tiles, xla
from lcjax.kernels.flash_attention.api import KERNELS, get_kernel, is_pallas
from lcjax.ops.attention import reference, visible

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
BF16_TOL = 2e-2
KERNEL_MODULES = {"xla": xla, "pallas_triton": pallas}  # every distinct kernel module of api.KERNELS


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


def _irregular_layout():
    """(positions, segment ids) int32 [2, 40] that break every monotonicity assumption.

    Row 0: document 1 (positions 0..12); document 7 with a constant position 5; a padding segment 0 (all
    at position 0); document 1 again further on (positions 13..22: a reused id, continuing); document 3
    with decreasing positions 7..0. Row 1: one 40-token document in a zigzag-like chunk order
    (0-9, 30-39, 10-19, 20-29), so its tiles' position ranges interleave.
    """
    pos0 = np.concatenate([np.arange(13), np.full(5, 5), np.zeros(4), np.arange(13, 23), np.arange(7, -1, -1)])
    seg0 = np.concatenate([np.full(13, 1), np.full(5, 7), np.zeros(4), np.full(10, 1), np.full(8, 3)])
    pos1 = np.concatenate([np.arange(0, 10), np.arange(30, 40), np.arange(10, 20), np.arange(20, 30)])
    seg1 = np.ones(40)
    return jnp.asarray(np.stack([pos0, pos1]), jnp.int32), jnp.asarray(np.stack([seg0, seg1]), jnp.int32)


def _reference_grads(q, k, v, do, pos, seg, **kw):
    f = lambda *a: jnp.sum(reference(*a, positions=pos, segment_ids=seg, **kw).astype(jnp.float32) * do)
    return jax.grad(f, (0, 1, 2))(q, k, v)


def _run(kernel, q, k, v, do, pos, seg, **kw):
    """(out, lse, (dq, dk, dv)) of one kernel module, each pass jitted once."""
    fwd = jax.jit(functools.partial(kernel.flash_forward, **kw))
    bwd = jax.jit(functools.partial(kernel.flash_backward, **kw))
    out, lse = fwd(q, k, v, pos, pos, seg, seg)
    return out, lse, bwd(q, k, v, out, lse, do, pos, pos, seg, seg)


def _check_against_reference(kernel, q, k, v, do, pos, seg, tol=TOL, blocks=(16, 16), **kw):
    """Forward, dq, dk, dv of ``kernel`` against the dense float32 reference (relative error <= tol)."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out, lse, grads = _run(kernel, q, k, v, do, pos, seg, block_q=blocks[0], block_k=blocks[1], **kw)
    assert out.dtype == lse.dtype == jnp.float32
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert relative_error(out, reference(*f32, positions=pos, segment_ids=seg, **kw)) <= tol
    for g, r, like in zip(grads, _reference_grads(*f32, do, pos, seg, **kw), (q, k, v)):
        assert g.dtype == jnp.float32 and g.shape == like.shape
        assert relative_error(g, r) <= tol
    return out, lse, grads


@pytest.mark.parametrize("name", sorted(KERNEL_MODULES))
def test_kernel_matches_reference_on_irregular_layouts(name):
    """Packed documents with a padding segment, constant and decreasing positions, a reused segment id,
    interleaved tile ranges, a window, GQA 4:2, and T = 40 (not a multiple of the 16-token tiles)."""
    q, k, v, do = _inputs(b=2, t=40, n=4, k=2)
    pos, seg = _irregular_layout()
    _check_against_reference(KERNEL_MODULES[name], q, k, v, do, pos, seg, causal=True, window=9)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KERNEL_MODULES))
@pytest.mark.parametrize("causal,window,packed,heads", [
    (True, None, False, (4, 2)),    # causal
    (True, 7, False, (8, 2)),       # causal + window, GQA 4:1
    (True, None, True, (8, 1)),     # packed segments with restarting positions, one kv head
    (False, None, True, (4, 4)),    # non-causal, packed, no GQA
])
def test_kernel_matches_reference(name, causal, window, packed, heads):
    n, kh = heads
    q, k, v, do = _inputs(n=n, k=kh)
    pos, seg = _positions(q.shape[0], q.shape[1], packed)
    _check_against_reference(KERNEL_MODULES[name], q, k, v, do, pos, seg, causal=causal, window=window)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KERNEL_MODULES))
def test_bf16_against_float32_reference(name):
    q, k, v, do = _inputs(b=2, t=40, n=4, k=2, dtype=jnp.bfloat16)
    pos, seg = _irregular_layout()
    _check_against_reference(KERNEL_MODULES[name], q, k, v, do, pos, seg, tol=BF16_TOL, window=9)


@pytest.mark.slow
def test_irregular_layouts_with_default_tiles_and_non_causal():
    """The table's (Hopper) tiles in interpret mode: one tile covers the whole sequence."""
    q, k, v, do = _inputs(b=2, t=40, n=4, k=2)
    pos, seg = _irregular_layout()
    _check_against_reference(pallas, q, k, v, do, pos, seg, blocks=(None, None), causal=False)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    with pytest.raises(ValueError, match=r"^query heads 3 must be divisible by kv heads 2$"):
        pallas.flash_forward(q[:, :, :3], k, v, pos, pos, seg, seg)
    with pytest.raises(ValueError, match="block size"):
        pallas.flash_forward(q, k, v, pos, pos, seg, seg, block_q=0)
    with pytest.raises(ValueError, match="same shape"):
        pallas.flash_backward(q, k, v[:, :8], q, seg, q, pos, pos, seg, seg)


def test_kernel_names():
    assert get_kernel("pallas") is get_kernel("pallas_triton") is pallas
    assert get_kernel("xla") is xla
    assert is_pallas("pallas") and is_pallas("pallas_triton") and not is_pallas("xla")
    assert set(KERNEL_MODULES) | {"pallas", "cudnn", "pallas_mosaic"} == set(KERNELS)  # tests/kernels/test_cudnn.py, test_mosaic.py
    assert not is_pallas("cudnn")
    with pytest.raises(ValueError, match="must be one of"):
        get_kernel("triton")


# ------------------------------------------------------------------------------------------ loop bounds

def _bounds_cases():
    """(positions, segment ids, length) int32 [B, Lp]: irregular layouts, random ones, padding."""
    pos, seg = _irregular_layout()
    edge = lambda x: np.pad(np.asarray(x), ((0, 0), (0, 8)), mode="edge")  # 40 real tokens of 48
    yield edge(pos), edge(seg), 40
    rng = np.random.default_rng(0)
    yield rng.integers(0, 30, (2, 48)), rng.integers(0, 3, (2, 48)), 48  # random positions and ids
    yield rng.integers(0, 30, (2, 64)), np.repeat(rng.integers(0, 3, (2, 8)), 8, axis=1), 53  # runs, padding


@pytest.mark.parametrize("causal,window", [(True, None), (True, 6), (False, None)])
def test_loop_bounds_are_conservative(causal, window):
    """Every visible (query, key) pair lies in a tile inside [lo, hi) of its query tile, every tile in
    [flo, fhi) is entirely visible (and unpadded), and the bounds are ordered — for any positions."""
    tile_q, tile_k = 8, 16
    for pos, seg, length in _bounds_cases():
        vis = np.array(visible(pos, pos, seg, seg, causal=causal, window=window))
        valid = np.arange(pos.shape[1]) < length
        vis &= valid[None, :, None] & valid[None, None, :]
        args = [jnp.asarray(x, jnp.int32) for x in (pos, seg, pos, seg)]
        kw = dict(tile_q=tile_q, tile_k=tile_k, t_len=length, s_len=length, causal=causal, window=window)
        bnd, bk = (np.asarray(tiling.bounds(*args, **kw, by_key=by_key)) for by_key in (False, True))
        lo, flo, fhi, hi = np.moveaxis(bnd, -1, 0)
        assert np.all((lo <= flo) & (flo <= fhi) & (fhi <= hi))
        b_idx, qi, kj = np.nonzero(vis)
        qt, kt = qi // tile_q, kj // tile_k
        assert np.all((lo[b_idx, qt] <= kt) & (kt < hi[b_idx, qt]))
        for b in range(pos.shape[0]):
            for i in range(bnd.shape[1]):
                for j in range(flo[b, i], fhi[b, i]):
                    assert vis[b, i * tile_q:(i + 1) * tile_q, j * tile_k:(j + 1) * tile_k].all()
        # by key (dK/dV): every visible pair's query tile lies in its key tile's range
        assert np.all((bk[b_idx, kt, 0] <= qt) & (qt < bk[b_idx, kt, 3]))


def test_loop_bounds_of_a_causal_sequence_split_masked_and_full_tiles():
    """One causal document in 4 tiles: query tile i loops over key tiles 0..i, all but the diagonal full
    (no full run: flo = fhi = hi); with a window of 40, tiles wholly more than 40 back are skipped."""
    pos = jnp.arange(64, dtype=jnp.int32)[None]
    seg = jnp.zeros_like(pos)
    bnd = tiling.bounds(pos, seg, pos, seg, tile_q=16, tile_k=16, t_len=64, s_len=64, causal=True, window=None)
    assert np.asarray(bnd[0]).tolist() == [[0, 1, 1, 1], [0, 0, 1, 2], [0, 0, 2, 3], [0, 0, 3, 4]]
    bnd = tiling.bounds(pos, seg, pos, seg, tile_q=16, tile_k=16, t_len=64, s_len=64, causal=True, window=40)
    assert np.asarray(bnd[0]).tolist() == [[0, 1, 1, 1], [0, 0, 1, 2], [0, 1, 2, 3], [0, 2, 3, 4]]


# ----------------------------------------------------------------------------------------------- tiles

def test_tile_table_lookup_and_overrides():
    h100 = ("gpu", "NVIDIA H100 80GB HBM3")
    cfgs = pallas.pass_configs(jnp.bfloat16, 128, 4096, 4096, device=h100)
    assert [cfgs[p][:2] for p in ("fwd", "dkv", "dq")] == [(128, 128), (64, 128), (128, 64)]
    assert pallas.pass_configs(jnp.bfloat16, 128, 4096, 4096, device=("gpu", "NVIDIA H200")) == cfgs
    assert pallas.pass_configs(jnp.bfloat16, 128, 4096, 4096, device=("cpu", None)) == cfgs  # interpreter
    small = pallas.pass_configs(jnp.bfloat16, 128, 4096, 4096, device=("gpu", "Some Future GPU"))
    assert all(triton_tiles.shared_memory_bytes(p, c.block_q, c.block_k, 128, 2, c.num_stages)
               <= triton_tiles.SHARED_MEMORY["default"] for p, c in small.items())
    over = pallas.pass_configs(jnp.bfloat16, 128, 4096, 4096, block_q=48, block_k=512, device=h100)
    assert all(c[:2] == (32, 128) for c in over.values())  # power of two below 48; capped at 128
    assert pallas.pass_configs(jnp.float32, 24, 40, 24, 16, 16, device=h100)["fwd"][:2] == (16, 16)
    assert pallas.pass_configs(jnp.bfloat16, 128, 40, 40, device=h100)["fwd"][:2] == (64, 64)  # short
    explicit = pallas.pass_configs(jnp.bfloat16, 128, 4096, 4096, 16, 16, device=h100, configs={"dq": [64, 32, 4, 3]})
    assert explicit["dq"] == (64, 32, 4, 3) and explicit["fwd"][:2] == (16, 16)  # autotuning's explicit configs
    assert triton_tiles.clamp_tile(8, 4096) == 16 and pallas._head_dim(24) == 32 and pallas._head_dim(8) == 16
    with pytest.raises(ValueError, match="block size"):
        triton_tiles.clamp_tile(0, 64)


def test_tile_table_entries_are_valid():
    table = triton_tiles.load_table()
    assert ("h100", 128, "bfloat16") in table
    for cfgs in table.values():
        assert set(cfgs) == set(triton_tiles.PASSES)


# ------------------------------------------------------------------------------ GPU compile checks on CPU

def test_ptx_facts_and_hopper_problems():
    good = ".visible .entry k(\n cp.async.cg.shared.global [%r1], [%rd2], 16;\n cp.async.commit_group;\n" \
           " wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, 0, 1, 1, 0, 0;\n"
    facts = ptx.parse(good)
    assert (facts.name, facts.cp_async, facts.cp_async_bulk, facts.wgmma, facts.mma_sync) == ("k", 1, 0, {128: 1}, 0)
    assert ptx.hopper_problems(facts) == []
    bad = ".entry d(\n ld.global.v4.b32 {%r1}, [%rd1];\n wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 x;\n" \
          " mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 x;\n"
    problems = " ".join(ptx.hopper_problems(ptx.parse(bad)))
    assert "no asynchronous" in problems and "N = [16]" in problems and "mma.sync" in problems
    assert ptx.parse(".entry f(\n cp.async.bulk.tensor.2d.shared::cluster.global x;\n").cp_async_bulk == 1
    assert ptx.hopper_problems(ptx.parse(".entry add(\n add.f32 %f1, %f2, %f3;\n")) == []  # no matmul


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


def test_lowers_for_cuda():
    """Lowers the Triton kernels for CUDA: catches ops Triton lacks and non-power-of-two tiles."""
    disabled = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    fwd, bwd = _gpu_fns(window=1024)
    fwd_args, bwd_args = _abstract_args(**GPU_SHAPE)
    for f, args, n_kernels in ((fwd, fwd_args, 1), (bwd, bwd_args, 2)):
        exported = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=disabled)(*args)
        assert exported.mlir_module().count("__gpu$xla.gpu.triton") == n_kernels


def _cuda_plugin_importable() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda13") is not None
    except ModuleNotFoundError:
        return False


needs_aot = pytest.mark.skipif(not _cuda_plugin_importable(),
                               reason="deviceless GPU compile needs the `aot` extra (jax-cuda13-plugin)")


def _kernel_ptx_script():
    spec = importlib.util.spec_from_file_location("kernel_ptx", ROOT / "scripts" / "kernel_ptx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_aot
def test_public_entry_compiles_to_pipelined_full_size_wgmma_on_h100(tmp_path):
    """Deviceless H100 compile of lcjax.attention.attention (kernel pallas_triton, forward + backward,
    bf16, T = 4096, 32/8 heads x 128, default tiles): each of the three Triton kernels loads its tiles
    asynchronously, uses wgmma with N >= 64 and no mma.sync (the kernels before issue 17 failed all three)."""
    lowered = _kernel_ptx_script().attention_lowered("h100", "pallas_triton", seq_len=4096, heads=32, kv_heads=8,
                                                     head_dim=128, dtype="bfloat16")
    facts = ptx.compile_and_read(lowered, tmp_path)
    names = {k.name for k in facts if k.is_matmul}
    assert {"lcjax_flash_fwd", "lcjax_flash_bwd_dkv", "lcjax_flash_bwd_dq"} <= names, [k.summary() for k in facts]
    problems = [p for k in facts for p in ptx.hopper_problems(k)]
    assert not problems, problems


@pytest.mark.slow
@needs_aot
@pytest.mark.parametrize("target,dtype,head_dim,window", [
    ("h200", "bfloat16", 128, 1024), ("h100", "bfloat16", 64, None), ("h100", "bfloat16", 256, None),
    ("h100", "float32", 128, None), ("a100", "bfloat16", 128, None)])
def test_tuned_tiles_fit_shared_memory(target, dtype, head_dim, window):
    """Deviceless compiles of the table's entries: RESOURCE_EXHAUSTED when a tile overflows shared memory."""
    lowered = _kernel_ptx_script().attention_lowered(target, "pallas_triton", seq_len=4096, heads=8, kv_heads=2,
                                                     head_dim=head_dim, dtype=dtype, window=window)
    lowered.compile()
