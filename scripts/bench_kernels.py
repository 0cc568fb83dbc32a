"""Per-device attention kernels side by side: TFLOP/s of our Pallas and XLA flash kernels next to
``jax.nn.dot_product_attention`` (implementation "cudnn" and "xla"), forward and forward+backward, causal.

FLOPs (causal-honest): forward 2 matmuls of 2·B·N·H·T²/2 each → 2·B·N·H·T²; the backward recomputes the
scores and does 4 more matmuls (FlashAttention-2, arXiv:2307.08691, §3.1.2), so forward+backward counts
3.5× the forward. A kernel that fails (e.g. cuDNN on a CPU host, or dense XLA out of memory at long T) is
reported with its error instead of a number.

    python scripts/bench_kernels.py --seq-lens 4096,16384,32768 --kernels pallas,xla,cudnn,dense --json k.json

Imports only JAX and lcjax's kernel code (the GPU host has no data dependencies installed).
"""

from __future__ import annotations

import argparse
import json
import sys

from bench_attention import timed  # same folder: scripts/ is sys.path[0] when run as a script


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="4096,16384,32768")
    p.add_argument("--kernels", default="pallas,xla,cudnn,dense",
                   help="pallas, xla (ours), cudnn and dense (jax.nn.dot_product_attention)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128, help="block_q = block_k of our kernels")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json")
    return p.parse_args(argv)


def attention_fn(name, block):
    import jax
    import jax.numpy as jnp

    from lcjax.parallel.ring import ring_attention

    if name in ("pallas", "xla"):
        def ours(q, k, v):
            pos = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
            return ring_attention(q, k, v, pos, jnp.zeros_like(pos), axis_name=None, layout="contiguous",
                                  block_q=block, block_k=block, kernel=name)
        return ours
    implementation = {"cudnn": "cudnn", "dense": "xla"}[name]
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def run(args):
    import jax
    import jax.numpy as jnp

    records = []
    for t in map(int, args.seq_lens.split(",")):
        ks = jax.random.split(jax.random.key(0), 3)
        dt = jnp.dtype(args.dtype)
        q = jax.random.normal(ks[0], (1, t, args.heads, args.head_dim), dt)
        k = jax.random.normal(ks[1], (1, t, args.kv_heads, args.head_dim), dt)
        v = jax.random.normal(ks[2], (1, t, args.kv_heads, args.head_dim), dt)
        fwd_flops = 2.0 * args.heads * args.head_dim * t * t
        for name in args.kernels.split(","):
            attend = attention_fn(name, args.block)
            fwd = jax.jit(attend)
            both = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)), (0, 1, 2)))
            for pass_name, fn, flops in (("fwd", fwd, fwd_flops), ("fwd_bwd", both, 3.5 * fwd_flops)):
                record = {"kernel": name, "seq_len": t, "pass": pass_name}
                try:
                    seconds = timed(fn, q, k, v, iters=args.iters)
                    record.update(seconds=seconds, tflops=flops / seconds / 1e12)
                except Exception as e:  # reported, not hidden: cuDNN absent on CPU, dense OOM at long T
                    record.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                records.append(record)
                print(json.dumps(record), flush=True)
    return records


def main(argv=None) -> int:
    import jax

    args = parse_args(argv)
    records = run(args)
    print(f"\n{args.heads} q / {args.kv_heads} kv heads × {args.head_dim}, {args.dtype}, causal; "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}\n")
    print("| kernel | T | pass | ms | TFLOP/s |\n|---|---|---|---|---|")
    for r in records:
        value = f"{r['seconds'] * 1e3:.2f} | {r['tflops']:.3g}" if "seconds" in r else f"— | {r['error'][:60]}"
        print(f"| {r['kernel']} | {r['seq_len']} | {r['pass']} | {value} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
