#!/usr/bin/env bash
# The one prepared GPU run (about 8 minutes on one H200; run from the source tree, no pip install):
#   OUT=/some/dir bash scripts/gpu_session.sh
# 1. Pallas kernel correctness on the GPU against the dense reference (forward and gradients);
# 2. kernel TFLOP/s: Pallas and XLA flash kernels next to cuDNN and dense XLA attention (bench_kernels.py);
# 3. the emulated-shard efficiency table per layout at N = 8 (bench_attention.py --emulate-shard).
# Results land in $OUT as markdown and JSON; copy the tables into docs/benchmarks.md with date and command.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=.
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
timeout 120 python3 - > "$OUT/correctness.txt" 2>&1 <<'PY'
import jax, jax.numpy as jnp
from lcjax.kernels.flash_attention import pallas_triton as pallas
from lcjax.ops.attention import reference
print(jax.devices(), jax.__version__)
for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    ks = jax.random.split(jax.random.key(0), 4)
    b, t, n, kv, h = 1, 2048, 8, 2, 128
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    k = jax.random.normal(ks[1], (b, t, kv, h), dtype)
    v = jax.random.normal(ks[2], (b, t, kv, h), dtype)
    do = jax.random.normal(ks[3], (b, t, n, h), jnp.float32)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    seg = jnp.ones_like(pos)
    rel = lambda a, r: float(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r)))
    f32 = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        ref = reference(f32(q), f32(k), f32(v), positions=pos)
        ref_g = jax.grad(lambda *a: jnp.sum(reference(*a, positions=pos) * do), (0, 1, 2))(f32(q), f32(k), f32(v))
    out, lse = pallas.flash_forward(q, k, v, pos, pos, seg, seg)
    grads = pallas.flash_backward(q, k, v, out, lse, do.astype(dtype), pos, pos, seg, seg)
    errs = [rel(out, ref)] + [rel(g, r) for g, r in zip(grads, ref_g)]
    print(dtype.__name__, "out, dq, dk, dv relative errors:", errs, "OK" if max(errs) <= tol else "FAIL")
PY
timeout 260 python3 scripts/bench_kernels.py --json "$OUT/kernels.json" > "$OUT/kernels.md" 2>&1
timeout 200 python3 scripts/bench_attention.py --emulate-shard --shards 8 --seq-len 32768 --heads 32 --kv-heads 8 \
  --head-dim 128 --dtype bfloat16 --kernel pallas --block 128 --iters 3 --json "$OUT/emulated.json" \
  > "$OUT/emulated.md" 2>&1
tail -n 30 "$OUT"/*.txt "$OUT"/*.md
