"""The Mosaic GPU flash kernels (attention.kernel pallas_mosaic).

Numerics on CPU run the real kernels in JAX's Mosaic GPU interpreter (``jax._src.pallas.mosaic_gpu.interpret``:
simulated warpgroups, shared memory, TMA, mbarriers; the matmuls as float32-accumulating dots), against the
dense float32 reference. The GPU structure is checked by a deviceless H100 compile of the public entry whose
Mosaic PTX and ptxas reports must show TMA loads, wgmma with N >= 64, no mma.sync and no spills (needs the
``aot`` extra). No test here runs on a GPU: parity on an H100/H200 is still to be recorded (docs/kernels.md).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import relative_error
from lcjax.config import Config, ModelConfig, TrainConfig, AttentionConfig, validate
from lcjax.kernels.flash_attention import pallas_mosaic as mosaic
from lcjax.kernels.flash_attention import ptx, xla
from lcjax.kernels.flash_attention.api import get_kernel, is_pallas
from lcjax.ops.attention import reference
from tests.kernels.test_pallas import _inputs, _irregular_layout, _kernel_ptx_script, _reference_grads, needs_aot

BF16_TOL = 2e-2  # bf16 inputs, probabilities and dS rounded to bf16 before the second matmul (FlashAttention)
LSE_TOL = 1e-4  # absolute, natural log


def _check(q, k, v, do, q_pos, k_pos, q_seg, k_seg, **kw):
    """Forward (out, lse) and the three gradients of the interpreted kernels against float32 references."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out, lse = jax.jit(lambda *a: mosaic.flash_forward(*a, **kw))(q, k, v, q_pos, k_pos, q_seg, k_seg)
    assert out.dtype == lse.dtype == jnp.float32 and out.shape == q.shape and lse.shape == q.shape[:3]
    x_out, x_lse = xla.flash_forward(*f32, q_pos, k_pos, q_seg, k_seg, **kw)  # the float32 oracle
    assert relative_error(out, x_out) <= BF16_TOL
    seen = np.isfinite(np.asarray(x_lse))
    assert np.all(np.isneginf(np.asarray(lse)[~seen]))
    assert np.max(np.abs(np.asarray(lse)[seen] - np.asarray(x_lse)[seen])) <= LSE_TOL
    grads = jax.jit(lambda *a: mosaic.flash_backward(*a, **kw))(q, k, v, out, lse, do, q_pos, k_pos, q_seg, k_seg)
    x_grads = xla.flash_backward(*f32, x_out, x_lse, do, q_pos, k_pos, q_seg, k_seg, **kw)
    for g, x, like in zip(grads, x_grads, (q, k, v)):
        assert g.dtype == jnp.float32 and g.shape == like.shape
        assert relative_error(g, x) <= BF16_TOL
    return out, lse, grads


@pytest.mark.slow  # 20 s in the interpreter; the irregular-layouts case below stays in the default suite
def test_interpreter_matches_reference_with_pipeline_wraparound(monkeypatch):
    """128 queries at positions 128..255 over 256 keys: two documents (boundary at 160), causal, window
    100, GQA 2:1, H = 64. With two pipeline slots every kernel refills slots (4 key tiles per query block;
    2 query tiles x 2 heads per key block), and the loops see skipped, masked and full tiles."""
    for name in ("fwd", "dq", "dkv"):
        monkeypatch.setitem(mosaic.TILES, name, mosaic.PassTiles(64, 64, 2))
    q, k, v, do = _inputs(b=1, t=128, s=256, n=2, k=1, h=64, dtype=jnp.bfloat16)
    k_pos = jnp.arange(256, dtype=jnp.int32)[None]
    q_pos = k_pos[:, 128:]
    k_seg = jnp.where(k_pos < 160, 1, 2).astype(jnp.int32)
    q_seg = k_seg[:, 128:]
    _check(q, k, v, do, q_pos, k_pos, q_seg, k_seg, causal=True, window=100)


