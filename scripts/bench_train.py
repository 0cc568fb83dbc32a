"""Train-step benchmark: tokens/s per device, step time, MFU and per-device memory of the real lcjax train
step (lcjax.train.step.make_train_step) for one config over several meshes and attention impls.

Shaped like the design notes' "Ring Attention vs all2all" table (docs/design.md; docs/reference/anchors.md):
one row per mesh × impl with tokens/s per device, step time, MFU and memory per device.

- Batches are synthetic (random tokens, one document per sequence, positions 0…T−1 laid out in the
  config's layout order, as the loader would): no dataset, tokenizer or data dependency is needed.
- Step time: median over ``--steps`` timed steps after ``--warmup`` untimed ones (compilation is done ahead
  of the first step and timed separately). tokens/s per device = global_batch · seq_len / devices / step time.
- MFU = tokens/s per device × model FLOPs per token / peak FLOP/s of the device in the compute dtype.
  FLOPs per token come from the planner (lcjax.plan.flops): causal-honest 6N + 6·L·n_h·d_h·T and the PaLM
  convention 6N + 12·L·n_h·d_h·T; HFU uses the hardware FLOPs (flash backward recompute, full remat).
  Peaks are the planner's presets (lcjax.plan.hardware); on simulated CPU devices the "cpu" preset is a
  rough 1e11 FLOP/s and all devices share the host's cores, so CPU MFU figures only compare rows.
- Memory per device: argument + output + temp − alias bytes of XLA's ``compiled.memory_analysis()``
  (docs/design.md, "Numbers"), next to the planner's estimate; on a CPU backend both are CPU-backend figures
  (bf16 widened to f32), labelled so. On a GPU the allocator's peak (``memory_stats``) is added.

    PYTHONPATH=. python scripts/bench_train.py --config configs/demo.yaml --meshes 1,8,1 1,4,2 \
        --impls ring,ulysses,allgather --steps 5 --warmup 2 --json train.json

Meshes of simulated CPU devices are provisioned before JAX starts (lcjax.sharding.mesh). Needs only jax,
flax, optax and PyYAML (a flax dependency): without omegaconf the YAML is read by :func:`load_config`'s
fallback (``defaults:`` lists and ``--set`` overrides supported, then lcjax.config.validate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcjax import config as config_lib  # noqa: E402  (imports neither JAX nor omegaconf)
from lcjax.sharding.mesh import provision_host_devices  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeat)")
    p.add_argument("--meshes", nargs="+", default=None, help="D,S,M meshes (default: the config's)")
    p.add_argument("--impls", default=None, help="comma-separated attention impls, of "
                   f"{', '.join(config_lib.ATTENTION_IMPLS)} (default: the config's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device preset's peak")
    p.add_argument("--json", help="write the records to this file")
    p.add_argument("--md", help="also write the markdown table to this file")
    return p.parse_args(argv)


def parse_mesh(text: str) -> tuple[int, int, int]:
    """'1,4,2' -> (1, 4, 2); raises ValueError naming --meshes."""
    try:
        mesh = tuple(int(x) for x in text.split(","))
    except ValueError:
        mesh = ()
    if len(mesh) != 3 or min(mesh) < 1:
        raise ValueError(f"--meshes {text!r}: each mesh must be three positive integers D,S,M")
    return mesh


# ---------------------------------------------------------------------------------------------------------
# Config loading without omegaconf (the GPU host lacks it): PyYAML + the dataclasses + lcjax.config.validate.


def _merge_dicts(base: dict, other: dict) -> dict:
    out = dict(base)
    for key, value in other.items():
        out[key] = _merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    import yaml

    if path.resolve() in seen:
        raise ValueError(f"--config {path}: 'defaults' includes itself")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: must be a mapping of config sections (mesh:, model:, ...)")
    base: dict = {}
    for rel in raw.pop("defaults", []) or []:
        base = _merge_dicts(base, _read_yaml(path.parent / rel, seen + (path.resolve(),)))
    return _merge_dicts(base, raw)


def _coerce(value, hint, key: str):
    """``value`` as the dataclass field type ``hint`` (PyYAML reads '1e-5' as a string)."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: must be a mapping of keys, not a single value")
        return build_dataclass(hint, value, f"{key}.")
    if value is None:
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) is typing.Union and args else hint
    if base is bool:
        return value if isinstance(value, bool) else str(value).lower() == "true"
    if base in (int, float):
        return base(value)
    return value


