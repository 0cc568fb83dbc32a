"""Data pipeline throughput against what the model consumes: tokens/s the Grain loader delivers (packed,
laid out, in global batches) ÷ tokens/s the train step of the same config eats on this machine.

The loader is timed after its warm-up on the cached token stream (building the stream the first time is
timed and reported separately); the model is the real jitted train step of the config on its mesh (on a
CPU host: simulated devices), compiled first, fed by the same loader. Issue 4 asks for a ratio >= 5 on the
CPU demo. Output: a markdown table on stdout, and the record as JSON with ``--json``.

    python scripts/bench_data.py --config configs/demo.yaml --json docs/bench/data_cpu.json
    python scripts/bench_data.py --config configs/demo.yaml --workers 2 --model-tokens-per-sec 980
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--batches", type=int, default=200, help="loader batches timed (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--workers", type=int, help="Grain worker processes (default data.workers)")
    p.add_argument("--steps", type=int, default=3, help="train steps timed (after one warm step)")
    p.add_argument("--model-tokens-per-sec", type=float,
                   help="skip the model run and use this consumption rate (e.g. a demo run's metrics.jsonl)")
    p.add_argument("--json", help="write the record to this file")
    return p.parse_args(argv)


def time_loader(dataset, cfg, args) -> dict:
    from lcjax.data import LoaderSpec

    d = cfg.data
    workers = d.workers if args.workers is None else args.workers
    loader = dataset.loader(LoaderSpec(seq_len=d.seq_len, global_batch=d.global_batch, seed=d.seed,
                                       layout=cfg.attention.layout, num_shards=cfg.mesh.sequence,
                                       cross_document_attention=d.cross_document_attention,
                                       prefetch=args.prefetch, workers=workers))
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        next(loader)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    seconds = time.perf_counter() - t0
    loader.close()
    tokens = args.batches * d.global_batch * d.seq_len
    return {"workers": workers, "prefetch": args.prefetch, "batches": args.batches, "warmup_s": warm,
            "seconds": seconds, "tokens_per_sec": tokens / seconds}


def time_model(dataset, cfg, args) -> dict:
    import jax
    import numpy as np

    from lcjax.data import LoaderSpec
    from lcjax.sharding.mesh import make_mesh
    from lcjax.train.state import init_state
    from lcjax.train.step import batch_sharding, make_train_step

    d = cfg.data
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model)
    loader = dataset.loader(LoaderSpec(seq_len=d.seq_len, global_batch=d.global_batch, seed=d.seed,
                                       layout=cfg.attention.layout, num_shards=cfg.mesh.sequence,
                                       cross_document_attention=d.cross_document_attention))
    graphdef, specs, optimizer, state = init_state(cfg, mesh, loader.get_state())
    step = make_train_step(graphdef, specs, mesh, cfg, optimizer)
    sharding = batch_sharding(mesh)
    put = lambda b: {k: jax.device_put(np.asarray(v, np.int32), sharding) for k, v in b.items()}
    t0 = time.perf_counter()
    step.compile(state, put(next(loader)))
    compile_s = time.perf_counter() - t0
    state, metrics = step(state, put(next(loader)))  # warm
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        batch = put(next(loader))
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    loader.close()
    median = sorted(times)[len(times) // 2]
    return {"devices": f"{mesh.devices.size} x {jax.devices()[0].platform}", "compile_s": compile_s,
            "step_s": median, "tokens_per_sec": d.global_batch * d.seq_len / median}


def main(argv=None) -> int:
    args = parse_args(argv)
    from lcjax import config as config_lib
    from lcjax.sharding.mesh import provision_host_devices

    cfg = config_lib.load(args.config, args.set)
    provision_host_devices(cfg.mesh.data * cfg.mesh.sequence * cfg.mesh.model)
    from lcjax.data.mixture import build_data

    d = cfg.data
    t0 = time.perf_counter()
    dataset = build_data(d, vocab_size=cfg.model.vocab_size)
    build_s = time.perf_counter() - t0
    loader = time_loader(dataset, cfg, args)
    if args.model_tokens_per_sec:
        model = {"tokens_per_sec": args.model_tokens_per_sec, "given": True}
    else:
        model = time_model(dataset, cfg, args)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "host": platform.node(),
              "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "config": args.config, "set": args.set,
              "source": d.source, "tokenizer": d.tokenizer, "seq_len": d.seq_len, "global_batch": d.global_batch,
              "layout": cfg.attention.layout, "mesh": [cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model],
              "tokens": len(dataset.tokens), "documents": len(dataset.doc_starts), "dataset_build_s": build_s,
              "loader": loader, "model": model, "ratio": loader["tokens_per_sec"] / model["tokens_per_sec"]}
    print(f"| {'what':<28} | {'value':>14} |\n|{'-' * 30}|{'-' * 15}:|")
    rows = [("corpus tokens", f"{record['tokens']:,}"), ("dataset load/build (s)", f"{build_s:.2f}"),
            (f"loader tokens/s (workers {loader['workers']})", f"{loader['tokens_per_sec']:,.0f}"),
            ("model tokens/s" + (" (given)" if model.get("given") else ""), f"{model['tokens_per_sec']:,.0f}"),
            ("ratio (>= 5 wanted)", f"{record['ratio']:,.1f}")]
    for name, value in rows:
        print(f"| {name:<28} | {value:>14} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0 if record["ratio"] >= 5 else 1


if __name__ == "__main__":
    sys.exit(main())