@pytest.mark.slow
def test_interpreter_matches_reference_on_irregular_layouts():
    """test_pallas's irregular layouts (padding segment, constant and decreasing positions, reused ids,
    interleaved tile ranges), window 9, GQA 4:2, T = 40 padded to the 128-query blocks; against the dense
    reference too (out and gradients)."""
    q, k, v, do = _inputs(b=2, t=40, n=4, k=2, h=64, dtype=jnp.bfloat16)
    pos, seg = _irregular_layout()
    out, _, grads = _check(q, k, v, do, pos, pos, seg, seg, causal=True, window=9)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    assert relative_error(out, reference(*f32, positions=pos, segment_ids=seg, window=9)) <= BF16_TOL
    for g, r in zip(grads, _reference_grads(*f32, do, pos, seg, window=9)):
        assert relative_error(g, r) <= BF16_TOL


@pytest.mark.slow
def test_interpreter_backward_uses_the_given_lse_and_out_and_masks_empty_rows():
    """As in ring attention (out/lse from a merge over more keys), non-causal, with queries 64.. in a
    segment no key has (lse = −inf: zero gradients) and keys 64.. in one no query has."""
    q, k, v, do = _inputs(b=1, t=128, n=2, k=2, h=64, dtype=jnp.bfloat16)
    pos = jnp.arange(128, dtype=jnp.int32)[None]
    q_seg = jnp.ones((1, 128), jnp.int32).at[:, 64:].set(5)
    k_seg = jnp.ones((1, 128), jnp.int32).at[:, 64:].set(7)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out, lse = xla.flash_forward(*f32, pos, pos, q_seg, k_seg, causal=False)
    lse = jnp.where(jnp.isinf(lse), lse, lse + 0.3 * jax.random.uniform(jax.random.key(9), lse.shape))
    out = out * 0.7 + 0.1
    grads = mosaic.flash_backward(q, k, v, out, lse, do, pos, pos, q_seg, k_seg, causal=False)
    x_grads = xla.flash_backward(*f32, out, lse, do, pos, pos, q_seg, k_seg, causal=False)
    for g, x in zip(grads, x_grads):
        assert relative_error(g, x) <= BF16_TOL
    dq, dk, dv = (np.asarray(g) for g in grads)
    assert np.all(dq[:, 64:] == 0) and np.all(dk[:, 64:] == 0) and np.all(dv[:, 64:] == 0)


# ----------------------------------------------------------------------------------------- refusals

def test_refused_with_one_line_where_it_cannot_run(monkeypatch):
    q, k, v, _ = _inputs(t=64, n=2, k=1, h=64, dtype=jnp.bfloat16)
    pos = jnp.arange(64, dtype=jnp.int32)[None]
    args = (q, k, v, pos, pos, pos, pos)

    def refused(match, *a, **kw):
        with pytest.raises(ValueError, match=match) as e:
            mosaic.flash_forward(*a, **kw)
        assert "\n" not in str(e.value)

    refused("sm_90 GPU", *args, interpret=False)  # compiled for the CPU, interpreter switched off
    with pytest.raises(ValueError, match="sm_90 GPU.*A100"):
        mosaic.resolve_interpret(None, device=("gpu", "NVIDIA A100-SXM4-80GB"))
    assert mosaic.resolve_interpret(None, device=("gpu", "NVIDIA H100 80GB HBM3")) is False
    monkeypatch.setattr(mosaic, "_interpret_params", lambda: None)  # a JAX without the interpreter
    refused("no Mosaic GPU interpreter", *args)
    monkeypatch.undo()
    refused("multiple of 64", q[..., :48], k[..., :48], v[..., :48], *args[3:])
    refused("bfloat16 or all float16", *(x.astype(jnp.float32) for x in (q, k, v)), *args[3:])
    refused("block size", *args, block_q=0)