def build_dataclass(cls, values: dict, prefix: str = ""):
    """An instance of the (frozen) config dataclass ``cls`` from nested dicts; unknown keys raise."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ValueError(f"{prefix}{key}: unknown config key")
    return cls(**{k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in values.items()})


def load_config_plain(path, overrides=()) -> config_lib.Config:
    """lcjax.config.load without omegaconf: YAML (with ``defaults:``) + dotted ``key=value`` overrides."""
    import yaml

    merged = _read_yaml(Path(path))
    merged.setdefault("name", Path(path).stem)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r} must have the form key=value")
        nested: dict = {}
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(text)
        merged = _merge_dicts(merged, nested)
    cfg = build_dataclass(config_lib.Config, merged)
    config_lib.validate(cfg)
    return cfg


def load_config(path, overrides=()) -> config_lib.Config:
    """lcjax.config.load (OmegaConf) when omegaconf is installed, else :func:`load_config_plain`."""
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return load_config_plain(path, overrides)
    return config_lib.load(path, list(overrides))


def variant(cfg: config_lib.Config, mesh: tuple[int, int, int], impl: str) -> config_lib.Config:
    """``cfg`` on ``mesh`` with attention ``impl`` (validated: raises ValueError naming the rule)."""
    out = dataclasses.replace(cfg, mesh=config_lib.MeshConfig(*mesh),
                              attention=dataclasses.replace(cfg.attention, impl=impl))
    config_lib.validate(out)
    return out


# ---------------------------------------------------------------------------------------------------------
# FLOPs, MFU and the planner's figures (pure Python).


def flops_per_token(cfg: config_lib.Config) -> dict:
    """{'causal', 'palm', 'hardware'} FLOPs per trained token of ``cfg`` (lcjax.plan.flops)."""
    from lcjax.plan import flops
    from lcjax.plan.shapes import Shape

    shape, t = Shape.from_model_config(cfg.model), cfg.data.seq_len
    remat = "none" if cfg.train.remat == "none" else "full"
    return {"causal": flops.flops_per_token(shape, t, causal=True),
            "palm": flops.flops_per_token(shape, t, causal=False),
            "hardware": flops.hardware_flops_per_token(shape, t, remat)}


def utilisation(tokens_per_sec_per_device: float, fpt: dict, peak: float) -> dict:
    """MFU (causal, PaLM) and HFU: tokens/s per device × FLOPs per token / peak FLOP/s."""
    rate = tokens_per_sec_per_device / peak
    return {"mfu_causal": rate * fpt["causal"], "mfu_palm": rate * fpt["palm"], "hfu": rate * fpt["hardware"]}


def planner(cfg: config_lib.Config, preset: str) -> dict:
    """The planner's per-device memory and tokens/s for ``cfg`` (CPU preset: bf16 stored as f32)."""
    from lcjax import plan as plan_lib

    try:
        inputs = plan_lib.StepInputs.from_config(cfg, stored_bytes=4 if preset == "cpu" else None)
        p = plan_lib.plan_step(inputs, plan_lib.device(preset))
    except (ValueError, KeyError) as e:
        return {"plan_error": str(e)}
    return {"plan_bytes_per_device": p.memory.total, "plan_tokens_per_sec_per_device": p.tokens_per_sec_per_device}


# ---------------------------------------------------------------------------------------------------------
# The measurement (JAX).


