"""lcjax's sequence-parallel attention next to what a JAX user gets without it, side by side in one run.

Ours: ``lcjax.attention.attention`` (ring by default, zigzag layout, blockwise XLA kernel) on a mesh whose
``sequence`` axis holds all N devices. The peer ("what plain JAX gives"): full attention of the same
global arrays under plain ``jax.jit`` with sharding annotations only — q, k, v, the output (and the
gradients) are ``NamedSharding(mesh, P(None, 'sequence'))`` and XLA's SPMD partitioner inserts whatever
gathers of K and V it needs:

- ``dense``: ``jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")`` (GQA native);
- ``blockwise``: lcjax's own single-device blockwise XLA kernel (``ring_attention(axis_name=None)``, the
  flash recurrence in ``jnp``) under the same annotations — blockwise memory, but no ring.

At equal shapes (causal, B = 1, T from ``--seq-lens``): the results are first checked against each other
(max abs difference of the output and of dq, dk, dv for one random cotangent, ours un-permuted back to
natural order), then forward and forward+backward are timed interleaved (one call of each variant per
repetition, ``--reps`` repetitions, median), and XLA's compiled per-device memory (argument + output +
temp − alias, ``memory_analysis()``) is read for each. Reported: ratios peer / ours of time and memory
(> 1: ours is faster / smaller), and the collectives in each compiled program. A variant whose compiled
memory times N exceeds ``--budget-gb`` (the simulated devices share the host's memory) is not run and
is reported as not fitting; T grows until nothing fits or the list ends.

On a CPU host the N simulated devices share the cores, so the time ratios compare the two programs on the
same hardware, not a GPU cluster; memory figures are CPU-backend figures.

    PYTHONPATH=. python scripts/bench_peer.py --seq-lens 4096,8192,16384 --devices 8 --json peer.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="4096,8192,16384,32768")
    p.add_argument("--devices", type=int, default=8, help="N: size of the sequence axis")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--impl", default="ring", help="ours: ring, ulysses or hybrid")
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--ulysses-size", type=int, default=None)
    p.add_argument("--block", type=int, default=512, help="block_q = block_k of the blockwise kernels")
    p.add_argument("--peers", default="dense", help="comma-separated: dense, blockwise")
    p.add_argument("--passes", default="fwd,fwd_bwd")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=5, help="interleaved timed repetitions (median)")
    p.add_argument("--budget-gb", type=float, default=14.0,
                   help="skip a variant whose compiled bytes per device x N exceed this (host memory)")
    p.add_argument("--json", help="write the records to this file")
    p.add_argument("--md", help="also write the markdown to this file")
    return p.parse_args(argv)


def ratio(peer: float | None, ours: float | None) -> float | None:
    """peer / ours (> 1: ours is faster or smaller); None when either is missing."""
    return peer / ours if peer and ours else None


def collectives(hlo_text: str) -> dict:
    """Counts of the collective ops in a compiled HLO module's text."""
    names = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    return {n: len(re.findall(rf"\b{n}(?:-start)?\(", hlo_text)) for n in names}


