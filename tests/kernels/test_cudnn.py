"""attention.kernel cudnn (lcjax.kernels.flash_attention.cudnn).

No cuDNN runs on a CPU host, so the kernel's own logic — which (query tile, key tile) pairs go to cuDNN
with which mask, the log-sum-exp merge, the backward from the final (out, lse) — is tested through the
ring with the two cuDNN calls replaced by dense implementations of their documented semantics (``_fake_*``:
cuDNN's top-left causal mask and sliding window, its float32 softmax statistics, outputs in the input
dtype, the FlashAttention-2 backward from given O and L). The real custom calls are checked by a deviceless
H100 compile; parity with cuDNN itself runs only on a GPU host
(``JAX_PLATFORMS=cpu,cuda pytest tests/kernels/test_cudnn.py -k gpu``; also the parity stage of
scripts/gpu_bench.sh).
"""

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.conftest import relative_error

from lcjax import config as config_lib
from lcjax.attention import attention
from lcjax.kernels.flash_attention import cudnn
from lcjax.ops.attention import reference
from lcjax.sharding.mesh import make_mesh

ROOT = Path(__file__).resolve().parents[2]
F32 = jnp.float32


# ------------------------------------------------------------------ dense stand-ins for the two cuDNN calls

def _dense_scores(q, k, v, scale, diagonal, window):
    g = q.shape[2] // k.shape[2]
    kk, vv = (jnp.repeat(x, g, axis=2).astype(F32) for x in (k, v))
    s = jnp.einsum("btnh,bsnh->bnts", q.astype(F32), kk) * scale
    i, j = jnp.arange(q.shape[1])[:, None], jnp.arange(k.shape[1])[None]
    mask = jnp.ones((q.shape[1], k.shape[1]), bool)
    if diagonal:  # cuDNN's CAUSAL: top-left aligned; sliding window W: (i − W, i]
        mask = j <= i
        if window is not None:
            mask &= i - j < window
    return jnp.where(mask, s, -jnp.inf), mask, kk, vv


def _fake_forward(q, k, v, *, scale, diagonal, window):
    s, _, _, vv = _dense_scores(q, k, v, scale, diagonal, window)
    lse = jax.nn.logsumexp(s, axis=-1)  # [B, N, T], float32
    out = jnp.einsum("bnts,bsnh->btnh", jnp.exp(s - lse[..., None]), vv).astype(q.dtype)  # input dtype
    return out.astype(F32), jnp.transpose(lse, (0, 2, 1))


def _fake_backward(q, k, v, out, lse, dout, *, scale, diagonal, window):
    s, mask, kk, vv = _dense_scores(q, k, v, scale, diagonal, window)
    b, t_s, kh, h = k.shape
    p = jnp.where(mask, jnp.exp(s - jnp.transpose(lse, (0, 2, 1))[..., None]), 0.0)
    do, o = (x.astype(q.dtype).astype(F32) for x in (dout, out))
    group_sum = lambda x: x.reshape(b, t_s, kh, -1, h).sum(3)
    dv = group_sum(jnp.einsum("bnts,btnh->bsnh", p, do))
    ds = p * (jnp.einsum("btnh,bsnh->bnts", do, vv) - jnp.transpose(jnp.sum(do * o, -1), (0, 2, 1))[..., None])
    dq = scale * jnp.einsum("bnts,bsnh->btnh", ds, kk)
    dk = group_sum(scale * jnp.einsum("bnts,btnh->bsnh", ds, q.astype(F32)))
    return tuple(x.astype(q.dtype).astype(F32) for x in (dq, dk, dv))


@pytest.fixture
def fake_cudnn(monkeypatch):
    monkeypatch.setattr(cudnn, "_cudnn_forward", _fake_forward)
    monkeypatch.setattr(cudnn, "_cudnn_backward", _fake_backward)


