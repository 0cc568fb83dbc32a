"""Sequence-parallel attention benchmark: the design notes' layout comparison, measured side by side.

For each impl × layout: forward and forward+backward iterations per second, efficiency =
(time of full-length attention on one device / N) / (time of the sharded version), and the per-shard work
balance = max / mean over shards of the query–key area each shard computes, counted from the schedule the
ring executes (lcjax.parallel.ring.computed_area: the ring's own step and kernel block-skip functions).

On a CPU host the N simulated devices share the cores, so efficiencies there compare layouts with each
other, not with a GPU cluster. ``--emulate-shard`` instead runs, on one device, the exact sequence of
kernel calls each shard makes (no communication) and reports the slowest shard against full-attention
time / N: the compute efficiency of each layout without a multi-GPU host.

    python scripts/bench_attention.py --seq-len 8192 --shards 8 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/benchlib.py
from benchlib import timed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--impls", default="ring,ulysses,hybrid")
    p.add_argument("--layouts", default="zigzag,striped,contiguous")
    p.add_argument("--ulysses-size", type=int, default=2, help="group size for impl hybrid")
    p.add_argument("--kernel", default="xla", choices=["xla", "pallas", "pallas_triton"])
    p.add_argument("--block", type=int, default=None,
                   help="block_q = block_k of the kernels (default: each kernel's own tiles; 128 for the balance count)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--emulate-shard", action="store_true", help="one device: each shard's kernel calls")
    p.add_argument("--json", help="write the records to this file")
    return p.parse_args(argv)


def inputs(args):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(0), 3)
    dtype = jnp.dtype(args.dtype)
    q = jax.random.normal(ks[0], (args.batch, args.seq_len, args.heads, args.head_dim), dtype)
    k = jax.random.normal(ks[1], (args.batch, args.seq_len, args.kv_heads, args.head_dim), dtype)
    v = jax.random.normal(ks[2], (args.batch, args.seq_len, args.kv_heads, args.head_dim), dtype)
    pos = jnp.tile(jnp.arange(args.seq_len, dtype=jnp.int32), (args.batch, 1))
    return q, k, v, pos, jnp.ones_like(pos)


def passes(attend):
    """(forward, forward+backward) jitted functions of (q, k, v, pos, seg)."""
    import jax
    import jax.numpy as jnp

    fwd = jax.jit(attend)
    grad = jax.jit(jax.grad(lambda q, k, v, p, s: jnp.sum(attend(q, k, v, p, s).astype(jnp.float32)),
                            (0, 1, 2)))
    return fwd, grad


def balance(impl, layout, args):
    """max/mean of the query–key area per shard, from the ring's own schedule."""
    import numpy as np

    from lcjax.ops.layout import permute
    from lcjax.parallel.ring import computed_area
    from lcjax.parallel.ulysses import zigzag_group_order

    n, t = args.shards, args.seq_len
    pos = permute(np.tile(np.arange(t), (args.batch, 1)), layout, n)
    ring, order = n, np.arange(t)
    if impl == "ulysses":
        ring = 1  # every shard attends the whole sequence for its heads
    elif impl == "hybrid":
        ring = n // args.ulysses_size
        if layout == "zigzag":  # groups gather their shards' tokens, then reorder (lcjax.parallel.ulysses)
            local = zigzag_group_order(t // n, args.ulysses_size)
            order = np.concatenate([g * len(local) + local for g in range(ring)])
    area = computed_area(pos[:, order], np.ones_like(pos), ring_size=ring, layout=layout, block_q=args.block or 128,
                         block_k=args.block or 128)
    return float(area.max() / area.mean())


def sharded(impl, layout, args):
    import jax
    from jax.sharding import PartitionSpec as P

    from lcjax.kernels.flash_attention.api import is_pallas
    from lcjax.parallel.sequence import sequence_parallel_attention
    from lcjax.sharding.mesh import make_mesh

    spec = P(None, "sequence")
    attend = lambda q, k, v, p, s: sequence_parallel_attention(
        q, k, v, p, s, impl=impl, axis_name="sequence", layout=layout, block_q=args.block, block_k=args.block,
        kernel=args.kernel, ulysses_size=args.ulysses_size if impl == "hybrid" else None)
    return jax.shard_map(attend, mesh=make_mesh(1, args.shards, 1), in_specs=(spec,) * 5, out_specs=spec,
                         check_vma=not is_pallas(args.kernel))


def emulated_shard(layout, shard, args):
    """One ring shard's kernel calls on one device (lcjax.parallel.ring.schedule), no communication.

    Forward: the schedule's ``flash_forward`` calls merged as the ring merges them. Backward (a
    ``custom_vjp``, as the ring's): one ``flash_backward`` call per step with the final ``out``/``lse``,
    dq summed at home and dK/dV added to the visiting block's slot — the calls the real ring backward
    makes, so the Pallas kernel (not differentiable by itself) is timed in forward+backward too.
    """
    import jax
    import jax.numpy as jnp

    from lcjax.kernels.flash_attention.api import get_kernel
    from lcjax.parallel.ring import _place, _sel, merge, schedule

    kernel, n = get_kernel(args.kernel), args.seq_len // args.shards
    steps = schedule(shard, args.shards, n, layout=layout, causal=True, window=None)
    kw = dict(block_q=args.block, block_k=args.block)
    part = lambda x, r: x[:, r * n:(r + 1) * n]

    def blocks(q, k, v, p, s, step, qh, kh):
        src = (shard - step) % args.shards
        return src, (_sel(part(q, shard), qh), _sel(part(k, src), kh), _sel(part(v, src), kh),
                     _sel(part(p, shard), qh), _sel(part(p, src), kh), _sel(part(s, shard), qh),
                     _sel(part(s, src), kh))

    def fwd(q, k, v, p, s):
        acc = None
        for step, qh, kh in steps:
            _, (qb, kb, vb, qp, kp, qs, ks) = blocks(q, k, v, p, s, step, qh, kh)
            o, l = kernel.flash_forward(qb, kb, vb, qp, kp, qs, ks, **kw)
            o, l = _place(o, 0.0, qh), _place(l, -jnp.inf, qh)
            acc = (o, l) if acc is None else merge(*acc, o, l)
        return acc[0].astype(q.dtype), (q, k, v, p, s, *acc)

    def bwd(res, dout):
        q, k, v, p, s, out, lse = res
        dq = jnp.zeros(part(q, shard).shape, jnp.float32)
        dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
        for step, qh, kh in steps:
            src, (qb, kb, vb, qp, kp, qs, ks) = blocks(q, k, v, p, s, step, qh, kh)
            g = kernel.flash_backward(qb, kb, vb, _sel(out, qh), _sel(lse, qh), _sel(dout, qh), qp, kp, qs, ks, **kw)
            dq = dq + _place(g[0], 0.0, qh)
            dk = dk.at[:, src * n:(src + 1) * n].add(_place(g[1], 0.0, kh))
            dv = dv.at[:, src * n:(src + 1) * n].add(_place(g[2], 0.0, kh))
        dq = jnp.zeros(q.shape, jnp.float32).at[:, shard * n:(shard + 1) * n].set(dq)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None

    attend = jax.custom_vjp(lambda q, k, v, p, s: fwd(q, k, v, p, s)[0])
    attend.defvjp(fwd, bwd)
    return attend


def run(args):
    from lcjax.ops.layout import permute
    from lcjax.parallel.ring import ring_attention

    q, k, v, pos, seg = inputs(args)
    full = lambda q, k, v, p, s: ring_attention(q, k, v, p, s, axis_name=None, layout="contiguous",
                                                block_q=args.block, block_k=args.block, kernel=args.kernel)
    base = [timed(f, q, k, v, pos, seg, iters=args.iters) for f in passes(full)]
    records = []
    impls = ["ring"] if args.emulate_shard else args.impls.split(",")
    for impl in impls:
        for layout in args.layouts.split(","):
            lay = [permute(x, layout, args.shards) for x in (q, k, v, pos, seg)]
            if args.emulate_shard:
                per_shard = [[timed(f, *lay, iters=args.iters) for f in passes(emulated_shard(layout, r, args))]
                             for r in range(args.shards)]
                times = [max(t[i] for t in per_shard) for i in range(2)]
            else:
                times = [timed(f, *lay, iters=args.iters) for f in passes(sharded(impl, layout, args))]
            bal = balance(impl, layout, args)
            for name, t, b in zip(("fwd", "fwd_bwd"), times, base):
                records.append({"impl": impl, "layout": layout, "n_shards": args.shards, "pass": name,
                                "iters_per_sec": 1.0 / t, "efficiency": (b / args.shards) / t, "balance": bal,
                                "emulated": args.emulate_shard})
                print(json.dumps(records[-1]), flush=True)  # kept even if a time limit stops the run
    return records


def markdown(records, args) -> str:
    import jax

    head = (f"{args.seq_len} tokens, {args.heads} q / {args.kv_heads} kv heads × {args.head_dim}, {args.dtype}, "
            f"kernel {args.kernel}, block {args.block}, {args.shards} shards"
            f"{' (emulated on one device)' if args.emulate_shard else ''}; "
            f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    rows = ["| impl | layout | pass | iters/s | efficiency | balance (max/mean) |", "|---|---|---|---|---|---|"]
    rows += [f"| {r['impl']} | {r['layout']} | {r['pass']} | {r['iters_per_sec']:.3f} | {r['efficiency']:.1%} "
             f"| {r['balance']:.3f} |" for r in records]
    return head + "\n\n" + "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.emulate_shard and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.shards}".strip()
    records = run(args)
    print(markdown(records, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