def max_abs_diff(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def variants(args, mesh, t: int):
    """{name: (attend(q, k, v) on natural-order arrays, permute_in, unpermute_out)}: ours works on
    layout-order arrays (the loader lays data out so); the peers on natural order."""
    import jax.numpy as jnp

    from lcjax.attention import attention
    from lcjax.ops.layout import permute, unpermute
    from lcjax.parallel.ring import ring_attention

    n = args.devices
    pos = permute(jnp.arange(t, dtype=jnp.int32)[None], args.layout, n)
    group = args.ulysses_size if args.impl == "hybrid" else None
    out = {"ours": (lambda q, k, v: attention(q, k, v, positions=pos, mesh=mesh, impl=args.impl, layout=args.layout,
                                              kernel="xla", ulysses_size=group, block_q=args.block,
                                              block_k=args.block),
                    lambda x: permute(x, args.layout, n), lambda x: unpermute(x, args.layout, n))}
    ident = lambda x: x
    natural = jnp.arange(t, dtype=jnp.int32)[None]
    for peer in args.peers.split(","):
        if peer == "dense":
            import jax

            fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        elif peer == "blockwise":
            fn = lambda q, k, v: ring_attention(q, k, v, natural, jnp.zeros_like(natural), axis_name=None,
                                                layout="contiguous", block_q=args.block, block_k=args.block,
                                                kernel="xla")
        else:
            raise ValueError(f"--peers {peer!r} must be dense or blockwise")
        out[peer] = (fn, ident, ident)
    return out


def compile_pass(attend, pass_name, sharding, args_abstract):
    """The compiled forward (q, k, v) -> out, or forward+backward (q, k, v, do) -> (dq, dk, dv)."""
    import jax

    if pass_name == "fwd":
        f = attend
    else:
        def f(q, k, v, do):
            _, pullback = jax.vjp(attend, q, k, v)
            return pullback(do)
    n_out = 1 if pass_name == "fwd" else 3
    jitted = jax.jit(f, in_shardings=(sharding,) * len(args_abstract),
                     out_shardings=sharding if n_out == 1 else (sharding,) * 3)
    return jitted.lower(*args_abstract).compile()


def run_seq_len(args, mesh, t: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lcjax.train.metrics import compiled_bytes

    sharding = NamedSharding(mesh, P(None, "sequence"))
    dt = jnp.dtype(args.dtype)
    ks = jax.random.split(jax.random.key(t), 4)
    shapes = {"q": (1, t, args.heads, args.head_dim), "k": (1, t, args.kv_heads, args.head_dim),
              "v": (1, t, args.kv_heads, args.head_dim), "do": (1, t, args.heads, args.head_dim)}
    natural = {name: jax.random.normal(key, shape, dt) for key, (name, shape) in zip(ks, shapes.items())}
    records, runs, results = [], [], {}
    for name, (attend, permute_in, unpermute_out) in variants(args, mesh, t).items():
        arrays = {k: jax.device_put(permute_in(x), sharding) for k, x in natural.items()}
        for pass_name in args.passes.split(","):
            inputs = [arrays[k] for k in ("q", "k", "v")] + ([arrays["do"]] if pass_name == "fwd_bwd" else [])
            rec = {"variant": name, "pass": pass_name, "seq_len": t, "n_devices": args.devices}
            try:
                compiled = compile_pass(attend, pass_name, sharding,
                                        [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for x in inputs])
                mem = compiled_bytes(compiled.memory_analysis())
                rec.update(memory_bytes_per_device=mem["total"], memory_parts=mem,
                           collectives=collectives(compiled.as_text()))
                if mem["total"] * args.devices > args.budget_gb * 1e9:
                    rec["error"] = (f"does not fit: {mem['total'] / 1e9:.2f} GB/device x {args.devices} > "
                                    f"--budget-gb {args.budget_gb}")
                else:
                    out = jax.block_until_ready(compiled(*inputs))  # warm-up, kept for the check
                    outs = [out] if pass_name == "fwd" else list(out)
                    results[(name, pass_name)] = [unpermute_out(o) for o in outs]
                    runs.append((rec, compiled, inputs))
            except Exception as e:  # compile or run failure (e.g. out of memory): reported in the row
                rec["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            records.append(rec)
    for rec in records:  # correctness against ours, before any timing
        mine, theirs = results.get(("ours", rec["pass"])), results.get((rec["variant"], rec["pass"]))
        if rec["variant"] != "ours" and mine and theirs:
            rec["max_abs_diff"] = max(max_abs_diff(a, b) for a, b in zip(mine, theirs))
    results.clear()
    times = {id(rec): [] for rec, _, _ in runs}
    for _ in range(args.reps):  # interleaved: one call of every variant per repetition
        for rec, compiled, inputs in runs:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*inputs))
            times[id(rec)].append(time.perf_counter() - t0)
    for rec, _, _ in runs:
        rec["seconds_median"] = statistics.median(times[id(rec)]) if times[id(rec)] else None
        rec["seconds_all"] = times[id(rec)]
    mine = {r["pass"]: r for r in records if r["variant"] == "ours"}
    for rec in records:
        if rec["variant"] != "ours" and rec["pass"] in mine:
            rec["time_ratio"] = ratio(rec.get("seconds_median"), mine[rec["pass"]].get("seconds_median"))
            rec["memory_ratio"] = ratio(rec.get("memory_bytes_per_device"),
                                        mine[rec["pass"]].get("memory_bytes_per_device"))
    return records


def markdown(records: list[dict], args) -> str:
    import jax

    head = (f"causal, B=1, {args.heads} q / {args.kv_heads} kv heads × {args.head_dim}, {args.dtype}, "
            f"{args.devices} devices on `sequence`; ours: lcjax.attention impl={args.impl} layout={args.layout} "
            f"kernel=xla block {args.block}; peers under plain jax.jit with NamedSharding P(None, 'sequence'); "
            f"{args.reps} interleaved repetitions (median); {jax.devices()[0].device_kind}, jax {jax.__version__}"
            f"{'; memory: CPU-backend figures' if jax.devices()[0].platform == 'cpu' else ''}")
    fmt = lambda x, f: "—" if x is None else format(x, f)
    rows = ["| T | variant | pass | ms | GB/device | time peer/ours | memory peer/ours | max abs diff "
            "| collectives |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        coll = ", ".join(f"{k} {v}" for k, v in r.get("collectives", {}).items() if v) or "none"
        if "error" in r:
            rows.append(f"| {r['seq_len']} | {r['variant']} | {r['pass']} | — | "
                        f"{fmt(r.get('memory_bytes_per_device', 0) / 1e9 or None, '.3f')} | — | "
                        f"{fmt(r.get('memory_ratio'), '.2f')} | {r['error'][:70]} | {coll} |")
            continue
        rows.append(f"| {r['seq_len']} | {r['variant']} | {r['pass']} | {fmt(r['seconds_median'] * 1e3, '.1f')} "
                    f"| {r['memory_bytes_per_device'] / 1e9:.3f} | {fmt(r.get('time_ratio'), '.2f')} "
                    f"| {fmt(r.get('memory_ratio'), '.2f')} | {fmt(r.get('max_abs_diff'), '.1e')} | {coll} |")
    return head + "\n\n" + "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" not in sys.modules and "device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    from lcjax.sharding.mesh import make_mesh

    mesh = make_mesh(1, args.devices, 1)
    records = []
    for t in map(int, args.seq_lens.split(",")):
        batch = run_seq_len(args, mesh, t)
        records += batch
        for r in batch:
            print(json.dumps({k: v for k, v in r.items() if k not in ("seconds_all", "memory_parts")}), flush=True)
        if all("error" in r for r in batch):
            break  # nothing fits any more
    text = markdown(records, args)
    print("\n" + text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
