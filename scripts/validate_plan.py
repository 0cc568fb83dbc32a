"""Compare the analytic planner's per-device memory with XLA's for the real lcjax train step.

    python scripts/validate_plan.py --config configs/demo.yaml --seq-len 4096 --mesh 1,4,2 [--json]
    python scripts/validate_plan.py --config configs/models/llama2_7b.yaml --seq-len 32768 --mesh 16,4,1 \
        --set data.global_batch=16 --set train.dtype=bfloat16

The step is compiled, never run, on a mesh of simulated host devices (at most 64): parameters, optimizer
state and the batch are ``jax.ShapeDtypeStruct``s with their shardings and the model is built with
``nnx.eval_shape``, so nothing of a 7B model is allocated. XLA's per-device figure is argument + output +
temporary − alias bytes of ``compiled.memory_analysis()`` (DESIGN.md, "Numbers"). Only ``--target cpu``
is implemented: CPU-backend figures are estimates of a GPU's (the CPU compiler widens bfloat16 arithmetic to
float32 and schedules differently), labelled so in the output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcjax import config as config_lib  # noqa: E402
from lcjax import plan as plan_lib  # noqa: E402
from lcjax.sharding.mesh import provision_host_devices  # noqa: E402

MAX_DEVICES = 64
TARGETS = ("cpu",)


def parse_mesh(text: str) -> tuple[int, int, int]:
    """'16,4,1' -> (16, 4, 1); raises ValueError naming --mesh."""
    try:
        mesh = tuple(int(x) for x in text.split(","))
    except ValueError:
        mesh = ()
    if len(mesh) != 3 or min(mesh) < 1:
        raise ValueError(f"--mesh {text!r} must be three positive integers D,S,M")
    if mesh[0] * mesh[1] * mesh[2] > MAX_DEVICES:
        raise ValueError(f"--mesh {text}: at most {MAX_DEVICES} simulated devices")
    return mesh


def load_config(path, seq_len, mesh, overrides=()) -> config_lib.Config:
    """The config with the mesh and sequence length applied (validated)."""
    extra = [f"mesh.data={mesh[0]}", f"mesh.sequence={mesh[1]}", f"mesh.model={mesh[2]}"]
    if seq_len is not None:
        extra.append(f"data.seq_len={seq_len}")
    return config_lib.load(path, [*overrides, *extra])


def abstract_state(cfg, mesh):
    """(graphdef, specs, optimizer, TrainState of ShapeDtypeStructs with shardings): nothing allocated."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from lcjax.train.optim import make_optimizer
    from lcjax.train.state import model_graph, opt_state_shardings, param_shardings
    from lcjax.train.step import TrainState

    sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    graphdef, abstract = model_graph(cfg)
    specs, shardings = param_shardings(cfg, mesh, abstract)
    params = jax.tree.map(sds, abstract, shardings)
    optimizer = make_optimizer(cfg.train, params)
    opt_abstract = jax.eval_shape(optimizer.init, params)
    opt_state = jax.tree.map(sds, opt_abstract, opt_state_shardings(optimizer, params, shardings))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    return graphdef, specs, optimizer, TrainState(params, opt_state, step, {})


def xla_memory(cfg) -> dict:
    """Compile the train step of ``cfg`` on simulated CPU devices; XLA's per-device bytes and parts.

    Needs mesh.data·mesh.sequence·mesh.model host devices (provisioned before JAX starts).
    """
    import jax
    import jax.numpy as jnp

    from lcjax.sharding.mesh import make_mesh
    from lcjax.train.step import BATCH_FIELDS, batch_sharding, make_train_step

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model)
    graphdef, specs, optimizer, state = abstract_state(cfg, mesh)
    shape = (cfg.data.global_batch, cfg.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh)) for k in BATCH_FIELDS}
    t0 = time.perf_counter()
    compiled = make_train_step(graphdef, specs, mesh, cfg, optimizer).lower(state, batch).compile()
    ma = compiled.memory_analysis()
    parts = {"argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
             "temp": ma.temp_size_in_bytes, "alias": ma.alias_size_in_bytes}
    total = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
    return {"xla_bytes_per_device": total, "xla_parts": parts, "compile_s": time.perf_counter() - t0,
            "backend": jax.devices()[0].platform}


def plan_memory(cfg) -> dict:
    """The planner's per-device bytes for ``cfg`` as lcjax trains it today (no remat, no ZeRO): as on a
    GPU (activations in the compute dtype) and as on the CPU backend (bfloat16 kept as float32), with
    both activation estimates (lcjax.plan.memory)."""
    out = {}
    for model in ("lcjax", "formulas"):
        for name, stored in (("gpu", None), ("cpu", 4)):
            inputs = plan_lib.StepInputs.from_config(cfg, activation_model=model, stored_bytes=stored)
            p = plan_lib.plan_step(inputs, plan_lib.device("cpu"))
            out[f"{model}_{name}"] = p.memory.as_dict()
    return {"plan_bytes_per_device": out["lcjax_cpu"]["total"], "plan_parts": out["lcjax_cpu"],
            "plan_variants": out}


def compare(cfg) -> dict:
    """Plan and XLA side by side, with the relative gap (plan − xla) / xla."""
    out = {**plan_memory(cfg), **xla_memory(cfg)}
    out["relative_gap"] = (out["plan_bytes_per_device"] - out["xla_bytes_per_device"]) / out["xla_bytes_per_device"]
    out["label"] = ("CPU backend: XLA's figure and plan_bytes_per_device (plan_variants lcjax_cpu) both keep "
                    "bfloat16 activations as float32; plan_variants *_gpu is the planner's GPU estimate")
    out["mesh"] = {"data": cfg.mesh.data, "sequence": cfg.mesh.sequence, "model": cfg.mesh.model}
    out["seq_len"], out["dtype"] = cfg.data.seq_len, cfg.train.dtype
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--mesh", required=True, help="D,S,M sizes of data, sequence, model")
    parser.add_argument("--target", default="cpu", help="compile target; only cpu is implemented")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.target not in TARGETS:
            raise ValueError(f"--target {args.target!r} must be one of {', '.join(TARGETS)} "
                             "(GPU deviceless compilation is not implemented)")
        mesh = parse_mesh(args.mesh)
        cfg = load_config(args.config, args.seq_len, mesh, args.set)
    except ValueError as e:
        print(f"validate_plan: error: {e}", file=sys.stderr)
        return 2
    provision_host_devices(mesh[0] * mesh[1] * mesh[2])
    result = compare(cfg)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        gb = lambda b: f"{b / 1e9:.3f} GB"
        print(f"mesh {args.mesh}, T={cfg.data.seq_len}, {cfg.train.dtype}; {result['label']}")
        print(f"plan {gb(result['plan_bytes_per_device'])} "
              + " ".join(f"{k}={gb(v)}" for k, v in result["plan_parts"].items()))
        print(f"xla  {gb(result['xla_bytes_per_device'])} "
              + " ".join(f"{k}={gb(v)}" for k, v in result["xla_parts"].items())
              + f" (compiled in {result['compile_s']:.1f} s)")
        print(f"gap (plan - xla) / xla = {result['relative_gap']:+.1%}")
        for name, parts in result["plan_variants"].items():
            print(f"  plan variant {name}: total {gb(parts['total'])}, activations {gb(parts['activations'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
