"""What the attention kernels compile to on a GPU, without a GPU: a deviceless compile of the public entry
``lcjax.attention.attention`` (forward and backward) for an H100/H200/A100 target, with XLA's PTX dumped
and read (lcjax.kernels.flash_attention.ptx): per matmul kernel, asynchronous loads (cp.async, TMA),
wgmma shapes and Ampere mma.sync.

    python scripts/kernel_ptx.py                                   # pallas_triton, H100, bf16, T=4096, 32/8 x 128
    python scripts/kernel_ptx.py --kernel xla --json ptx.json      # XLA's own fusions
    python scripts/kernel_ptx.py --kernel pallas_mosaic            # Mosaic GPU kernels (their own PTX dump)
    python scripts/kernel_ptx.py --check                           # exit 1 when a matmul kernel is not Hopper-ready

Needs the ``aot`` extra (jax-cuda13-plugin); runs with JAX_PLATFORMS=cpu (set here when unset).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="h100", help="h100, h200 or a100")
    p.add_argument("--kernel", default="pallas_triton")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--block-q", type=int, default=None, help="default: the kernel's own tiles")
    p.add_argument("--block-k", type=int, default=None)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--check", action="store_true", help="exit 1 when a matmul kernel has a Hopper problem")
    p.add_argument("--json")
    return p.parse_args(argv)


def attention_lowered(target="h100", kernel="pallas_triton", seq_len=4096, heads=32, kv_heads=8, head_dim=128,
                      dtype="bfloat16", block_q=None, block_k=None, window=None):
    """``jax.jit(value_and_grad(sum ∘ attention)).lower(...)`` on one deviceless GPU of ``target``
    (impl "local", contiguous layout, causal, positions as arguments). Raises RuntimeError without the
    aot extra."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lcjax.attention import attention
    from lcjax.sharding.mesh import deviceless_gpus, make_mesh

    mesh = make_mesh(1, 1, 1, devices=deviceless_gpus(target, 1))
    sharding = NamedSharding(mesh, P())
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    dt = jnp.dtype(dtype)
    q = sds((1, seq_len, heads, head_dim), dt)
    kv = sds((1, seq_len, kv_heads, head_dim), dt)
    ints = sds((1, seq_len), jnp.int32)

    def loss(q, k, v, pos, seg):
        out = attention(q, k, v, positions=pos, segment_ids=seg, mesh=mesh, impl="local", layout="contiguous",
                        kernel=kernel, window=window, block_q=block_q, block_k=block_k)
        return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(q, kv, kv, ints, ints)


def kernel_facts(args) -> list:
    """[KernelPtx] of every kernel of the compiled program (temporary dump directories): XLA's kernels and
    the Mosaic GPU kernels (pallas_mosaic), whose PTX only the CUDA plugin's own dump holds."""
    from lcjax.kernels.flash_attention import ptx

    lowered = attention_lowered(args.target, args.kernel, args.seq_len, args.heads, args.kv_heads, args.head_dim,
                                args.dtype, args.block_q, args.block_k, args.window)
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as m:
        with ptx.mosaic_dump(m):
            facts = ptx.compile_and_read(lowered, d)
        mosaic = ptx.read_mosaic_dump(m)
    for kernel, report in mosaic:
        print("ptxas:", report or f"{kernel.name}: no report", file=sys.stderr)
    return facts + [k for k, _ in mosaic]


def markdown(facts) -> str:
    from lcjax.kernels.flash_attention import ptx

    lines = ["| kernel | cp.async | cp.async.bulk | wgmma (m64nNk16: count) | mma.sync | Hopper-ready |",
             "|---|---|---|---|---|---|"]
    for k in facts:
        if not k.is_matmul:
            continue
        shapes = ", ".join(f"N={n}: {c}" for n, c in k.wgmma.items()) or "—"
        ready = "yes" if not ptx.hopper_problems(k) else "no"
        lines.append(f"| {k.name} | {k.cp_async} | {k.cp_async_bulk} | {shapes} | {k.mma_sync} | {ready} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args = parse_args(argv)
    import jax

    from lcjax.kernels.flash_attention import ptx

    facts = kernel_facts(args)
    print(f"deviceless {args.target} compile of lcjax.attention.attention (kernel={args.kernel}, forward + "
          f"backward, {args.dtype}, T={args.seq_len}, {args.heads}/{args.kv_heads} heads x {args.head_dim}, "
          f"block_q={args.block_q}, block_k={args.block_k}, window={args.window}); jax {jax.__version__}\n")
    print(markdown(facts))
    problems = [p for k in facts for p in ptx.hopper_problems(k)]
    for p in problems:
        print("problem:", p)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "kernels": [
            {**k._asdict(), "wgmma": {str(n): c for n, c in k.wgmma.items()}, "problems": ptx.hopper_problems(k)}
            for k in facts]}, indent=1))
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
