"""Per-device attention kernels side by side on one GPU: a parity stage against the dense float32 reference,
then TFLOP/s, forward and forward+backward, of our kernels next to ``jax.nn.dot_product_attention`` (cuDNN
and XLA) and JAX's own Pallas GPU attention ops — one table in one run.

Kernels (``--kernels``):
  any name of lcjax.kernels.flash_attention.api.KERNELS (xla, pallas, pallas_triton, cudnn, pallas_mosaic
                   where this checkout registers it), selected by name through the public entry
                   lcjax.attention.attention (impl local, default tiles unless --block), with positions and
                   segment ids; a name this checkout does not register is skipped with that reason
  cudnn_dense      jax.nn.dot_product_attention(implementation="cudnn"): cuDNN on the whole sequence, the peer
                   of our per-block ``cudnn``; packed documents become a dense [B, 1, T, T] boolean mask
  dense            the same API with implementation="xla" (materialises the scores)
  jax_pallas       jax.experimental.pallas.ops.gpu.attention.mha (Triton backend; no GQA: K/V repeated to N
                   heads; segment ids supported)
  jax_mgpu         jax.experimental.pallas.ops.gpu.attention_mgpu.attention (Mosaic GPU, Hopper,
                   FlashAttention-3 class; causal backward not implemented there: its fwd_bwd row records that)

Parity first (``--parity-len`` T, one causal document, the timing dtype and head sizes): every kernel's output
and dq, dk, dv against lcjax.ops.attention.reference in float32, relative error max|a − b| / max|b| ≤
``--parity-tol`` (2e-2, the design's bf16 tolerance). A kernel's ``fwd`` rows are timed only when its
output passed, its ``fwd_bwd`` rows only when its gradients passed too; a failed or erroring kernel is
reported (parity table) and its rows say why they were not timed. ``--parity-from FILE`` takes the parity
records of an earlier ``--parity-only`` run (scripts/gpu_bench.sh runs parity as its own stage) instead; a
kernel missing from that file is not timed.

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

    python scripts/bench_kernels.py --seq-lens 16384,32768 --masks causal --json k.json --md k.md    # on a GPU
    python scripts/bench_kernels.py --seq-lens 256 --heads 4 --kv-heads 2 --head-dim 32 --parity-len 128 \\
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

PEERS = ("cudnn_dense", "dense", "jax_pallas", "jax_mgpu")
EXPECTED = ("pallas_triton", "pallas_mosaic", "cudnn")  # kernels the GPU benchmark expects to find


class NotRegistered(Exception):
    """A kernel name this checkout's lcjax.kernels.flash_attention.api.KERNELS does not hold."""


def registered() -> tuple:
    """The kernel names of this checkout (api.KERNELS; a table of names to modules or module paths)."""
    from lcjax.kernels.flash_attention import api

    return tuple(api.KERNELS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="4096,16384,32768")
    p.add_argument("--kernels", default="pallas_triton,pallas_mosaic,cudnn,cudnn_dense,jax_pallas,jax_mgpu,dense,xla",
                   help=f"comma-separated: names of lcjax's api.KERNELS and peers {', '.join(PEERS)}")
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
    p.add_argument("--parity-len", type=int, default=1024, help="T of the parity stage (one causal document)")
    p.add_argument("--parity-tol", type=float, default=2e-2,
                   help="largest relative error that passes parity (float32 inputs: 1e-5, the design's tolerance)")
    p.add_argument("--parity-dtypes", default=None,
                   help="comma-separated dtypes of the parity stage (default: --dtype); only --dtype gates timing")
    p.add_argument("--parity-only", action="store_true", help="run the parity stage only (no timing)")
    p.add_argument("--parity-from", help="parity records (JSON of a --parity-only run) instead of a parity stage")
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
    """f(q, k, v) -> [B, T, N, H] for one kernel and mask. Raises NotRegistered for a name that is neither a
    peer nor a kernel of this checkout."""
    import jax
    import jax.numpy as jnp

    pos_j, seg_j = jnp.asarray(pos)[None], jnp.asarray(seg)[None]
    if name in ("cudnn_dense", "dense"):
        impl = {"cudnn_dense": "cudnn", "dense": "xla"}[name]
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
    if name not in registered():
        raise NotRegistered(f"not registered in this checkout's lcjax.kernels.flash_attention.api.KERNELS "
                            f"({', '.join(registered())})")
    from lcjax.attention import attention
    from lcjax.sharding.mesh import make_mesh

    mesh = make_mesh(1, 1, 1)
    return lambda q, k, v: attention(q, k, v, positions=pos_j, segment_ids=seg_j, mesh=mesh, impl="local",
                                     layout="contiguous", kernel=name, block_q=block, block_k=block)


