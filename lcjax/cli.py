"""Command line: ``lcjax train --config FILE [--set key=value]... [--run-dir DIR]
[--resume | --init-from DIR [--init-optimizer]]``.

Errors in anything the user typed or pointed at print one line on stderr naming the field and the rule
and exit with code 2, before anything is written. Simulated CPU devices for the mesh are provisioned
before JAX is imported, so every mesh runs on a machine without accelerators.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import lcjax
from lcjax import checkpoints_cli, memcheck, rundir
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
    parser.add_argument("--version", action="version", version=f"lcjax {lcjax.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a model (see configs/demo.yaml)")
    train.add_argument("--config", help="YAML config file (default with --resume: the run's config.yaml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set model.n_layers=2 (repeatable)")
    train.add_argument("--run-dir", help="run directory (default runs/<config name>-<UTC time>)")
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="auto",
                       help="continue the newest checkpoint in --run-dir; '--resume auto': start fresh when the "
                            "run dir is missing or empty, continue when it holds this run, exit 0 when that "
                            "run is complete (for requeued jobs; docs/multihost.md)")
    train.add_argument("--step", type=int, metavar="N",
                       help="with --resume: continue checkpoint N instead of the newest (later ones are set aside)")
    train.add_argument("--init-from", metavar="DIR",
                       help="start a new run from the weights of another run dir or a Hugging Face folder")
    train.add_argument("--init-optimizer", action="store_true",
                       help="with --init-from RUN_DIR: also take that run's optimizer state (AdamW moments; "
                            "the new run still starts at step 1 with a fresh data order and lr schedule)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--profile", metavar="START:END",
                       help="write a jax.profiler trace of optimizer steps START..END into <run dir>/profile")
    multi = train.add_argument_group("multi-process runs (docs/multihost.md; default: JAX_* or SLURM variables)")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
    multi.add_argument("--num-processes", type=int, metavar="N", help="number of processes (one per host)")
    multi.add_argument("--process-id", type=int, metavar="I", help="this process's id in [0, N)")
    multi.add_argument("--init-timeout", type=int, default=300, metavar="S",
                       help="seconds to wait for every process to join (default 300)")
    _add_plan_parser(sub)
    _add_data_parser(sub)
    _add_convert_parser(sub)
    _add_generate_parser(sub)
    _add_eval_parser(sub)
    checkpoints_cli.add_parser(sub)
    return parser


def _add_plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help="rank candidate meshes by the analytic planner (docs/planner.md)")
    plan.add_argument("--config", required=True, help="YAML config file")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key (repeatable)")
    plan.add_argument("--seq-len", type=int, help="tokens per sequence (default data.seq_len)")
    plan.add_argument("--devices", type=int, help="device count (default the config's mesh size)")
    plan.add_argument("--device", default="h100", help="preset: a100, h100, h200, h800, cpu (default h100)")
    plan.add_argument("--attention", choices=("ring", "ulysses", "hybrid", "allgather", "local"),
                      help="attention over sequence (default attention.impl; hybrid takes the group size "
                           "from attention.ulysses_size)")
    plan.add_argument("--remat", help="none, layer or full (default: the config's train.remat; the "
                                      "selective policies count as full)")
    plan.add_argument("--optimizer-sharding",
                      help="none, zero1, zero2 or fsdp over data x sequence (default: from the config's "
                           "train.fsdp and train.shard_optimizer)")
    plan.add_argument("--activations", default="lcjax",
                      help="activation estimate: lcjax (what autodiff keeps) or formulas (formulas.md 1.3)")
    plan.add_argument("--efficiency", type=float, help="share of peak FLOP/s reached (default preset, 0.5)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="prepare TFDS datasets and tokenizers (docs/data.md)")
    what = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    prep = what.add_parser("prepare", help="tokenize text files into a TFDS array_record dataset")
    prep.add_argument("--source", required=True,
                      help="files:PATH[,PATH...], jsonl:PATH[,PATH...], parquet:PATH[,PATH...] or stdlib")
    prep.add_argument("--text-field", default="text", help="JSONL field / Parquet column of the text (default text)")
    prep.add_argument("--out", required=True, help="TFDS data dir to write into (becomes data.data_dir)")
    prep.add_argument("--name", default="lcjax_text", help="dataset name (default lcjax_text)")
    prep.add_argument("--tokenizer", default="bpe", help="bpe (trained here), bytes, or a tokenizer.json path")
    prep.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    prep.add_argument("--cache-dir", help="lcjax cache (default $LCJAX_CACHE or ~/.cache/lcjax)")
    tok = what.add_parser("tokenizer", help="train a byte-level BPE tokenizer and write its tokenizer.json")
    tok.add_argument("--source", required=True,
                     help="files:, jsonl:, parquet:PATH[,PATH...], stdlib or tfds:NAME[/CONFIG]")
    tok.add_argument("--text-field", default="text", help="JSONL field / Parquet column of the text (default text)")
    tok.add_argument("--vocab-size", type=int, required=True, help="at most this many ids (>= 257)")
    tok.add_argument("--out", required=True, help="folder to write tokenizer.json into (must not hold one)")
    tok.add_argument("--data-dir", help="TFDS data dir for tfds: sources")


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="continue a prompt with a trained run's newest checkpoint (KV cache)")
    gen.add_argument("--run-dir", required=True, help="run directory (its config.yaml, tokenizer, checkpoints)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to add (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T",
                     help="0: greedy (default); > 0: sample from softmax(logits / T)")
    gen.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    gen.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of the run's config, e.g. --set mesh.sequence=1 (not model.*)")
    gen.add_argument("--step", type=int, metavar="N", help="checkpoint step (default the newest)")
    gen.add_argument("--out", metavar="FILE", help="also write the text to FILE (must not exist)")
    gen.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")


def _generate(args) -> int:
    """Check everything the user typed or points at, then load the run (reading only) and generate."""
    import math

    from lcjax.checkpoint import saved_steps

    run_dir = Path(args.run_dir)
    if not args.prompt:
        raise ValueError("--prompt must not be empty")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")
    if not (args.temperature >= 0) or math.isinf(args.temperature):
        raise ValueError(f"--temperature {args.temperature} must be a finite number >= 0")
    if not (run_dir / "config.yaml").is_file():
        what = "does not exist" if not run_dir.exists() else "holds no run (no config.yaml)"
        raise ValueError(f"--run-dir {run_dir} {what}")
    if not saved_steps(run_dir / "checkpoints"):
        raise ValueError(f"--run-dir {run_dir}: no checkpoint in {run_dir / 'checkpoints'}")
    out = rundir.check_new_file(args.out, overwrite=args.overwrite) if args.out else None
    cfg = config_lib.load(run_dir / "config.yaml", args.set)
    provision_host_devices(cfg.mesh.data * cfg.mesh.sequence * cfg.mesh.model)
    from lcjax import generate, memcheck  # import JAX: after the devices are provisioned

    prompt = []

    def fits(cfg, mesh, graphdef, specs, abstract, tokenizer):  # before the parameters are read
        prompt.extend(tokenizer.encode_batch([args.prompt])[0])
        if not prompt:
            raise ValueError("--prompt encodes to no tokens")
        generate.check_positions(cfg, len(prompt), args.max_new_tokens)
        if not cfg.train.check_memory:
            return None
        needed, compiled = generate.memory_needed(cfg, mesh, graphdef, specs, abstract, batch=1,
                                                  prompt_len=len(prompt), max_new_tokens=args.max_new_tokens)
        memcheck.check_fits(needed, mesh.devices.flat, what=f"generating {args.max_new_tokens:,} tokens after a "
                            f"{len(prompt):,}-token prompt", kind="generate")
        return compiled  # generation reuses them

    inside = out is not None and rundir.is_inside(out, run_dir)  # writes into the run dir: hold its lock
    with rundir.locked(run_dir, command="lcjax generate", enabled=inside):
        model, tokenizer = generate.load(run_dir, args.set, step=args.step, fits=fits)
        new = generate.generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                seed=args.seed, eos_id=tokenizer.eos_id)[0]
        if new and new[-1] == tokenizer.eos_id:
            new = new[:-1]
        text = args.prompt + tokenizer.decode(new)
        print(text, flush=True)
        if out is not None:
            rundir.write_new(out, (text + "\n").encode(), overwrite=args.overwrite)
    return 0


def _data(args) -> int:
    from lcjax.data import cli as data_cli  # tokenizers and TFDS: imported only here

    return data_cli.run(args)
def _add_convert_parser(sub) -> None:
    convert = sub.add_parser("convert", help="Hugging Face LLaMA checkpoints in and out (docs/convert.md)")
    kinds = convert.add_subparsers(dest="direction", required=True, parser_class=_Parser)
    into = kinds.add_parser("hf-to-lcjax", help="HF folder (config.json + safetensors) -> lcjax run dir")
    into.add_argument("src", metavar="HF_DIR")
    into.add_argument("out", metavar="OUT_DIR", help="new lcjax run dir (must not exist)")
    out = kinds.add_parser("lcjax-to-hf", help="lcjax run dir -> HF folder (config.json + safetensors)")
    out.add_argument("src", metavar="RUN_DIR")
    out.add_argument("out", metavar="OUT_DIR", help="new HF folder (must not exist)")
    out.add_argument("--step", type=int, help="checkpoint step (default the newest)")
    out.add_argument("--dtype", default="auto",
                     help="auto (an import's source dtype, else float32), float32, bfloat16 or float16")
    out.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size limit (GB)")


def _convert(args) -> int:
    from lcjax import convert  # imports JAX; one device is enough

    if args.direction == "hf-to-lcjax":
        out = convert.hf_to_lcjax(args.src, args.out)
    else:
        if not args.max_shard_gb > 0:
            raise ValueError(f"--max-shard-gb {args.max_shard_gb} must be > 0")
        out = convert.lcjax_to_hf(args.src, args.out, step=args.step, dtype=args.dtype,
                                  max_shard_bytes=int(args.max_shard_gb * 1e9))
    print(f"lcjax: converted {args.src} -> {out}")
    return 0


def _add_eval_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="evaluate a trained run (docs/evaluation.md)")
    task = evaluate.add_subparsers(dest="task", required=True, parser_class=_Parser)
    pk = task.add_parser("passkey", help="PassKey retrieval over lengths x depths -> passkey.json, passkey.png")
    pk.add_argument("--run-dir", required=True, help="run directory (config.yaml, tokenizer, checkpoints)")
    pk.add_argument("--lengths", help="comma-separated prompt lengths in tokens (default: data.seq_len)")
    pk.add_argument("--depths", type=int, default=11, help="N evenly spaced key depths from 0 to 100%% (default 11)")
    pk.add_argument("--samples", type=int, default=20, help="prompts (keys) per length and depth (default 20)")
    pk.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the run's config, e.g. --set mesh.sequence=8 (repeatable)")
    pk.add_argument("--filler", default="synthetic", help="synthetic (the standard sentences) or corpus "
                                                           "(held-out text of the run's data.source)")
    pk.add_argument("--mode", default="teacher", help="teacher (teacher-forced exact match, one forward) or "
                                                       "generate (greedy generation, first integer == key)")
    pk.add_argument("--seed", type=int, default=0, help="seed of the evaluation keys (default 0)")
    pk.add_argument("--step", type=int, help="checkpoint step (default the newest)")
    pk.add_argument("--batch-size", type=int, help="prompts per forward pass (default 16, a multiple of mesh.data)")
    pk.add_argument("--max-new-tokens", type=int, default=10, help="tokens generated in --mode generate")
    pk.add_argument("--out", metavar="FILE.json", help="write the results here (and the heatmap beside it as .png; "
                                                        "default: new passkey[-N].json/.png in the run dir)")
    pk.add_argument("--overwrite", action="store_true", help="let --out replace existing files")


def _eval(args) -> int:
    from lcjax.sharding.mesh import provision_host_devices as provision

    try:
        lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    except ValueError:
        raise ValueError(f"--lengths {args.lengths!r} must be comma-separated integers") from None
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"--run-dir {run_dir}: not an lcjax run dir (no config.yaml)")
    cfg = config_lib.load(run_dir / "config.yaml", args.set)
    provision(cfg.mesh.data * cfg.mesh.sequence * cfg.mesh.model)
    from lcjax.eval import passkey  # imports JAX: after the devices are provisioned

    inside = args.out is None or rundir.is_inside(args.out, run_dir)  # writes into the run dir: hold its lock
    with rundir.locked(run_dir, command="lcjax eval passkey", enabled=inside):
        spec = passkey.PassKeySpec(lengths=tuple(lengths) if lengths else None, depths=args.depths,
                                   samples=args.samples, seed=args.seed, filler=args.filler, mode=args.mode,
                                   batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        passkey.run(run_dir, spec, overrides=args.set, step=args.step, log=print, out=args.out,
                    overwrite=args.overwrite)
    return 0


def default_run_dir(cfg: config_lib.Config) -> Path:
    """runs/<config name>-<UTC time>."""
    return Path("runs") / f"{cfg.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def _check_train_flags(args) -> None:
    """Raise ValueError (one line) for train flags that exclude or need each other."""
    if args.resume not in (False, True, "auto"):
        raise ValueError(f"--resume {args.resume!r}: the only value it takes is 'auto'")
    if args.resume and not args.run_dir:
        raise ValueError("--resume needs --run-dir")
    if args.step is not None and not args.resume:
        raise ValueError("--step needs --resume (the checkpoint of --run-dir to continue)")
    if args.resume is True and args.init_from:
        raise ValueError("--resume and --init-from exclude each other")
    if args.init_optimizer and not args.init_from:
        raise ValueError("--init-optimizer needs --init-from RUN_DIR (the run whose optimizer state to take)")
    if args.config is None and not args.resume:
        raise ValueError("--config is required (except with --resume, which reads the run's config.yaml)")
    if args.config is None and args.resume == "auto" and not (Path(args.run_dir) / "config.yaml").is_file():
        raise ValueError(f"--resume auto: --config is required (--run-dir {args.run_dir} holds no run to read it from)")
    if args.resume is True and args.config is None:
        from lcjax.train.run_files import check_run_dir  # names the run dir, not a --config never passed

        check_run_dir(Path(args.run_dir), resume=True)


def _train(args) -> int:
    from lcjax import distributed

    _check_train_flags(args)
    cfg = config_lib.load(args.config or Path(args.run_dir) / "config.yaml", args.set)
    from lcjax.train.metrics import parse_profile  # imports no JAX

    profile = parse_profile(args.profile)
    settings = distributed.resolve(args.coordinator, args.num_processes, args.process_id,
                                   timeout_s=args.init_timeout)
    if settings is not None and not args.run_dir:
        raise ValueError("--run-dir is required in a multi-process run (every process must name the same one)")
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    provision_host_devices(distributed.local_device_count(cfg.mesh.data * cfg.mesh.sequence * cfg.mesh.model,
                                                          settings))
    distributed.initialize(settings)
    from lcjax.train.loop import NonFiniteError, train  # imports JAX: after the devices are provisioned

    resume, init_from = args.resume, args.init_from
    if resume == "auto":
        from lcjax.train.resume import CONTINUE, DONE, auto_resume

        decision = auto_resume(run_dir, cfg)
        if decision == DONE:
            print(f"lcjax: run dir {run_dir} already holds this run up to train.steps {cfg.train.steps}; "
                  f"nothing to do", flush=True)
            return 0
        resume = decision == CONTINUE
        init_from = None if resume else init_from  # a continued run already holds the weights it started from
    try:
        result = train(cfg, run_dir, resume=resume, init_from=init_from,
                       init_optimizer=args.init_optimizer and init_from is not None, progress=not args.no_progress,
                       hf_params=_hf_params, profile=profile, step=args.step)
    except NonFiniteError as e:
        print(f"lcjax: stopped: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    return _report_train(result, run_dir)


def _report_train(result: dict, run_dir: Path) -> int:
    """Print how a training run ended (finished, preempted, stopped during set-up); the exit code, 0."""
    where = (f"{result['checkpoint_dir']}/{result['checkpoint']}" if result["checkpoint"] is not None
             else "nowhere (no step was completed, nothing written)")
    if result.get("set_up_only"):  # a signal before the first step: nothing was written
        kept = f", checkpoint {where} unchanged" if result["checkpoint"] is not None else ""
        print(f"lcjax: preempted before step {result['step'] + 1}: nothing written{kept}", flush=True)
        return 0
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
                "dtype": cfg.train.dtype, "remat": plans[0].inputs.remat if plans else args.remat,
                "optimizer_sharding": plans[0].inputs.optimizer_sharding if plans else args.optimizer_sharding,
                "activations": args.activations}
    if args.json:
        print(json.dumps(report.to_json(shape, cfg.data.seq_len, plans, rejected, settings), indent=1))
    else:
        print(report.table(shape, cfg.data.seq_len, plans, rejected, settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lcjax`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    memcheck.configure_gpu_allocator()  # before any JAX backend starts (docs/memory.md)
    try:
        checkpoints_cli.quiet_libraries()
        return {"train": _train, "plan": _plan, "data": _data, "convert": _convert, "generate": _generate,
                "eval": _eval, "checkpoints": checkpoints_cli.run}[args.command](args)
    except ValueError as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        print("lcjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
