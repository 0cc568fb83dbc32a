"""Compare the analytic planner's per-device memory with XLA's for the real lcjax train step.

    python scripts/validate_plan.py --config configs/demo.yaml --seq-len 4096 --mesh 1,4,2 [--json]
    python scripts/validate_plan.py --config configs/demo.yaml --mesh 1,4,2 --target h100 --schedule
    python scripts/validate_plan.py --config configs/models/llama2_7b.yaml --seq-len 32768 --mesh 16,4,1 \
        --set data.global_batch=16 --set train.dtype=bfloat16

The step is compiled, never run, on a mesh of simulated host devices (at most 64): parameters, optimizer
state and the batch are ``jax.ShapeDtypeStruct``s with their shardings and the model is built with
``nnx.eval_shape``, so nothing of a 7B model is allocated. XLA's per-device figure is argument + output +
temporary − alias bytes of ``compiled.memory_analysis()`` (docs/design.md, "Numbers"). ``--target cpu`` compiles
for simulated host devices (at most 64): its figures only estimate a GPU's (the CPU compiler widens bfloat16
arithmetic to float32 and schedules differently) and are labelled so. ``--target a100|h100|h200`` compiles
for that GPU without one (the ``aot`` extra; XLA's real GPU pipeline on the CPU host, see
lcjax.sharding.mesh.deviceless_gpus): those are the per-device figures to compare with GPU measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcjax import config as config_lib  # noqa: E402
from lcjax import plan as plan_lib  # noqa: E402
from lcjax.sharding.mesh import provision_host_devices  # noqa: E402

MAX_DEVICES = {"cpu": 64, "gpu": 1024}  # simulated host devices; deviceless GPUs
TARGETS = ("cpu", "a100", "h100", "h200")


def parse_mesh(text: str, target: str = "cpu") -> tuple[int, int, int]:
    """'16,4,1' -> (16, 4, 1); raises ValueError naming --mesh."""
    try:
        mesh = tuple(int(x) for x in text.split(","))
    except ValueError:
        mesh = ()
    if len(mesh) != 3 or min(mesh) < 1:
        raise ValueError(f"--mesh {text!r} must be three positive integers D,S,M")
    limit = MAX_DEVICES["cpu" if target == "cpu" else "gpu"]
    if mesh[0] * mesh[1] * mesh[2] > limit:
        raise ValueError(f"--mesh {text}: at most {limit} devices for --target {target}")
    return mesh


def load_config(path, seq_len, mesh, overrides=()) -> config_lib.Config:
    """The config with the mesh and sequence length applied (validated)."""
    extra = [f"mesh.data={mesh[0]}", f"mesh.sequence={mesh[1]}", f"mesh.model={mesh[2]}"]
    if seq_len is not None:
        extra.append(f"data.seq_len={seq_len}")
    return config_lib.load(path, [*overrides, *extra])


def compile_step(cfg, target: str = "cpu"):
    """(compiled train step of ``cfg`` for ``target``, compile seconds, backend platform).

    ``cpu``: on mesh.data·mesh.sequence·mesh.model simulated host devices (provisioned before JAX starts);
    a GPU target: on deviceless GPUs of that type (lcjax.sharding.mesh.deviceless_gpus).
    """
    import jax
    import jax.numpy as jnp

    from lcjax.sharding.mesh import deviceless_gpus, make_mesh
    from lcjax.train.state import abstract_state
    from lcjax.train.step import BATCH_FIELDS, batch_sharding, make_train_step

    count = cfg.mesh.data * cfg.mesh.sequence * cfg.mesh.model
    devices = None if target == "cpu" else deviceless_gpus(target, count)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model, devices=devices)
    graphdef, specs, optimizer, state = abstract_state(cfg, mesh)  # nothing allocated
    shape = (cfg.data.global_batch,  # the loader pads windows to what the layout needs
             config_lib.padded_seq_len(cfg.data.seq_len, cfg.attention.layout, cfg.mesh.sequence))
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh)) for k in BATCH_FIELDS}
    t0 = time.perf_counter()
    compiled = make_train_step(graphdef, specs, mesh, cfg, optimizer).lower(state, batch).compile()
    return compiled, time.perf_counter() - t0, mesh.devices.flat[0].platform


def xla_memory(cfg, target: str = "cpu", schedule: bool = False) -> dict:
    """Compile the train step of ``cfg`` for ``target`` (:func:`compile_step`); XLA's per-device bytes and
    parts, and with ``schedule`` the scheduled program's report (lcjax.plan.schedule.report)."""
    from lcjax.memcheck import compiled_bytes, host_bytes
    from lcjax.plan.schedule import report

    compiled, seconds, backend = compile_step(cfg, target)
    analysis = compiled.memory_analysis()
    parts, host = compiled_bytes(analysis), host_bytes(analysis)
    total, host_total = parts.pop("total"), host.pop("total")
    out = {"xla_bytes_per_device": total, "xla_parts": parts, "host_bytes_per_device": host_total,
           "xla_host_parts": host, "compile_s": seconds, "backend": backend, "target": target}
    if schedule:
        out["schedule"] = report(compiled.as_text())
    return out


