"""Minimal reproduction: does a deviceless GPU compile accept remat host offload, and what does XLA's memory
analysis report for host memory?

    JAX_PLATFORMS=cpu python scripts/offload_repro.py --target h100 [--json]

A scanned stack of L tanh-matmul layers; one activation [T, D] per layer (an inner one named "x", or the
layer input named "input") saved on the device or offloaded by
``jax.checkpoint_policies.save_and_offload_only_these_names(offload_src="device", offload_dst="pinned_host")``,
compiled (never run) on one deviceless GPU of the target; prints, per policy, XLA's memory analysis fields
(device and host_* ones) and whether the compiled HLO holds host memory-space (S(5)) buffers.

``offload_in_inner_loop`` is the one case XLA (jax 0.10.2) cannot compile for a GPU: a value offloaded
from inside a loop nested in the scanned layer (what ``train.head_chunks`` > 1 with ``train.offload=saved``
produces: the ring's residuals named inside the head-group ``lax.map``) fails in XLA's host offloader with
"INTERNAL: during context [end-of-post-layout_assignment]: Expected instruction to have shape equal to
..." (the loop's stacked residual is placed in host memory, S(5), where the loop's tuple shape expects
device memory). lcjax works around it by unrolling the head groups under offload=saved
(lcjax/model/chunking.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(target: str, layers: int = 8, tokens: int = 4096, width: int = 1024) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.ad_checkpoint import checkpoint_name

    from lcjax.sharding.mesh import deviceless_gpus

    device = deviceless_gpus(target, 1)[0] if target != "cpu" else jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    offload = lambda *names: jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=names,
        offload_src="device", offload_dst="pinned_host")
    policies = {  # name -> (policy, name the layer input?)
        "save_inner": (jax.checkpoint_policies.save_only_these_names("x"), False),
        "offload_inner": (offload("x"), False),
        "save_input": (jax.checkpoint_policies.nothing_saveable, False),
        "offload_input": (offload("input"), True),
    }
    policies["offload_in_inner_loop"] = (offload("input", "x"), True)  # "x" named inside a lax.map
    out = {}
    for name, (policy, name_input) in policies.items():
        def layer(x, w, name_input=name_input, inner=name.endswith("inner_loop")):
            if name_input:  # every use of the layer input goes through the named copy
                x = checkpoint_name(x, "input")
            if inner:  # as train.head_chunks: the named value is made in a loop over 4 column groups
                parts = jax.lax.map(lambda wg: checkpoint_name(jnp.tanh(x @ wg), "x"),
                                    w.reshape(width, 4, width // 4).transpose(1, 0, 2))
                y = parts.transpose(1, 0, 2).reshape(tokens, width)
            else:
                y = checkpoint_name(jnp.tanh(x @ w), "x")
            return jnp.tanh(y @ w.T), None

        def loss(ws, x):
            y, _ = jax.lax.scan(jax.checkpoint(layer, policy=policy), x, ws)
            return jnp.sum(y.astype(jnp.float32))

        ws = jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16, sharding=sharding)
        x = jax.ShapeDtypeStruct((tokens, width), jnp.bfloat16, sharding=sharding)
        try:
            compiled = jax.jit(jax.grad(loss)).lower(ws, x).compile()
        except Exception as e:  # the blocker, verbatim first line
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
            continue
        ma = compiled.memory_analysis()
        fields = {k: getattr(ma, k) for k in dir(ma) if k.endswith("_in_bytes")}
        text = compiled.as_text()
        out[name] = {**fields, "host_buffers_in_hlo": text.count("S(5)")}
    out["activation_bytes_per_layer"] = tokens * width * 2
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="h100")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.target != "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    result = run(args.target)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