def _inputs(t: int, args, seed: int = 0, dtype=None):
    """Random q [1, T, N, H], k, v [1, T, K, H] in ``dtype`` (default --dtype) and dout [1, T, N, H] float32."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(args.dtype if dtype is None else dtype)
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (1, t, args.heads, args.head_dim), dt)
    k = jax.random.normal(ks[1], (1, t, args.kv_heads, args.head_dim), dt)
    v = jax.random.normal(ks[2], (1, t, args.kv_heads, args.head_dim), dt)
    return q, k, v, jax.random.normal(ks[3], q.shape, jnp.float32)


def parity(args, names, emit=print):
    """The parity stage: per kernel a record {kernel, seq_len, dtype, relative_errors (out, dq, dk, dv),
    fwd_ok, fwd_bwd_ok, error?}, against the dense float32 reference on the device. ``emit(record)``
    after each. Returns the records."""
    import jax
    import jax.numpy as jnp

    from lcjax.ops.attention import reference

    t = args.parity_len
    pos, seg, _ = layout(t, "causal")
    pos_j = jnp.asarray(pos)[None]
    f32 = lambda x: x.astype(jnp.float32)
    rel = lambda a, r: float(jnp.max(jnp.abs(f32(a) - r)) / jnp.max(jnp.abs(r)))
    records = []
    for dtype in (args.parity_dtypes or args.dtype).split(","):
        q, k, v, do = _inputs(t, args, seed=1, dtype=dtype)
        tol = 1e-5 if dtype == "float32" else args.parity_tol

        def out_and_grads(fn, *xs):
            out, vjp = jax.vjp(lambda *a: f32(fn(*a)), *xs)
            return out, vjp(do)

        with jax.default_matmul_precision("highest"):
            ref_out, ref_grads = jax.jit(lambda *a: out_and_grads(
                lambda *b: reference(*b, positions=pos_j), *a))(f32(q), f32(k), f32(v))
        for name in names:
            record = {"kernel": name, "seq_len": t, "dtype": dtype, "tolerance": tol, "fwd_ok": False,
                      "fwd_bwd_ok": False}
            try:
                fn = attention_fn(name, "causal", pos, seg, args.heads, args.kv_heads, args.block)
                errors = {"out": rel(jax.jit(fn)(q, k, v), ref_out)}
                record.update(relative_errors=errors, fwd_ok=errors["out"] <= tol)
                grads = jax.jit(lambda *a: out_and_grads(fn, *a)[1])(q, k, v)
                errors.update({g: rel(a, r) for g, a, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
                record["fwd_bwd_ok"] = record["fwd_ok"] and max(errors.values()) <= tol
            except NotRegistered as e:
                record["skipped"] = str(e)
            except Exception as e:  # recorded: the kernel is reported and not timed
                record["error"] = _error(e)
            records.append(record)
            emit(record)
    return records


def parity_row(r: dict) -> str:
    errs = r.get("relative_errors", {})
    cells = " | ".join(f"{errs[g]:.1e}" if g in errs else "—" for g in ("out", "dq", "dk", "dv"))
    verdict = ("skipped: " + r["skipped"] if "skipped" in r else
               ("fwd + bwd OK" if r["fwd_bwd_ok"] else "fwd OK, bwd FAIL" if r["fwd_ok"] else "FAIL")
               + (f" ({r['error']})" if "error" in r else ""))
    return f"| {r['kernel']} | {r['seq_len']} | {r['dtype']} | {cells} | {verdict[:120]} |"


PARITY_HEADER = ("| kernel | T | dtype | out | dq | dk | dv | parity (relative error ≤ tolerance) |\n"
                 "|---|---|---|---|---|---|---|---|")


def not_timed(parity_records, name: str, pass_name: str, dtype: str) -> str | None:
    """Why the ``pass_name`` row of kernel ``name`` in ``dtype`` is not timed (None: it passed parity)."""
    record = next((r for r in parity_records if r["kernel"] == name and r["dtype"] == dtype), None)
    if record is None:
        return f"no {dtype} parity record"
    if "skipped" in record:
        return record["skipped"]
    if record["fwd_bwd_ok" if pass_name == "fwd_bwd" else "fwd_ok"]:
        return None
    return "parity failed" + (f": {record['error']}" if "error" in record else "")


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


def run(args, parity_records, emit=print):
    """Time every row that passed parity; ``emit(record)`` after each. Returns the records."""
    import jax
    import jax.numpy as jnp

    t_start, records = time.perf_counter(), []
    for mask in args.masks.split(","):
        for t in map(int, args.seq_lens.split(",")):
            pos, seg, pairs = layout(t, mask)
            q, k, v, _ = _inputs(t, args)
            fwd_flops = forward_flops(args.heads, args.head_dim, pairs)
            for name in args.kernels.split(","):
                for pass_name, factor in (("fwd", 1.0), ("fwd_bwd", 3.5)):
                    record = {"kernel": name, "mask": mask, "seq_len": t, "pass": pass_name,
                              "flops": factor * fwd_flops}
                    why_not = not_timed(parity_records, name, pass_name, args.dtype)
                    if why_not:
                        record["skipped"] = why_not
                    elif args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
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
    names = args.kernels.split(",")
    meta = {"device": device, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    lines, parity_records, records = [], [], []

    def write():
        if args.json:
            Path(args.json).write_text(json.dumps({**meta, "parity": parity_records, "records": records}, indent=1))
        if args.md:
            Path(args.md).write_text("\n".join(lines) + "\n")

    def say(line):
        lines.append(line)
        print(line, flush=True)
        write()

    if args.parity_from:
        source = Path(args.parity_from)
        parity_records = ([r for r in json.loads(source.read_text())["parity"] if r["kernel"] in names]
                          if source.exists() else [])  # no parity stage result: nothing is timed
        say(f"Parity (from {args.parity_from}):\n\n{PARITY_HEADER}")
        for r in parity_records:
            say(parity_row(r))
    else:
        say(f"Parity against the dense float32 reference, causal, T={args.parity_len}, {args.heads}/{args.kv_heads} "
            f"heads × {args.head_dim}; {device}, jax {jax.__version__}\n\n{PARITY_HEADER}")

        def emit_parity(record):
            parity_records.append(record)
            say(parity_row(record))

        parity(args, names, emit_parity)
    if args.parity_only:
        return 0
    say("\n" + markdown_header(args, device, jax.__version__))

    def emit(record):
        records.append(record)
        say(markdown_row(record))

    run(args, parity_records, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