def test_config_refuses_what_the_kernel_cannot_run():
    base = Config(model=ModelConfig(d_model=256, n_heads=2, n_kv_heads=1), train=TrainConfig(dtype="bfloat16"),
                  attention=AttentionConfig(kernel="pallas_mosaic"))
    validate(base)
    with pytest.raises(ValueError, match="head dim .* multiple of 64 .* got 32"):
        validate(dataclasses.replace(base, model=ModelConfig(d_model=256, n_heads=8, n_kv_heads=1)))
    with pytest.raises(ValueError, match="train.dtype bfloat16 .* got float32"):
        validate(dataclasses.replace(base, train=TrainConfig(dtype="float32")))


def test_registered_as_an_opt_in_pallas_kernel():
    assert get_kernel("pallas_mosaic") is mosaic and is_pallas("pallas_mosaic")
    assert get_kernel("pallas") is not mosaic  # "pallas" selects it only after GPU parity is recorded


def test_tiles_and_overrides():
    tiles = mosaic.pass_tiles()
    assert tiles == mosaic.TILES
    for t in tiles.values():
        assert t.rows % 64 == 0 and t.cols % 64 == 0 and t.stages >= 2
    over = mosaic.pass_tiles(block_q=200, block_k=16)
    assert over["fwd"][:2] == (128, 64) and over["dq"][:2] == (128, 64) and over["dkv"][:2] == (64, 128)


def test_ptxas_reports_and_mosaic_problems():
    report = ptx.parse_ptxas("ptxas info    : Compiling entry function 'k_mosaic_gpu_kernel' for 'sm_90a'\n"
                             "    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
                             "ptxas info    : Used 168 registers, used 16 barriers, 1 bytes smem\n")
    assert report == ptx.PtxasReport("k_mosaic_gpu_kernel", 168, 0, 8, 4)
    kernel = ptx.parse(".entry k_mosaic_gpu_kernel(\n"
                       "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [a], [b];\n"
                       "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {..};\n")
    assert kernel.tma_loads == 1
    assert ptx.mosaic_problems(kernel, report._replace(spill_stores=0, spill_loads=0)) == []
    problems = " ".join(ptx.mosaic_problems(kernel._replace(tma_loads=0), report))
    assert "no TMA loads" in problems and "register spills" in problems
    assert "no ptxas report" in " ".join(ptx.mosaic_problems(kernel, None))


# ------------------------------------------------------------------------------- deviceless H100 compile

MOSAIC_KERNELS = {"lcjax_mosaic_fwd_mosaic_gpu_kernel", "lcjax_mosaic_bwd_dq_mosaic_gpu_kernel",
                  "lcjax_mosaic_bwd_dkv_mosaic_gpu_kernel"}


@needs_aot
def test_public_entry_compiles_to_tma_wgmma_without_spills_on_h100(tmp_path):
    """Deviceless H100 compile of lcjax.attention.attention (kernel pallas_mosaic, forward + backward, bf16,
    T = 4096, 32/8 heads x 128): each of the three Mosaic kernels loads with TMA, uses only wgmma with
    N >= 64, no mma.sync, and ptxas reports no spills."""
    lowered = _kernel_ptx_script().attention_lowered("h100", "pallas_mosaic", seq_len=4096, heads=32, kv_heads=8,
                                                     head_dim=128, dtype="bfloat16")
    kernels = ptx.compile_and_read_mosaic(lowered, tmp_path)
    summary = [(k.summary(), r) for k, r in kernels]
    assert {k.name for k, _ in kernels} == MOSAIC_KERNELS, summary
    assert all(k.tma_loads and k.wgmma and min(k.wgmma) >= ptx.MIN_WGMMA_N for k, _ in kernels), summary
    problems = [p for k, r in kernels for p in ptx.mosaic_problems(k, r)]
    assert not problems, problems


@needs_aot
def test_refused_on_an_a100_target():
    with pytest.raises(ValueError, match="sm_90 GPU") as e:
        _kernel_ptx_script().attention_lowered("a100", "pallas_mosaic", seq_len=256, heads=2, kv_heads=1,
                                               head_dim=64, dtype="bfloat16")
    assert "\n" not in str(e.value)