def synthetic_batch(cfg: config_lib.Config, seed: int = 0) -> dict:
    """int32 [B, T] numpy arrays (tokens, labels, positions, segment_ids, loss_mask) in layout order: random
    tokens, next-token labels, one document per sequence."""
    import numpy as np

    from lcjax.ops.layout import permute
    from lcjax.train.step import BATCH_FIELDS

    b, t = cfg.data.global_batch, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, cfg.model.vocab_size, size=(b, t + 1), dtype=np.int32)
    natural = {"tokens": seq[:, :-1], "labels": seq[:, 1:], "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
               "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.int32)}
    return {k: np.ascontiguousarray(permute(natural[k], cfg.attention.layout, cfg.mesh.sequence, axis=1))
            for k in BATCH_FIELDS}


def measure(cfg: config_lib.Config, steps: int, warmup: int, peak_override: float | None = None) -> dict:
    """Compile, warm up and time the train step of ``cfg``; one record (see the module doc)."""
    import jax

    from lcjax.plan import device as plan_device
    from lcjax.sharding.mesh import make_mesh
    from lcjax.train.metrics import compiled_bytes, preset_for
    from lcjax.train.state import init_state
    from lcjax.train.step import batch_sharding, make_train_step

    m = cfg.mesh
    mesh = make_mesh(m.data, m.sequence, m.model)
    dev = mesh.devices.flat[0]
    preset = preset_for(dev.platform, dev.device_kind)
    peak = peak_override * 1e12 if peak_override else plan_device(preset).peak(2 if cfg.train.dtype == "bfloat16" else 4)
    graphdef, specs, optimizer, state = init_state(cfg, mesh, {})
    batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in synthetic_batch(cfg).items()}
    step = make_train_step(graphdef, specs, mesh, cfg, optimizer)
    t0 = time.perf_counter()
    compiled = step.compile(state, batch)
    compile_s = time.perf_counter() - t0
    memory = compiled_bytes(compiled.memory_analysis())
    losses, times = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state.params, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    devices = m.data * m.sequence * m.model
    step_s = statistics.median(times) if times else float("nan")
    tps = cfg.data.global_batch * cfg.data.seq_len / devices / step_s
    fpt = flops_per_token(cfg)
    record = {"config": cfg.name, "seq_len": cfg.data.seq_len, "global_batch": cfg.data.global_batch,
              "mesh": {"data": m.data, "sequence": m.sequence, "model": m.model}, "impl": cfg.attention.impl,
              "layout": cfg.attention.layout, "kernel": cfg.attention.kernel, "dtype": cfg.train.dtype,
              "remat": cfg.train.remat, "fsdp": cfg.train.fsdp, "platform": dev.platform,
              "device_kind": dev.device_kind, "preset": preset, "peak_flops": peak, "compile_s": compile_s,
              "step_s_median": step_s, "step_s_all": times, "tokens_per_sec_per_device": tps,
              "flops_per_token": fpt, **utilisation(tps, fpt, peak), "memory_bytes_per_device": memory["total"],
              "memory_parts": memory, "memory_label": "CPU backend (bf16 kept as f32; estimate of a GPU's)"
              if dev.platform == "cpu" else f"{dev.platform} compiled", "losses": losses,
              **planner(cfg, preset)}
    stats = getattr(dev, "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
        record["allocator_peak_bytes"] = stats["peak_bytes_in_use"]
    return record


def markdown(records: list[dict]) -> str:
    """The table, one row per mesh × impl (failed rows carry their error)."""
    gb = lambda b: f"{b / 1e9:.2f}"
    rows = ["| config | T | mesh D×S×M | impl | tokens/s/device | step s | MFU causal | MFU PaLM "
            "| memory GB/device (XLA) | planner GB | loss first→last |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        mesh = "×".join(str(r["mesh"][a]) for a in ("data", "sequence", "model"))
        head = f"| {r['config']} | {r['seq_len']} | {mesh} | {r['impl']} "
        if "error" in r:
            rows.append(head + f"| — | — | — | — | — | — | {r['error'][:80]} |")
            continue
        plan_gb = gb(r["plan_bytes_per_device"]) if "plan_bytes_per_device" in r else "—"
        rows.append(head + f"| {r['tokens_per_sec_per_device']:,.0f} | {r['step_s_median']:.3f} "
                    f"| {r['mfu_causal']:.1%} | {r['mfu_palm']:.1%} | {gb(r['memory_bytes_per_device'])} "
                    f"| {plan_gb} | {r['losses'][0]:.3f}→{r['losses'][-1]:.3f} |")
    return "\n".join(rows)


def header(records: list[dict], args) -> str:
    import jax

    ok = next((r for r in records if "error" not in r), None)
    where = (f"{ok['device_kind']} ({ok['platform']}), peak {ok['peak_flops'] / 1e12:g} TFLOP/s "
             f"({ok['preset']} preset), memory: {ok['memory_label']}" if ok else "no row ran")
    return (f"{args.config} {' '.join('--set ' + s for s in args.set)}; {args.steps} timed steps (median) after "
            f"{args.warmup} warmup; {where}; jax {jax.__version__}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        meshes = [parse_mesh(m) for m in args.meshes] if args.meshes else \
            [(cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model)]
        impls = args.impls.split(",") if args.impls else [cfg.attention.impl]
    except (ValueError, OSError) as e:
        print(f"bench_train: error: {e}", file=sys.stderr)
        return 2
    provision_host_devices(max(d * s * m for d, s, m in meshes))  # before JAX starts (CPU only)
    records = []
    for mesh in meshes:
        for impl in impls:
            record = {"config": cfg.name, "seq_len": cfg.data.seq_len, "impl": impl,
                      "mesh": dict(zip(("data", "sequence", "model"), mesh))}
            try:
                record = measure(variant(cfg, mesh, impl), args.steps, args.warmup, args.peak_tflops)
            except Exception as e:  # invalid for this mesh, out of memory, ...: reported in the row
                record["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if k not in ("step_s_all", "losses")}), flush=True)
            import gc

            gc.collect()
    table = header(records, args) + "\n\n" + markdown(records)
    print("\n" + table)
    if args.md:
        Path(args.md).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0 if any("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
