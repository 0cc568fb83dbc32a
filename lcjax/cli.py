"""Command line: ``lcjax train --config FILE [--set key=value]... [--run-dir DIR] [--resume | --init-from DIR]``.

Errors in anything the user typed or pointed at print one line on stderr naming the field and the rule
and exit with code 2, before anything is written. Simulated CPU devices for the mesh are provisioned
before JAX is imported, so every mesh runs on a machine without accelerators.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from lcjax import config as config_lib
from lcjax.sharding.mesh import provision_host_devices

EXIT_USAGE = 2
EXIT_NON_FINITE = 3  # train.max_bad_steps non-finite steps in a row


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        raise SystemExit(_fail(f"{message} (see {self.prog} --help)"))


def _fail(message: str) -> int:
    print(f"lcjax: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    """The ``lcjax`` argument parser."""
    parser = _Parser(prog="lcjax", description="Long-context LLaMA training on sharded device meshes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a model (see configs/demo.yaml)")
    train.add_argument("--config", help="YAML config file (default with --resume: the run's config.yaml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set model.n_layers=2 (repeatable)")
    train.add_argument("--run-dir", help="run directory (default runs/<config name>-<UTC time>)")
    train.add_argument("--resume", action="store_true", help="continue the newest checkpoint in --run-dir")
    train.add_argument("--init-from", metavar="DIR",
                       help="start a new run from the weights of another run dir or a Hugging Face folder")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    multi = train.add_argument_group("multi-process runs (docs/multihost.md; default: JAX_* or SLURM variables)")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
    multi.add_argument("--num-processes", type=int, metavar="N", help="number of processes (one per host)")
    multi.add_argument("--process-id", type=int, metavar="I", help="this process's id in [0, N)")
    multi.add_argument("--init-timeout", type=int, default=300, metavar="S",
                       help="seconds to wait for every process to join (default 300)")
    _add_plan_parser(sub)
    return parser


def _add_plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help="rank candidate meshes by the analytic planner (docs/planner.md)")
    plan.add_argument("--config", required=True, help="YAML config file")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key (repeatable)")
    plan.add_argument("--seq-len", type=int, help="tokens per sequence (default data.seq_len)")
    plan.add_argument("--devices", type=int, help="device count (default the config's mesh size)")
    plan.add_argument("--device", default="h100", help="preset: a100, h100, h200, h800, cpu (default h100)")
    plan.add_argument("--attention", choices=("ring", "ulysses", "local"),
                      help="attention over sequence (default attention.impl)")
    plan.add_argument("--remat", default="none", help="none or full (the trainer implements none)")
    plan.add_argument("--optimizer-sharding", default="none",
                      help="none, zero1, zero2 or fsdp over data x sequence (the trainer implements none)")
    plan.add_argument("--activations", default="lcjax",
                      help="activation estimate: lcjax (what autodiff keeps) or formulas (formulas.md 1.3)")
    plan.add_argument("--efficiency", type=float, help="share of peak FLOP/s reached (default preset, 0.5)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")


def default_run_dir(cfg: config_lib.Config) -> Path:
    """runs/<config name>-<UTC time>."""
    return Path("runs") / f"{cfg.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def _train(args) -> int:
    from lcjax import distributed

    if args.resume and not args.run_dir:
        raise ValueError("--resume needs --run-dir")
    if args.resume and args.init_from:
        raise ValueError("--resume and --init-from exclude each other")
    if args.config is None and not args.resume:
        raise ValueError("--config is required (except with --resume, which reads the run's config.yaml)")
    cfg = config_lib.load(args.config or Path(args.run_dir) / "config.yaml", args.set)
    settings = distributed.resolve(args.coordinator, args.num_processes, args.process_id,
                                   timeout_s=args.init_timeout)
    if settings is not None and not args.run_dir:
        raise ValueError("--run-dir is required in a multi-process run (every process must name the same one)")
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    provision_host_devices(distributed.local_device_count(cfg.mesh.data * cfg.mesh.sequence * cfg.mesh.model,
                                                          settings))
    distributed.initialize(settings)
    from lcjax.train.loop import NonFiniteError, train  # imports JAX: after the devices are provisioned

    try:
        result = train(cfg, run_dir, resume=args.resume, init_from=args.init_from, progress=not args.no_progress,
                       hf_params=_hf_params)
    except NonFiniteError as e:
        print(f"lcjax: stopped: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    where = (f"{result['checkpoint_dir']}/{result['checkpoint']}" if result["checkpoint"] is not None
             else "nowhere (no step was completed)")
    if result["preempted"]:
        print(f"lcjax: preempted at step {result['step']}, saved checkpoint to {where}", flush=True)
        return 0
    loss = "n/a" if result["loss"] is None else f"{result['loss']:.4f}"
    print(f"lcjax: step {result['step']} loss {loss} — run dir {run_dir}, checkpoint {result['checkpoint']}")
    return 0


def _hf_params(hf_dir, abstract_params):
    """lcjax.convert.hf_params, imported only when a Hugging Face folder is used."""
    try:
        from lcjax.convert import hf_params
    except ImportError as e:
        raise ValueError(f"--init-from {hf_dir}: reading a Hugging Face folder needs lcjax.convert ({e})") from None
    return hf_params(hf_dir, abstract_params)


def _plan(args) -> int:
    import json

    from lcjax import plan as plan_lib  # pure Python: imports no JAX
    from lcjax.plan import report

    overrides = [*args.set, *([f"data.seq_len={args.seq_len}"] if args.seq_len is not None else [])]
    cfg = config_lib.load(args.config, overrides)
    n = args.devices if args.devices is not None else cfg.mesh.data * cfg.mesh.sequence * cfg.mesh.model
    if n < 1:
        raise ValueError(f"--devices {n} must be >= 1")
    dev = plan_lib.device(args.device, args.efficiency)
    plans, rejected = plan_lib.candidates(cfg, n, dev, attention=args.attention, remat=args.remat,
                                          optimizer_sharding=args.optimizer_sharding,
                                          activation_model=args.activations)
    shape = plan_lib.Shape.from_model_config(cfg.model)
    settings = {"seq_len": cfg.data.seq_len, "global_batch": cfg.data.global_batch, "devices": n,
                "device": dev.name, "efficiency": dev.efficiency,
                "attention": args.attention or cfg.attention.impl, "layout": cfg.attention.layout,
                "dtype": cfg.train.dtype, "remat": args.remat, "optimizer_sharding": args.optimizer_sharding,
                "activations": args.activations}
    if args.json:
        print(json.dumps(report.to_json(shape, cfg.data.seq_len, plans, rejected, settings), indent=1))
    else:
        print(report.table(shape, cfg.data.seq_len, plans, rejected, settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lcjax`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return {"train": _train, "plan": _plan}[args.command](args)
    except ValueError as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        print("lcjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
