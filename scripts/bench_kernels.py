"""Per-device attention kernels side by side on one GPU: TFLOP/s, forward and forward+backward, of our
kernels next to ``jax.nn.dot_product_attention`` (cuDNN and XLA) and JAX's own Pallas GPU attention ops.

Kernels (``--kernels``):
  pallas_triton, pallas_mosaic, pallas, xla
                              ours, through the public entry lcjax.attention.attention (impl local, default
                              tiles unless --block), with positions and segment ids
  cudnn, dense                jax.nn.dot_product_attention(implementation="cudnn" / "xla"); packed documents
                              become a dense [B, 1, T, T] boolean mask (what this API can express)
  jax_pallas                  jax.experimental.pallas.ops.gpu.attention.mha (Triton backend; no GQA: K/V
                              repeated to N heads; segment ids supported)
  jax_mgpu                    jax.experimental.pallas.ops.gpu.attention_mgpu.attention (Mosaic GPU, Hopper;
                              causal backward not implemented there: its fwd_bwd row records that error)

Masks (``--masks``): ``causal`` (one document), ``segments`` (packed documents of 512..4096 tokens from a fixed
seed, causal inside each, positions restarting per document).

FLOPs (causal-honest, FlashAttention-2, arXiv:2307.08691, §3.1.2): forward 4·N·H·(visible pairs) with
visible pairs T(T+1)/2 for one causal document and Σ L(L+1)/2 over packed documents; forward+backward
counts 3.5× the forward (the backward recomputes the scores and does 4 more matmuls).

Robust by design: every (mask, T, kernel, pass) row is timed in its own try block; a kernel that fails (cuDNN
on a CPU host, an API that changed between JAX versions, dense XLA out of memory at long T) gets its error
recorded and the run continues. Each row is printed (markdown) and the JSON (``--json``) and markdown
(``--md``) files are rewritten as soon as it finishes, so a run cut short keeps every finished row;
``--budget-s`` skips (and records) rows once the time is spent.

    python scripts/bench_kernels.py --seq-lens 4096,16384,32768 --json k.json --md k.md     # on a GPU
    python scripts/bench_kernels.py --seq-lens 256 --heads 4 --kv-heads 2 --head-dim 32 \\
        --kernels pallas_triton,xla,cudnn --iters 1                                          # CPU plumbing

Imports only JAX and lcjax's kernel/attention code (the GPU host has no data dependencies installed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/benchlib.py

from benchlib import timed  # noqa: E402

OURS = ("pallas_triton", "pallas_mosaic", "pallas", "xla")
PEERS = ("cudnn", "dense", "jax_pallas", "jax_mgpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="4096,16384,32768")
    p.add_argument("--kernels", default="pallas_triton,pallas_mosaic,cudnn,jax_pallas,jax_mgpu,dense,xla",
                   help=f"comma-separated, from {', '.join(OURS + PEERS)}")
    p.add_argument("--masks", default="causal,segments")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=None, help="block_q = block_k of our kernels (default: tuned)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--xla-max-len", type=int, default=8192,
                   help="skip (and record) our blockwise-jnp `xla` kernel above this length: a host-synchronised "
                        "branch per block pair makes it minutes-slow on GPUs at 16k+")
    p.add_argument("--budget-s", type=float, default=None, help="skip the remaining rows after this many seconds")
    p.add_argument("--json")
    p.add_argument("--md")
    return p.parse_args(argv)


def document_lengths(t: int, seed: int = 0, low: int = 512, high: int = 4096) -> list[int]:
    """Packed documents filling ``t`` tokens: lengths uniform in [low, high] (fixed seed), the last cut."""
    import numpy as np

    rng, lengths = np.random.default_rng(seed), []
    while sum(lengths) < t:
        lengths.append(int(min(rng.integers(low, high + 1), t - sum(lengths))))
    return lengths


def layout(t: int, mask: str):
    """(positions, segment ids) int32 numpy [T] and the number of visible (query, key) pairs."""
    import numpy as np

    lengths = [t] if mask == "causal" else document_lengths(t)
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)]).astype(np.int32)
    return pos, seg, sum(n * (n + 1) // 2 for n in lengths)


def forward_flops(heads: int, head_dim: int, pairs: int, batch: int = 1) -> float:
    """Two matmuls (QKᵀ and PV) of 2·H FLOPs per visible pair and head."""
    return 4.0 * batch * heads * head_dim * pairs


def attention_fn(name: str, mask: str, pos, seg, heads: int, kv_heads: int, block):
    """f(q, k, v) -> [B, T, N, H] for one kernel and mask (raises for a name it does not know)."""
    import jax
    import jax.numpy as jnp

    pos_j, seg_j = jnp.asarray(pos)[None], jnp.asarray(seg)[None]
    if name in OURS:
        from lcjax.attention import attention
        from lcjax.sharding.mesh import make_mesh

        mesh = make_mesh(1, 1, 1)
        return lambda q, k, v: attention(q, k, v, positions=pos_j, segment_ids=seg_j, mesh=mesh, impl="local",
                                         layout="contiguous", kernel=name, block_q=block, block_k=block)
    if name in ("cudnn", "dense"):
        impl = {"cudnn": "cudnn", "dense": "xla"}[name]
        if mask == "causal":
            return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        dense = ((seg_j[:, :, None] == seg_j[:, None, :]) & (pos_j[:, None, :] <= pos_j[:, :, None]))[:, None]
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense, implementation=impl)
    group = heads // kv_heads
    if name == "jax_pallas":
        from jax.experimental.pallas.ops.gpu import attention as jax_attention

        segments = None if mask == "causal" else seg_j
        return lambda q, k, v: jax_attention.mha(q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2),
                                                 segments, sm_scale=q.shape[-1] ** -0.5, causal=True)
    if name == "jax_mgpu":
        if mask != "causal":
            raise NotImplementedError("attention_mgpu takes no segment ids")
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
        return lambda q, k, v: attention_mgpu.attention(q, k, v, config)
    raise ValueError(f"unknown kernel {name!r}: one of {', '.join(OURS + PEERS)}")


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def markdown_header(args, device: str, jax_version: str) -> str:
    return (f"{args.heads} q / {args.kv_heads} kv heads × {args.head_dim}, {args.dtype}, causal; "
            f"{device}, jax {jax_version}, {time.strftime('%Y-%m-%d')}\n\n"
            "| mask | T | kernel | pass | ms | TFLOP/s |\n|---|---|---|---|---|---|")


def markdown_row(r: dict) -> str:
    value = (f"{r['seconds'] * 1e3:.2f} | {r['tflops']:.1f}" if "seconds" in r
             else f"— | {r.get('error', r.get('skipped', ''))[:90]}")
    return f"| {r['mask']} | {r['seq_len']} | {r['kernel']} | {r['pass']} | {value} |"


def run(args, emit=print):
    """Time every row; ``emit(record)`` after each. Returns the records."""
    import jax
    import jax.numpy as jnp

    t_start, records = time.perf_counter(), []
    dt = jnp.dtype(args.dtype)
    for mask in args.masks.split(","):
        for t in map(int, args.seq_lens.split(",")):
            pos, seg, pairs = layout(t, mask)
            ks = jax.random.split(jax.random.key(0), 3)
            q = jax.random.normal(ks[0], (1, t, args.heads, args.head_dim), dt)
            k = jax.random.normal(ks[1], (1, t, args.kv_heads, args.head_dim), dt)
            v = jax.random.normal(ks[2], (1, t, args.kv_heads, args.head_dim), dt)
            fwd_flops = forward_flops(args.heads, args.head_dim, pairs)
            for name in args.kernels.split(","):
                for pass_name, factor in (("fwd", 1.0), ("fwd_bwd", 3.5)):
                    record = {"kernel": name, "mask": mask, "seq_len": t, "pass": pass_name,
                              "flops": factor * fwd_flops}
                    if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
                        record["skipped"] = f"budget of {args.budget_s:g} s spent"
                    elif name == "xla" and t > args.xla_max_len:
                        record["skipped"] = f"xla kernel above --xla-max-len {args.xla_max_len}"
                    else:
                        try:
                            attend = attention_fn(name, mask, pos, seg, args.heads, args.kv_heads, args.block)
                            loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))
                            fn = jax.jit(attend) if pass_name == "fwd" else jax.jit(jax.grad(loss, (0, 1, 2)))
                            seconds = timed(fn, q, k, v, iters=args.iters)
                            record.update(seconds=seconds, tflops=record["flops"] / seconds / 1e12)
                        except Exception as e:  # recorded, not hidden; the next row still runs
                            record["error"] = _error(e)
                    records.append(record)
                    emit(record)
            del q, k, v
    return records


def main(argv=None) -> int:
    import jax

    args = parse_args(argv)
    device = jax.devices()[0].device_kind
    header = markdown_header(args, device, jax.__version__)
    print(header, flush=True)
    rows, records = [], []

    def emit(record):
        records.append(record)
        rows.append(markdown_row(record))
        print(rows[-1], flush=True)
        meta = {"device": device, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
        if args.json:
            Path(args.json).write_text(json.dumps({**meta, "records": records}, indent=1))
        if args.md:
            Path(args.md).write_text("\n".join([header, *rows]) + "\n")

    run(args, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