def plan_memory(cfg, gpu: bool = False, target: str = "cpu") -> dict:
    """The planner's per-device bytes for ``cfg`` with its remat and ZeRO settings (lcjax.plan), as on a
    GPU (activations in the compute dtype) and as on the CPU backend (bfloat16 kept as float32), with both
    activation estimates (lcjax.plan.memory). ``plan_bytes_per_device`` is the variant that matches the
    compile target; ``plan_host_bytes_per_device`` and ``plan_offload`` the planner's host bytes and PCIe
    time per layer against the layer's compute on ``target`` (lcjax.plan.offload)."""
    out = {}
    for model in ("lcjax", "formulas"):
        for name, stored in (("gpu", None), ("cpu", 4)):
            inputs = plan_lib.StepInputs.from_config(cfg, activation_model=model, stored_bytes=stored)
            p = plan_lib.plan_step(inputs, plan_lib.device("cpu"))
            out[f"{model}_{name}"] = p.memory.as_dict()
    chosen = out["lcjax_gpu" if gpu else "lcjax_cpu"]
    inputs = plan_lib.StepInputs.from_config(cfg, stored_bytes=None if gpu else 4)
    off = plan_lib.plan_step(inputs, plan_lib.device(target)).offload
    return {"plan_bytes_per_device": chosen["total"], "plan_parts": chosen, "plan_variants": out,
            "plan_host_bytes_per_device": off.host_bytes, "plan_offload": off.as_dict()}


def compare(cfg, target: str = "cpu", schedule: bool = False) -> dict:
    """Plan and XLA side by side, with the relative gap (plan − xla) / xla."""
    out = {**plan_memory(cfg, gpu=target != "cpu", target=target), **xla_memory(cfg, target, schedule)}
    out["relative_gap"] = (out["plan_bytes_per_device"] - out["xla_bytes_per_device"]) / out["xla_bytes_per_device"]
    if target == "cpu":
        out["label"] = ("CPU backend: XLA's figure and plan_bytes_per_device (plan_variants lcjax_cpu) both keep "
                        "bfloat16 activations as float32; plan_variants *_gpu is the planner's GPU estimate")
    else:
        out["label"] = (f"{target.upper()} (deviceless compile with XLA's GPU pipeline); plan_bytes_per_device "
                        "is plan_variants lcjax_gpu")
    out["mesh"] = {"data": cfg.mesh.data, "sequence": cfg.mesh.sequence, "model": cfg.mesh.model}
    out["seq_len"], out["dtype"] = cfg.data.seq_len, cfg.train.dtype
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--mesh", required=True, help="D,S,M sizes of data, sequence, model")
    parser.add_argument("--target", default="cpu",
                        help="compile target: cpu (simulated host devices) or a GPU without one: a100, h100, h200 "
                             "(needs the aot extra)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--schedule", action="store_true",
                        help="also read the scheduled program: collectives overlapped or exposed, conditionals, "
                             "kernel calls (lcjax.plan.schedule; meaningful for GPU targets)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.target not in TARGETS:
            raise ValueError(f"--target {args.target!r} must be one of {', '.join(TARGETS)}")
        mesh = parse_mesh(args.mesh, args.target)
        cfg = load_config(args.config, args.seq_len, mesh, args.set)
    except ValueError as e:
        print(f"validate_plan: error: {e}", file=sys.stderr)
        return 2
    if args.target == "cpu":
        provision_host_devices(mesh[0] * mesh[1] * mesh[2])
    else:
        os.environ["JAX_PLATFORMS"] = "cpu"  # compile for the GPU target; run nothing
    try:
        result = compare(cfg, args.target, args.schedule)
    except RuntimeError as e:
        print(f"validate_plan: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        gb = lambda b: f"{b / 1e9:.3f} GB"
        print(f"mesh {args.mesh}, T={cfg.data.seq_len}, {cfg.train.dtype}, target {args.target}; {result['label']}")
        print(f"plan {gb(result['plan_bytes_per_device'])} "
              + " ".join(f"{k}={gb(v)}" for k, v in result["plan_parts"].items()))
        print(f"xla  {gb(result['xla_bytes_per_device'])} "
              + " ".join(f"{k}={gb(v)}" for k, v in result["xla_parts"].items())
              + f" (compiled in {result['compile_s']:.1f} s)")
        print(f"gap (plan - xla) / xla = {result['relative_gap']:+.1%}")
        off = result["plan_offload"]
        print(f"host: xla {gb(result['host_bytes_per_device'])}, plan {gb(result['plan_host_bytes_per_device'])}; "
              f"offload {off['bytes_per_layer'] / 1e9:.3f} GB per layer each way, "
              f"{off['transfer_s_per_layer'] * 1e3:.1f} ms at PCIe vs {off['layer_forward_s'] * 1e3:.1f} ms "
              f"forward / {off['layer_backward_s'] * 1e3:.1f} ms backward per layer: "
              f"{'hidden' if off['hidden'] else 'exposed'}")
        for name, parts in result["plan_variants"].items():
            print(f"  plan variant {name}: total {gb(parts['total'])}, activations {gb(parts['activations'])}")
        if args.schedule:
            from lcjax.plan.schedule import markdown
            print(markdown(result["schedule"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
