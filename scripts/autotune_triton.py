"""Autotune the Pallas (Triton) flash kernels' tile table on the GPU it runs on (needs a GPU).

For each head dim (``--head-dims``) and ``--dtype``, times every candidate launch configuration
[block_q, block_k, num_warps, num_stages] of each pass on a causal sequence of ``--seq-len`` tokens
(``--heads`` / ``--kv-heads``): the forward alone; dK/dV with dQ held at the current table's entry; then dQ
with the best dK/dV. Candidates whose shared-memory estimate exceeds the GPU's are left out; one that fails
to compile (shared memory, registers) is recorded with its error and skipped. The best configuration's
outputs are compared with the table's current one (relative error; float32 accumulation in both, so it
must be small) before it is proposed.

    python scripts/autotune_triton.py --json tune.json                 # propose entries (prints them)
    python scripts/autotune_triton.py --head-dims 128 --write          # also rewrite triton_tiles.json

Each record is appended to ``--json`` as it finishes; ``--budget-s`` stops timing new candidates once spent.
Imports only JAX and lcjax's kernel code.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/benchlib.py

from benchlib import timed  # noqa: E402

CANDIDATES = {  # (block_q, block_k) per pass; each with warps {4, 8} and the stages below
    "fwd": ([(64, 64), (64, 128), (128, 64), (128, 128)], (2, 3, 4)),
    "dkv": ([(32, 64), (32, 128), (64, 64), (64, 128), (128, 128)], (1, 2, 3)),
    "dq": ([(64, 32), (64, 64), (128, 32), (128, 64), (128, 128)], (1, 2, 3)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dims", default="64,128,256")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--json")
    p.add_argument("--write", action="store_true", help="merge the best entries into triton_tiles.json")
    return p.parse_args(argv)


def candidates(pass_name: str, head_dim: int, itemsize: int, family: str):
    """PassConfigs to try for one pass, without those whose shared memory estimate exceeds the GPU's."""
    from lcjax.kernels.flash_attention import triton_tiles as tt

    tiles, stages = CANDIDATES[pass_name]
    budget = tt.SHARED_MEMORY.get(family, tt.SHARED_MEMORY["default"])
    for (bq, bk), warps, st in itertools.product(tiles, (4, 8), stages):
        if tt.shared_memory_bytes(pass_name, bq, bk, head_dim, itemsize, st) <= budget:
            yield tt.PassConfig(bq, bk, warps, st)


def relative_error(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def tune_head_dim(args, head_dim: int, family: str, record):
    """{pass: PassConfig} of the fastest candidates for one head dim (``record(dict)`` after each try)."""
    import jax
    import jax.numpy as jnp

    from lcjax.kernels.flash_attention import pallas_triton as pt

    dt = jnp.dtype(args.dtype)
    t, n, kh = args.seq_len, args.heads, args.kv_heads
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (1, t, n, head_dim), dt)
    k = jax.random.normal(ks[1], (1, t, kh, head_dim), dt)
    v = jax.random.normal(ks[2], (1, t, kh, head_dim), dt)
    do = jax.random.normal(ks[3], (1, t, n, head_dim), dt)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    seg = jnp.zeros_like(pos)
    current = pt.pass_configs(dt, head_dim, t, t)
    out, lse = jax.jit(lambda q, k, v: pt.flash_forward(q, k, v, pos, pos, seg, seg))(q, k, v)

    def fwd(cfgs):
        return jax.jit(lambda q, k, v: pt.flash_forward(q, k, v, pos, pos, seg, seg, configs=cfgs))

    def bwd(cfgs):
        return jax.jit(lambda q, k, v: pt.flash_backward(q, k, v, out, lse, do, pos, pos, seg, seg, configs=cfgs))

    best = dict(current)
    start = time.perf_counter()
    for pass_name in ("fwd", "dkv", "dq"):
        results = []
        for cfg in candidates(pass_name, head_dim, dt.itemsize, family):
            rec = {"head_dim": head_dim, "dtype": dt.name, "pass": pass_name, "config": list(cfg)}
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                rec["skipped"] = "budget spent"
            else:
                cfgs = {**best, pass_name: cfg}
                try:
                    fn = fwd(cfgs) if pass_name == "fwd" else bwd(cfgs)
                    rec["seconds"] = timed(fn, q, k, v, iters=args.iters)
                    results.append((rec["seconds"], cfg))
                except Exception as e:  # shared memory / register overflow: recorded, skipped
                    rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}"
            record(rec)
        if results:
            best[pass_name] = min(results)[1]
    # the proposal must agree with the current configuration (both accumulate in float32)
    ref_f, new_f = fwd(current)(q, k, v), fwd(best)(q, k, v)
    ref_b, new_b = bwd(current)(q, k, v), bwd(best)(q, k, v)
    errors = [relative_error(a, b) for a, b in zip((new_f[0], *new_b), (ref_f[0], *ref_b))]
    record({"head_dim": head_dim, "dtype": dt.name, "best": {p: list(c) for p, c in best.items()},
            "relative_error_vs_current": errors})
    if max(errors) > (1e-5 if dt == jnp.float32 else 2e-2):
        raise RuntimeError(f"head dim {head_dim}: best configuration disagrees with the current one: {errors}")
    return best


def write_table(entries: list[dict], path=None):
    """Merge ``entries`` into the JSON table (an entry replaces one with the same gpu/head_dim/dtype)."""
    from lcjax.kernels.flash_attention import triton_tiles as tt

    path = Path(path or tt.TABLE_PATH)
    table = json.loads(path.read_text())
    key = lambda e: (e["gpu"], int(e["head_dim"]), e["dtype"])
    new = {key(e): e for e in entries}
    table["entries"] = [e for e in table["entries"] if key(e) not in new] + list(new.values())
    table["entries"].sort(key=key)
    path.write_text(json.dumps(table, indent=1) + "\n")
    tt.load_table.cache_clear()


def main(argv=None) -> int:
    import jax

    from lcjax.kernels.flash_attention import triton_tiles as tt

    args = parse_args(argv)
    device = jax.devices()[0]
    if device.platform != "gpu":
        print(f"autotune needs a GPU; found {device.platform}", file=sys.stderr)
        return 2
    family = tt.gpu_family("gpu", device.device_kind)
    records = []

    def record(rec):
        records.append(rec)
        print(json.dumps(rec), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"device": device.device_kind, "jax": jax.__version__,
                                                   "args": vars(args), "records": records}, indent=1))

    entries = []
    for hd in map(int, args.head_dims.split(",")):
        best = tune_head_dim(args, hd, family, record)
        source = (f"autotuned on {device.device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}, "
                  f"causal T={args.seq_len}, {args.heads}/{args.kv_heads} heads")
        entries.append({"gpu": family, "head_dim": hd, "dtype": "float32" if args.dtype == "float32" else "bfloat16",
                        **{p: list(c) for p, c in best.items()}, "source": source})
    print(json.dumps({"entries": entries}, indent=1))
    if args.write:
        write_table(entries)
        print(f"wrote {tt.TABLE_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
