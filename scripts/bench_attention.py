"""Sequence-parallel attention benchmark: the design notes' layout comparison, measured side by side.

For each impl × layout: forward and forward+backward iterations per second, efficiency =
(time of full-length attention on one device / N) / (time of the sharded version), and per record
``balance`` = max over windows of (max over shards of the query–key area the shard computes at the
kernel's tile granularity, ``--tile``) ÷ (the window's exact masked area ÷ N) and ``recv_bytes_max``, the
bytes one shard receives per attention forward (one sequence, one layer), from lcjax.data.balance.

``--doc-lengths FILE`` (one document length in tokens per line) packs those documents into windows of
``--seq-len`` exactly as the loader packs a corpus (each document + EOS in one stream,
lcjax.data.loader.windows_of_lengths), pads and lays out every window as the loader does (``balanced``
included) and takes the max over windows; without it the window is one causal sequence.
``--balance-only`` skips the timing: one record per impl × layout (impls ring, allgather, ulysses), pure
numpy, no devices; ``recv_bytes_needed_max`` is the K/V a shard needs at least (the remote keys some local
query sees), next to ``recv_bytes_max``, what the impl sends today; ``balance_bound`` the least balance
any token order could reach at that tile (max over windows of lcjax.data.balance.area_lower_bound ÷ the
exact area).

On a CPU host the N simulated devices share the cores, so efficiencies there compare layouts with each
other, not with a GPU cluster. ``--emulate-shard`` instead runs, on one device, the exact sequence of
kernel calls each shard makes (no communication) and reports the slowest shard against full-attention
time / N: the compute efficiency of each layout without a multi-GPU host.

    python scripts/bench_attention.py --seq-len 8192 --shards 8 --json bench.json
    python scripts/bench_attention.py --doc-lengths lengths.txt --balance-only --shards 8 --seq-len 131072 \
        --json balance.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/benchlib.py
from benchlib import timed  # noqa: E402


BALANCE_IMPLS = ("ring", "allgather", "ulysses")  # lcjax.data.balance.IMPLS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--impls", default=None,
                   help="default ring,ulysses,hybrid (timed) or ring,allgather,ulysses (--balance-only)")
    p.add_argument("--layouts", default=None,
                   help="default zigzag,striped,contiguous (+ balanced with --doc-lengths)")
    p.add_argument("--doc-lengths", help="file of document lengths in tokens, one per line")
    p.add_argument("--balance-only", action="store_true", help="no timing: balance and bytes only (numpy)")
    p.add_argument("--tile", type=int, default=None,
                   help="kernel tile for the balance count (default --block, else 128: the Triton H100 bf16 "
                        "forward tile)")
    p.add_argument("--window", type=int, default=None, help="sliding attention window W (default none)")
    p.add_argument("--max-windows", type=int, default=None, help="only the first N windows of --doc-lengths")
    p.add_argument("--ulysses-size", type=int, default=2, help="group size for impl hybrid")
    p.add_argument("--kernel", default="xla", choices=["xla", "pallas", "pallas_triton"])
    p.add_argument("--block", type=int, default=None,
                   help="block_q = block_k of the kernels (default: each kernel's own tiles)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--emulate-shard", action="store_true", help="one device: each shard's kernel calls")
    p.add_argument("--json", help="write the records to this file")
    args = p.parse_args(argv)
    check_args(args)
    args.tile = args.tile or args.block or 128
    timed_impls = "ring,ulysses,hybrid"
    args.impls = args.impls or ("ring,allgather,ulysses" if args.balance_only else timed_impls)
    args.layouts = args.layouts or ("zigzag,striped,contiguous" + (",balanced" if args.doc_lengths else ""))
    return args


LAYOUT_CHOICES = ("zigzag", "striped", "contiguous", "balanced")  # lcjax.choices.LAYOUTS


def check_args(args) -> None:
    """Every numeric option in its range and every layout known, or :func:`fail` naming the first that is
    not."""
    for name in ("batch", "seq_len", "heads", "kv_heads", "head_dim", "shards", "iters", "ulysses_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    for name in ("tile", "window", "max_windows", "block"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} {value} must be >= 1 (or left out)")
    unknown = [x for x in (args.layouts or "").split(",") if args.layouts and x not in LAYOUT_CHOICES]
    if unknown:
        fail(f"--layouts {','.join(unknown)}: must be among {', '.join(LAYOUT_CHOICES)}")


def fail(message: str):
    """Bad input: one line on stderr, exit code 2."""
    print(f"bench_attention.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def doc_lengths(path: str) -> list[int]:
    """The document lengths of ``path`` (one positive integer per line; blank lines ignored)."""
    try:
        lines = Path(path).read_text().split()
    except OSError as e:
        fail(f"--doc-lengths {path}: {e.strerror or e}")
    try:
        lengths = [int(x) for x in lines]
    except ValueError as e:
        fail(f"--doc-lengths {path}: every line must be one document length in tokens ({e})")
    if not lengths:
        fail(f"--doc-lengths {path}: needs at least one document length")
    bad = next((i for i, n in enumerate(lengths) if n < 1), None)
    if bad is not None:
        fail(f"--doc-lengths {path}: length {lengths[bad]} (entry {bad + 1}) must be >= 1")
    return lengths


def natural_windows(args) -> list[dict]:
    """The natural-order windows of the run: packed documents (--doc-lengths) or one causal sequence."""
    import numpy as np

    from lcjax.data.loader import windows_of_lengths

    if not args.doc_lengths:
        t = args.seq_len
        return [{"positions": np.arange(t, dtype=np.int32), "segment_ids": np.ones(t, np.int32),
                 "loss_mask": np.ones(t, np.int32)}]
    windows = windows_of_lengths(doc_lengths(args.doc_lengths), args.seq_len)
    if not windows:
        fail(f"--doc-lengths {args.doc_lengths}: fewer tokens than one window of --seq-len {args.seq_len} + 1")
    return windows[:args.max_windows]


def laid_out(window: dict, layout: str, args) -> dict:
    """One natural-order window padded and permuted as the loader does (lcjax.data.loader.LayOut), with
    ``real`` marking the unpadded tokens."""
    import numpy as np

    from lcjax.data.loader import LayOut

    t = len(window["positions"])
    row = {**window, "tokens": np.zeros(t, np.int32), "labels": np.zeros(t, np.int32),
           "real": np.ones(t, np.int32)}
    out = LayOut(layout, args.shards, args.window)({k: v[None] for k, v in row.items()})
    return {k: v[0] for k, v in out.items()}


def balance_records(args, impls, layouts) -> dict:
    """{(impl, layout): record} with n_shards, balance, recv_bytes_max, recv_bytes_needed_max, windows."""
    import numpy as np

    from lcjax.data import balance as B

    itemsize = 2 if args.dtype == "bfloat16" else 4
    windows = natural_windows(args)
    records = {}
    for layout in layouts:
        worst = {impl: 0.0 for impl in impls}
        bound = {impl: 0.0 for impl in impls}
        needed = 0
        for window in windows:
            w = laid_out(window, layout, args)
            pos, seg, real = w["positions"], w["segment_ids"], w["real"].astype(bool)
            exact = B.exact_area(pos, seg, window=args.window, real=real) / args.shards
            areas = {}
            for impl in impls:
                key = "ulysses" if impl in ("ulysses", "hybrid") else "ring"  # allgather computes as the ring
                if key not in areas:
                    areas[key] = B.shard_areas(pos, seg, args.shards, impl=key, tile=args.tile, window=args.window)
                worst[impl] = max(worst[impl], float(areas[key].max() / exact) if exact else float("inf"))
                least = B.area_lower_bound(pos, seg, args.shards, impl=key, tile=args.tile, window=args.window,
                                           real=real) / args.shards
                bound[impl] = max(bound[impl], least / exact if exact else float("inf"))
            needed = max(needed, B.needed_kv_tokens(pos, seg, args.shards, window=args.window))
        local = len(pos) // args.shards
        for impl in impls:
            kw = dict(num_shards=args.shards, local_len=local, heads=args.heads, kv_heads=args.kv_heads,
                      head_dim=args.head_dim, itemsize=itemsize)
            blocks = ring_blocks(args.shards, local, layout, args.window) if impl == "ring" else None
            records[impl, layout] = {
                "impl": impl, "layout": layout, "n_shards": args.shards, "balance": worst[impl],
                "balance_bound": bound[impl],
                "recv_bytes_max": B.recv_bytes("ulysses" if impl == "hybrid" else impl, remote_blocks=blocks, **kw),
                "recv_bytes_needed_max": (None if impl == "ulysses"
                                          else B.kv_bytes(needed, args.kv_heads, args.head_dim, itemsize)),
                "windows": len(windows), "seq_len": args.seq_len, "padded_len": len(pos), "tile": args.tile,
                "window": args.window}
    return records


def ring_blocks(shards: int, local: int, layout: str, window) -> float:
    """Remote K/V blocks (of ``local`` tokens; half blocks count ½) the ring receives per shard in the
    forward: lcjax.parallel.ring.recv_tokens, the sends decided statically from layout, causal and window."""
    from lcjax.parallel.ring import recv_tokens

    return recv_tokens(shards, local, layout=layout, causal=True, window=window) / local


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
    import jax.numpy as jnp

    from lcjax.parallel.ring import ring_attention

    impls = ["ring"] if args.emulate_shard else args.impls.split(",")
    layouts = args.layouts.split(",")
    balances = balance_records(args, [i for i in impls if i in BALANCE_IMPLS], layouts)
    first = natural_windows(args)[0]
    q, k, v, _, _ = inputs(args)
    pos, seg = (jnp.asarray(first[name])[None] for name in ("positions", "segment_ids"))
    full = lambda q, k, v, p, s: ring_attention(q, k, v, p, s, axis_name=None, layout="contiguous",
                                                block_q=args.block, block_k=args.block, kernel=args.kernel)
    base = [timed(f, q, k, v, pos, seg, iters=args.iters) for f in passes(full)]
    records = []
    for impl in impls:
        for layout in layouts:
            w = laid_out(first, layout, args)
            lay = [pad(x, len(w["positions"])) for x in (q, k, v)]
            lay += [jnp.asarray(w[name])[None] for name in ("positions", "segment_ids")]
            if args.emulate_shard:
                per_shard = [[timed(f, *lay, iters=args.iters) for f in passes(emulated_shard(layout, r, args))]
                             for r in range(args.shards)]
                times = [max(t[i] for t in per_shard) for i in range(2)]
            else:
                times = [timed(f, *lay, iters=args.iters) for f in passes(sharded(impl, layout, args))]
            extra = balances.get((impl, layout), {"balance": None, "recv_bytes_max": None})
            for name, t, b in zip(("fwd", "fwd_bwd"), times, base):
                records.append({**extra, "impl": impl, "layout": layout, "n_shards": args.shards, "pass": name,
                                "iters_per_sec": 1.0 / t, "efficiency": (b / args.shards) / t,
                                "emulated": args.emulate_shard})
                print(json.dumps(records[-1]), flush=True)  # kept even if a time limit stops the run
    return records


def pad(x, length: int):
    """[B, T, ...] zero-padded along T to ``length`` (the layout's padded window; padding is its own
    segment, so its values never matter)."""
    import jax.numpy as jnp

    extra = length - x.shape[1]
    return x if not extra else jnp.concatenate([x, jnp.zeros((x.shape[0], extra) + x.shape[2:], x.dtype)], axis=1)


def balance_table(records) -> str:
    rows = ["| impl | layout | balance | bound | recv bytes max | needed at least |", "|---|---|---|---|---|---|"]
    rows += [f"| {r['impl']} | {r['layout']} | {r['balance']:.3f} | {r['balance_bound']:.3f} "
             f"| {r['recv_bytes_max']:,} "
             f"| {'–' if r['recv_bytes_needed_max'] is None else format(r['recv_bytes_needed_max'], ',')} |"
             for r in records]
    return "\n".join(rows)


def markdown(records, args) -> str:
    import jax

    head = (f"{args.seq_len} tokens, {args.heads} q / {args.kv_heads} kv heads × {args.head_dim}, {args.dtype}, "
            f"kernel {args.kernel}, block {args.block}, {args.shards} shards"
            f"{' (emulated on one device)' if args.emulate_shard else ''}; "
            f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    rows = ["| impl | layout | pass | iters/s | efficiency | balance (tile area / ideal) |",
            "|---|---|---|---|---|---|"]
    fmt = lambda b: "–" if b is None else f"{b:.3f}"
    rows += [f"| {r['impl']} | {r['layout']} | {r['pass']} | {r['iters_per_sec']:.3f} | {r['efficiency']:.1%} "
             f"| {fmt(r['balance'])} |" for r in records]
    return head + "\n\n" + "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.balance_only:
        unknown = [i for i in args.impls.split(",") if i not in BALANCE_IMPLS]
        if unknown:
            fail(f"--impls {','.join(unknown)}: --balance-only counts {', '.join(BALANCE_IMPLS)}")
        records = list(balance_records(args, args.impls.split(","), args.layouts.split(",")).values())
        print(f"{records[0]['windows']} windows of {args.seq_len:,} tokens (padded to the layout), "
              f"{args.shards} shards, tile {args.tile}, window {args.window}, {args.heads} q / {args.kv_heads} "
              f"kv heads x {args.head_dim}, {args.dtype}\n\n{balance_table(records)}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
        return 0
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
