"""Error of the ring's gradients with dK/dV sent in float32 or bfloat16 (``attention.dkv_dtype``).

    python scripts/bench_dkv_dtype.py [--seq-len 4096]

8 simulated CPU devices, ring attention in zigzag layout, bf16 inputs, 8 query / 2 kv heads of 64;
relative error (max |a - b| / max |b|) of dq, dk, dv against the float32 dense reference.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lcjax.attention import attention  # noqa: E402
from lcjax.ops.attention import reference  # noqa: E402
from lcjax.ops.layout import permute  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=4096)
    t = p.parse_args().seq_len
    b, n, kv, h = 1, 8, 2, 64
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(ks[i], (b, t, c, h), jnp.bfloat16) for i, c in ((0, n), (1, kv), (2, kv)))
    do = jax.random.normal(ks[3], (b, t, n, h), jnp.float32)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    f32 = lambda x: x.astype(jnp.float32)
    ref = jax.grad(lambda q, k, v: jnp.sum(reference(q, k, v, positions=pos) * do), (0, 1, 2))(f32(q), f32(k), f32(v))
    lay = lambda x: permute(x, "zigzag", 8)
    rel = lambda a, r: float(jnp.max(jnp.abs(f32(a) - r)) / jnp.max(jnp.abs(r)))
    print("| dK/dV on the wire | dq | dk | dv |\n|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        loss = lambda q, k, v: jnp.sum(f32(attention(q, k, v, positions=lay(pos), impl="ring", layout="zigzag",
                                                     block_q=256, block_k=256, dkv_dtype=dtype)) * lay(do))
        grads = jax.jit(jax.grad(loss, (0, 1, 2)))(lay(q), lay(k), lay(v))
        print(f"| {dtype} | " + " | ".join(f"{rel(g, lay(r)):.2e}" for g, r in zip(grads, ref)) + " |")


if __name__ == "__main__":
    main()