def _inputs(b=2, t=64, n=4, kv=2, h=16, dtype=jnp.bfloat16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    k = jax.random.normal(ks[1], (b, t, kv, h), dtype)
    v = jax.random.normal(ks[2], (b, t, kv, h), dtype)
    do = jax.random.normal(ks[3], (b, t, n, h), F32)
    return q, k, v, do


def test_stand_in_matches_jax_documented_residual():
    """The stand-in's (out, lse) are jax.nn.dot_product_attention's (out, residual) on its XLA path, whose
    residual the API documents as the same log-sum-exp for both implementations (float32 inputs here, so
    the XLA path does not round the residual)."""
    q, k, v, _ = _inputs(b=1, t=32, dtype=F32)
    for causal, window in ((False, None), (True, None), (True, 5)):
        ours = _fake_forward(q, k, v, scale=0.3, diagonal=causal, window=window)
        theirs = jax.nn.dot_product_attention(q, k, v, scale=0.3, is_causal=causal, implementation="xla",
                                              local_window_size=None if window is None else (window - 1, 0),
                                              return_residual=True)
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ classification

def _cls(qp, kp, qs=None, ks=None, causal=True, window=None):
    qp, kp = jnp.asarray(qp, jnp.int32)[None], jnp.asarray(kp, jnp.int32)[None]
    qs = jnp.zeros_like(qp) if qs is None else jnp.asarray(qs, jnp.int32)[None]
    ks = jnp.zeros_like(kp) if ks is None else jnp.asarray(ks, jnp.int32)[None]
    return cudnn.CLASSES[int(cudnn.pair_class(qp, kp, qs, ks, causal=causal, window=window))]


def test_pair_classes():
    r = np.arange(8)
    assert _cls(r + 8, r) == "full"  # every key before every query
    assert _cls(r, r + 8) == "empty"  # every key after every query
    assert _cls(r + 5, r + 5) == "diagonal"  # the same contiguous range: cuDNN's top-left causal mask
    assert _cls(r, r + 4) == "unsupported"  # causal at an offset: not cuDNN's diagonal
    assert _cls(r, r[::-1]) == "unsupported"  # not contiguous
    assert _cls(r, r, qs=r // 4, ks=r // 4) == "unsupported"  # documents inside the tile
    assert _cls(r + 8, r, qs=r * 0 + 1) == "empty"  # another document
    assert _cls(r, r + 4, causal=False) == "full"
    assert _cls(r + 5, r + 5, window=3) == "diagonal"  # cuDNN's sliding window on the diagonal
    assert _cls(r + 8, r, window=16) == "full"  # max q − min k = 15 < 16
    assert _cls(r + 8, r, window=15) == "unsupported"  # a window cutting an off-diagonal pair
    assert _cls(r + 16, r, window=9) == "empty"  # every key ≥ 9 behind every query
    rows = jnp.stack([jnp.arange(8) + 8, jnp.arange(8) + 8]), jnp.stack([jnp.arange(8), jnp.arange(8) + 8])
    seg = jnp.zeros((2, 8), jnp.int32)
    assert cudnn.CLASSES[int(cudnn.pair_class(*rows, seg, seg, causal=True, window=None))] == "unsupported"


def test_unexpressible_pairs_give_nan_not_a_wrong_number(fake_cudnn):
    q, k, v, do = _inputs(b=1, t=16)
    pos = jnp.arange(16, dtype=jnp.int32)[None]
    seg = jnp.zeros_like(pos)
    out, lse = cudnn.flash_forward(q, k, v, pos, pos + 4, seg, seg)  # causal at an offset of 4
    assert np.isnan(np.asarray(out)).all() and np.isnan(np.asarray(lse)).all()
    grads = cudnn.flash_backward(q, k, v, out, lse, do, pos, pos + 4, seg, seg)
    assert all(np.isnan(np.asarray(g)).all() for g in grads)


# ------------------------------------------------------------------ the kernel under the ring (fake cuDNN)

@pytest.mark.parametrize("impl,layout,window,shards", [
    ("ring", "zigzag", None, 4), ("ring", "contiguous", None, 4), ("hybrid", "zigzag", None, 4),
    ("ulysses", "contiguous", 24, 4), ("local", "zigzag", 20, 1)])
def test_kernel_matches_reference_forward_and_gradients(fake_cudnn, impl, layout, window, shards):
    """Forward and dq/dk/dv equal the dense float32 reference (bf16 tolerance): the ring's tiles, the
    pair classes of every ring step, the merge and the backward from the final (out, lse) are right. Rows
    start at different positions (0 and 1000): classes come from differences, the same for every row."""
    from lcjax.ops.layout import permute

    q, k, v, do = _inputs(t=32)
    t = q.shape[1]
    pos_nat = jnp.stack([jnp.arange(t), jnp.arange(t) + 1000]).astype(jnp.int32)
    pos = permute(pos_nat, layout, shards)
    mesh = make_mesh(1, shards, 1)
    f32 = lambda x: x.astype(F32)

    ours = lambda q, k, v: attention(permute(q, layout, shards), permute(k, layout, shards),
                                     permute(v, layout, shards), positions=pos, mesh=mesh, impl=impl,
                                     layout=layout, kernel="cudnn", window=window,
                                     ulysses_size=2 if impl == "hybrid" else None).astype(F32)
    ref = lambda q, k, v: permute(reference(q, k, v, positions=pos_nat, window=window), layout, shards)
    def out_and_grads(fn, *args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(permute(do, layout, shards))

    with jax.default_matmul_precision("highest"):
        out, grads = jax.jit(lambda *a: out_and_grads(ours, *a))(q, k, v)
        ref_out, ref_grads = jax.jit(lambda *a: out_and_grads(ref, *a))(f32(q), f32(k), f32(v))
    assert relative_error(out, ref_out) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert relative_error(g, r) < 2e-2


# ------------------------------------------------------------------ refusals

@pytest.mark.parametrize("change,match", [
    (dict(dtype=jnp.float32), "dtype among bfloat16"),
    (dict(h=12), "multiple of 8"),
    (dict(layout="striped"), "contiguous position ranges"),
    (dict(impl="allgather"), "allgather"),
    (dict(impl="ulysses", layout="zigzag"), "needs attention.layout contiguous"),
    (dict(impl="hybrid", ulysses_size=4, layout="zigzag"), "needs attention.layout contiguous"),
    (dict(window=8), "window"),
    (dict(documents=True), "one segment per sequence"),
    (dict(reversed_positions=True), "contiguously"),
])
def test_public_entry_refuses_what_cudnn_cannot_express(change, match):
    c = {**dict(dtype=jnp.bfloat16, h=16, layout="contiguous", impl="ring", window=None, documents=False,
                reversed_positions=False, ulysses_size=None), **change}
    q, k, v, _ = _inputs(b=1, t=32, h=c["h"], dtype=c["dtype"])
    pos = jnp.arange(32, dtype=jnp.int32)[None]
    pos = pos[:, ::-1] if c["reversed_positions"] else pos
    seg = (pos // 16) if c["documents"] else None
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, positions=pos, segment_ids=seg, mesh=make_mesh(1, 4, 1), impl=c["impl"],
                  layout=c["layout"], kernel="cudnn", window=c["window"], ulysses_size=c["ulysses_size"])


def test_kernel_refuses_tiles_it_cannot_mask():
    q, k, v, _ = _inputs(b=1, t=64)
    with pytest.raises(ValueError, match="square tiles"):
        cudnn.check_inputs(q, k, v, 16, 32)
    with pytest.raises(ValueError, match="more than 64"):
        cudnn.check_inputs(q, k, v, 4, 4)
    assert cudnn.check_inputs(q, k, v, 32, 32) == (32, 32) and cudnn.check_inputs(q, k, v) == (64, 64)


def test_a_cpu_program_is_refused_at_trace_time():
    q, k, v, _ = _inputs(b=1, t=16)
    pos = jnp.arange(16, dtype=jnp.int32)[None]
    with pytest.raises(RuntimeError, match="NVIDIA GPUs only"):
        cudnn.flash_forward(q, k, v, pos, pos, pos * 0, pos * 0)


def _cfg(**attention):
    base = config_lib.Config()
    return replace(base, attention=replace(base.attention, kernel="cudnn", **attention),
                   model=replace(base.model, d_model=512, n_heads=4, n_kv_heads=2),
                   train=replace(base.train, dtype="bfloat16"),
                   data=replace(base.data, cross_document_attention=True, seq_len=4096),
                   mesh=replace(base.mesh, sequence=4))


def test_config_rules():
    config_lib.validate(_cfg())
    cases = [
        (lambda c: replace(c, train=replace(c.train, dtype="float32")), "train.dtype bfloat16"),
        (lambda c: replace(c, model=replace(c.model, d_model=4 * 12, d_ff=64)), "multiple of 8"),
        (lambda c: replace(c, data=replace(c.data, cross_document_attention=False)), "cross_document"),
        (lambda c: replace(c, data=replace(c.data, seq_len=4097)), "padded"),
        (lambda c: replace(c, attention=replace(c.attention, window=512)), "attention.window"),
        (lambda c: replace(c, attention=replace(c.attention, layout="striped")), "contiguous or zigzag"),
        (lambda c: replace(c, attention=replace(c.attention, block_q=64)), "square tiles"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            config_lib.validate(change(_cfg()))


def test_config_and_entry_rules_agree():
    """lcjax.config cannot import the kernel (layering): its copy of the impl/layout/window rules must
    refuse exactly what cudnn.layout_refusal refuses."""
    for impl in config_lib.ATTENTION_IMPLS:
        for layout in ("contiguous", "zigzag", "striped", "balanced"):
            for shards in (1, 4):
                for window in (None, 64):
                    for u in ((2, shards) if impl == "hybrid" else (None,)):
                        if impl == "local" and shards > 1 or u == 1:
                            continue
                        cfg = replace(_cfg(impl=impl, layout=layout, window=window, ulysses_size=u),
                                      mesh=replace(_cfg().mesh, sequence=shards))
                        entry = cudnn.layout_refusal(impl, layout, shards, window, u)
                        conf = config_lib._cudnn(cfg)
                        assert (entry is None) == (conf is None), (impl, layout, shards, window, u, entry, conf)


# ------------------------------------------------------------------ deviceless H100: the real custom calls

def _aot_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda13") is not None
    except ModuleNotFoundError:
        return False


_COMPILE = textwrap.dedent("""\
    import re, sys
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from lcjax.attention import attention
    from lcjax.sharding.mesh import deviceless_gpus, make_mesh
    layout = sys.argv[1]
    mesh = make_mesh(1, 4, 1, devices=deviceless_gpus("h100", 4))
    spec = NamedSharding(mesh, P("data", "sequence"))
    q = jax.ShapeDtypeStruct((1, 4096, 32, 128), jnp.bfloat16, sharding=spec)
    kv = jax.ShapeDtypeStruct((1, 4096, 8, 128), jnp.bfloat16, sharding=spec)
    pos = jax.ShapeDtypeStruct((1, 4096), jnp.int32, sharding=spec)
    loss = lambda q, k, v, pos: jnp.sum(attention(q, k, v, positions=pos, mesh=mesh, impl="ring", layout=layout,
                                                  kernel="cudnn").astype(jnp.float32))
    text = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(q, kv, kv, pos).compile().as_text()
    calls = re.findall(r'custom_call_target="([^"]+)"', text)
    print(calls.count("__cudnn$fmhaSoftmax"), calls.count("__cudnn$fmhaSoftmaxBackward"))
    """)


@pytest.mark.skipif(not _aot_available(), reason="deviceless GPU compile needs the `aot` extra")
def test_deviceless_h100_compile_has_the_cudnn_calls():
    """Ring of 4 H100 targets, zigzag, bf16, 32/8 heads × 128, forward + backward: the program compiles
    without the cuDNN library, with cuDNN's forward and backward custom calls for the two cuDNN branches
    (full, diagonal) of each of the 2 × 2 half-block pairs, in each of the 3 traced ring steps (local
    block, loop body, last block)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", _COMPILE, "zigzag"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["24", "24"]


# ------------------------------------------------------------------ GPU only: parity with cuDNN itself

def _gpu():
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        pytest.skip("needs a GPU with cuDNN: JAX_PLATFORMS=cpu,cuda pytest tests/kernels/test_cudnn.py -k gpu")
    return gpus[0]


def test_gpu_parity_forward_and_gradients():
    """bf16, d128, causal, GQA 8/2, T = 1024 on one GPU: forward and dq/dk/dv against the dense float32
    reference (relative error < 2e-2)."""
    gpu = _gpu()
    mesh = make_mesh(1, 1, 1, devices=[gpu])
    q, k, v, do = jax.device_put(_inputs(b=1, t=1024, n=8, kv=2, h=128), gpu)
    pos = jax.device_put(jnp.arange(1024, dtype=jnp.int32)[None], gpu)
    ours = lambda q, k, v: attention(q, k, v, positions=pos, mesh=mesh, impl="local", kernel="cudnn")
    loss = lambda fn: lambda *a: jnp.sum(fn(*a).astype(F32) * do)
    ref = lambda q, k, v: reference(q.astype(F32), k.astype(F32), v.astype(F32), positions=pos)
    out, grads = jax.jit(jax.value_and_grad(loss(ours), (0, 1, 2)))(q, k, v)
    ref_out, ref_grads = jax.jit(jax.value_and_grad(loss(ref), (0, 1, 2)))(q, k, v)
    assert relative_error(jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v)) < 2e-2
    for g, r in zip(grads, ref_grads):
        assert relative_error(g, r) < 2e-2


def test_gpu_two_blocks_merged_and_backward_from_the_final_lse():
    """The ring's use on one GPU: the keys in two blocks (the diagonal block and an earlier, fully visible
    one), their (out, lse) merged, then each block's gradients from the merged (final) out and lse; the
    sums equal the dense reference over both blocks."""
    from lcjax.parallel.ring import merge

    gpu = _gpu()
    mesh = make_mesh(1, 1, 1, devices=[gpu])
    t = 512
    q, k, v, do = jax.device_put(_inputs(b=1, t=2 * t, n=8, kv=2, h=128), gpu)
    pos = jnp.arange(2 * t, dtype=jnp.int32)[None]
    seg = jnp.zeros_like(pos)
    qb, early, late = q[:, t:], slice(0, t), slice(t, 2 * t)
    kw = dict(causal=True)

    def fwd_bwd(qb, k, v, dob):
        out, lse = merge(*cudnn.flash_forward(qb, k[:, late], v[:, late], pos[:, late], pos[:, late],
                                              seg[:, late], seg[:, late], **kw),
                         *cudnn.flash_forward(qb, k[:, early], v[:, early], pos[:, late], pos[:, early],
                                              seg[:, late], seg[:, early], **kw))
        o = out.astype(qb.dtype)
        g1 = cudnn.flash_backward(qb, k[:, late], v[:, late], o, lse, dob, pos[:, late], pos[:, late],
                                  seg[:, late], seg[:, late], **kw)
        g2 = cudnn.flash_backward(qb, k[:, early], v[:, early], o, lse, dob, pos[:, late], pos[:, early],
                                  seg[:, late], seg[:, early], **kw)
        return out, g1[0] + g2[0], jnp.concatenate([g2[1], g1[1]], 1), jnp.concatenate([g2[2], g1[2]], 1)

    from jax.sharding import PartitionSpec as P

    fn = jax.jit(jax.shard_map(fwd_bwd, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
    out, dq, dk, dv = fn(qb, k, v, do[:, t:])
    # the dense reference over the whole sequence, with no cotangent on the early queries
    f32 = lambda x: x.astype(F32)
    ref_out, vjp = jax.vjp(lambda *a: reference(*a, positions=pos), f32(q), f32(k), f32(v))
    ref_dq, ref_dk, ref_dv = vjp(do.at[:, :t].set(0.0))
    for a, b in zip((out, dq, dk, dv), (ref_out[:, t:], ref_dq[:, t:], ref_dk, ref_dv)):
        assert relative_error(a, b) < 2e-2
