"""The training loop: set-up (checks, data, mesh, compiled step, state), the first write, and the steps
(log, evaluate, checkpoint, stop on a signal or on non-finite steps).

The concerns it calls on live beside it: the run directory's checks and files (:mod:`lcjax.train.run_files`),
starting from another run or a Hugging Face folder (:mod:`lcjax.train.init_from`), the data and batch
placement (:mod:`lcjax.train.batches`), preemption signals (:mod:`lcjax.train.signals`), the state
(:mod:`lcjax.train.state`) and the pure step (:mod:`lcjax.train.step`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from lcjax import config as config_lib
from lcjax import distributed, memcheck, rundir
from lcjax.checkpoint import Checkpointer, abstract_like
from lcjax.config import Config
from lcjax.data import LoaderSpec
from lcjax.data.curriculum import curriculum_loader
from lcjax.model.llama import count_params
from lcjax.sharding.mesh import make_mesh
from lcjax.train.batches import device_batches, eval_batches, load_data, placer, zeros_batch
from lcjax.train.init_from import load_init_opt_state, load_init_params, tokenizer_dir
from lcjax.train.logs import StepMeter, StepReporter, use_bar
from lcjax.train.metrics import MetricsWriter, Profiler, clean, startup_summary
from lcjax.train.run_files import check_inputs, set_aside, write_run_files
from lcjax.train.signals import preemption_signals
from lcjax.train.state import abstract_state, data_state_arrays, data_state_dict, init_opt_state, init_state
from lcjax.train.step import batch_sharding, make_eval_loss, make_train_step
from lcjax.train.wandb_log import check_available, sinks


class NonFiniteError(RuntimeError):
    """``train.max_bad_steps`` steps in a row had a NaN or infinite loss or gradient norm (CLI exit 3)."""


@dataclass(frozen=True)
class TrainOptions:
    """How :func:`train` starts and reports (its keyword arguments, documented there)."""

    resume: bool = False
    init_from: str | Path | None = None
    init_optimizer: bool = False
    progress: bool = True
    devices: Any = None
    hf_params: Any = None
    profile: tuple[int, int] | None = None
    step: int | None = None


@dataclass(frozen=True)
class _Run:
    """What set-up and the loop share: the config, run dir, options, the signal flag, the mesh and its
    devices, the training loader and the step the run starts after."""

    cfg: Config
    run_dir: Path
    opts: TrainOptions
    flag: dict
    mesh: Any
    devices: list
    loader: Any
    start: int


@dataclass(frozen=True)
class _Ready:
    """The outcome of set-up: the compiled step, its start-up summary, the validation batches (or None), the
    model's graphdef and parameter specs, the train state and the batch placer."""

    step_fn: Any
    summary: list
    evals: list | None
    graphdef: Any
    specs: Any
    state: Any
    put: Any


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, init_from: str | Path | None = None,
          init_optimizer: bool = False, progress: bool = True, devices=None, hf_params=None,
          profile: tuple[int, int] | None = None, step: int | None = None) -> dict:
    """Train ``cfg`` into ``run_dir``. Returns {"step", "loss", "checkpoint", "checkpoint_dir", "preempted"}
    of the last step.

    ``resume`` continues the newest checkpoint of ``run_dir`` (model, optimizer and data-iterator state,
    on any mesh); ``init_from`` starts a new run from the parameters of another run's newest checkpoint or a
    Hugging Face folder (fresh optimizer; mesh, seq_len and RoPE may differ, the model shape may not;
    ``hf_params``: see :func:`lcjax.train.init_from.load_init_params`); with ``init_optimizer`` also the optimizer state of that
    run's newest checkpoint (:func:`lcjax.train.init_from.load_init_opt_state`; step 1 and a fresh data order all the same).
    ``devices`` defaults to every device (their number must equal the mesh product). SIGTERM or SIGINT
    (even during set-up) finishes the current step, saves and returns with ``preempted`` True. A step with
    a non-finite loss or gradient norm is not applied. ``eval.every`` > 0 evaluates the held-out split;
    ``profile`` (START, END) traces those optimizer steps into ``run_dir/profile``. ``step`` (with ``resume``)
    continues checkpoint ``step`` instead of the newest; later checkpoints and their metrics are set aside
    (:func:`lcjax.train.run_files.set_aside`). The run dir's lock (:mod:`lcjax.rundir`) is held throughout (process 0); the step
    is compiled, and refused when it does not fit the devices (``train.check_memory``), before anything
    is allocated or written: a refused fresh run leaves no run dir. A signal before the first write stops
    there, writing nothing.

    Raises ValueError (one line naming the field and the rule) for unusable input before anything is
    written: a run dir in use by another process (RunDirBusy), not writable, existing without ``resume``,
    without a checkpoint with ``resume``, a damaged checkpoint (DamagedCheckpoint, naming the intact ones),
    a step that does not fit the devices (DoesNotFit), a tokenizer larger than model.vocab_size, a device count
    other than the mesh's, a corpus too small for one batch, an unreadable or foreign checkpoint, another
    model shape, ``init_optimizer`` without ``init_from``, with a Hugging Face folder or with a checkpoint
    whose optimizer state is missing or of another structure. Raises NonFiniteError after
    ``train.max_bad_steps`` non-finite steps in a row (the newest checkpoint is left as it was).
    """
    run_dir = Path(run_dir)
    opts = TrainOptions(resume, init_from, init_optimizer, progress, devices, hf_params, profile, step)
    with preemption_signals() as flag, rundir.locked(run_dir, command="lcjax train", create=not resume,
                                                      enabled=distributed.is_primary()) as lock:
        return _train(cfg, run_dir, opts, flag, lock)


def _train(cfg: Config, run_dir: Path, opts: TrainOptions, flag: dict, lock) -> dict:
    saved = check_inputs(cfg, run_dir, opts.resume, opts.init_from, opts.init_optimizer, opts.step)
    check_available(cfg)  # log.wandb needs the wandb extra
    devices = check_devices(cfg, opts.devices)
    dataset = load_data(cfg, tokenizer_dir(opts.init_from))
    tokenizer, heldout = dataset.tokenizer, None
    if cfg.eval.every:
        dataset, heldout = dataset.split(cfg.eval.holdout)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model, devices=devices)
    run = _Run(cfg, run_dir, opts, flag, mesh, devices, _loader(cfg, dataset), saved[-1] if saved else 0)
    try:  # until the loop's own cleanup takes over: close the loader on any error
        ready = _set_up(run, heldout, resumed=bool(saved))
        if distributed.any_process(flag["signal"] is not None):  # stopped during set-up: nothing written
            run.loader.close()
            return {"step": run.start, "loss": None, "checkpoint": run.start or None,
                    "checkpoint_dir": str(run_dir / "checkpoints"), "preempted": True, "set_up_only": True}
        distributed.barrier("lcjax-checks")  # every process has checked its input before the first write
        if distributed.is_primary():  # the first write: everything above only read
            set_aside(run_dir, run.start)
            write_run_files(run_dir, cfg, tokenizer, run.start)
            if lock is not None:
                lock.keep()
    except BaseException:
        run.loader.close()
        raise
    return _loop(run, ready)


def _loader(cfg: Config, dataset):
    """The training loader of ``dataset``: ``data.curriculum``'s stages, the layout's token order."""
    d = cfg.data
    spec = LoaderSpec(seq_len=d.seq_len, global_batch=d.global_batch, seed=d.seed, layout=cfg.attention.layout,
                      num_shards=cfg.mesh.sequence, attention_window=cfg.attention.window,
                      cross_document_attention=d.cross_document_attention, workers=d.workers,
                      passkey_fraction=d.passkey_fraction, passkey_synthetic=d.passkey_synthetic)
    return curriculum_loader(dataset.loader, config_lib.stages(cfg), spec)


def _set_up(run: _Run, heldout, *, resumed: bool) -> _Ready:
    """Compile and check the step, build the validation batches and the state: fresh, from ``--init-from``,
    or read from the run's checkpoint ``run.start`` (``resumed``). Reads only; writes nothing."""
    cfg, mesh = run.cfg, run.mesh
    put = placer(batch_sharding(mesh))
    step_fn, summary = _compile_and_check(cfg, mesh, run.devices, run.start)
    evals = eval_batches(cfg, heldout, put) if heldout is not None else None
    graphdef, specs, optimizer, state = init_state(cfg, mesh, run.loader.get_state())
    # the fresh arrays are dropped before reading, so memory holds one state at a time
    if run.opts.init_from is not None:
        abstract = abstract_like(state.params), abstract_like(state.opt_state)
        state = state._replace(params=None, opt_state=None)
        state = _init_from(run, state, abstract, optimizer, specs)
    if resumed:
        abstract, state = abstract_like(state), None
        state = Checkpointer.read(run.run_dir / "checkpoints", abstract, run.start)
        run.loader.set_state(data_state_dict(state.data_state))
    return _Ready(step_fn, summary, evals, graphdef, specs, state, put)


def _init_from(run: _Run, state, abstract, optimizer, specs):
    """``state`` with the parameters (and, with ``--init-optimizer``, the optimizer state) of
    ``--init-from``; ``abstract``: (params, opt_state) ShapeDtypeStructs to place them like."""
    opts = run.opts
    params = load_init_params(opts.init_from, run.cfg, abstract[0], hf_params=opts.hf_params)
    opt_state = (load_init_opt_state(opts.init_from, abstract[1]) if opts.init_optimizer
                 else init_opt_state(run.cfg, run.mesh, optimizer, params, specs))
    return state._replace(params=params, opt_state=opt_state)


def _loop(run: _Run, ready: _Ready) -> dict:
    """Open the checkpointer, metrics writer and profiler, run the steps, and close everything."""
    cfg = run.cfg
    ckpt = Checkpointer(run.run_dir / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
    evaluate = None
    if ready.evals is not None:
        eval_loss = make_eval_loss(ready.graphdef, ready.specs, run.mesh, cfg)
        evaluate = lambda params: _evaluate(eval_loss, params, ready.evals)
    writer = MetricsWriter(run.run_dir, run.start, sinks(cfg, run.run_dir)) if distributed.is_primary() else None
    if writer is not None:
        writer.text("config", "\n".join(["```", config_lib.to_yaml(cfg), "```", *ready.summary]))
    profiler = Profiler(run.run_dir, run.opts.profile)
    steps = _Steps(ready.step_fn, device_batches(run.loader, ready.put), ckpt, writer, evaluate, profiler)
    try:
        return _run_steps(run, ready.state, steps)
    finally:
        profiler.close()
        if writer is not None:
            writer.close()
        ckpt.close()
        run.loader.close()


def check_devices(cfg: Config, devices) -> list:
    """The devices of the mesh: ``devices`` or every device of every process, whose number must equal the
    mesh product (ValueError naming mesh.* otherwise)."""
    devices = jax.devices() if devices is None else list(devices)
    m = cfg.mesh
    if m.data * m.sequence * m.model != len(devices):
        raise ValueError(f"mesh.data x mesh.sequence x mesh.model = {m.data}x{m.sequence}x{m.model} = "
                         f"{m.data * m.sequence * m.model} must equal the number of devices, "
                         f"{len(devices)} {devices[0].platform}")
    return devices


def _compile_and_check(cfg: Config, mesh, devices, start: int):
    """Compile the train step for abstract arrays (the batch shape of step ``start + 1``: data.curriculum's
    stage), print the start-up summary, and raise DoesNotFit when XLA's per-device bytes exceed what the
    devices have (``train.check_memory``). Returns (the step function, compiled; the summary lines)."""
    graphdef, specs, optimizer, abstract = abstract_state(cfg, mesh)
    step_fn = make_train_step(graphdef, specs, mesh, cfg, optimizer)
    sharding = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
             for k, v in zeros_batch(cfg, start + 1).items()}
    compiled = step_fn.compile(abstract, batch)
    try:
        memory = compiled.memory_analysis()
    except Exception:  # a backend without the analysis
        memory = None
    summary = startup_summary(cfg, memory, platform=devices[0].platform, device_kind=devices[0].device_kind,
                              n_params=count_params(cfg.model))
    summary.append(f"{jax.process_count()} process(es), steps {start + 1}..{cfg.train.steps}")
    print("\n".join(f"lcjax: {line}" for line in summary), flush=True)
    local = [d for d in devices if d.process_index == jax.process_index()]
    memcheck.check_fits(memcheck.compiled_total(compiled), local, what="the train step", kind="train",
                        enabled=cfg.train.check_memory)
    return step_fn, summary


def _evaluate(eval_loss, params, batches) -> dict:
    """Validation loss (nats per target token) and perplexity over the fixed held-out batches."""
    total = count = 0.0
    for batch in batches:
        s, c = jax.device_get(eval_loss(params, batch))
        total, count = total + float(s), count + float(c)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


@dataclass(frozen=True)
class _Steps:
    """What the step loop drives: the step function, the device batches, the checkpointer, the metrics
    writer (None off the primary process), the evaluation (None without ``eval.every``) and the profiler."""

    step_fn: Any
    batches: Any
    ckpt: Checkpointer
    writer: MetricsWriter | None
    evaluate: Any
    profiler: Profiler


def _run_steps(run: _Run, state, steps: _Steps) -> dict:
    """The step loop: log, evaluate, checkpoint, count non-finite steps, stop on SIGTERM/SIGINT (see
    :func:`train`)."""
    cfg, ckpt = run.cfg, steps.ckpt
    start = int(state.step)
    shape = zeros_batch(cfg, start + 1)["tokens"].shape  # what the step is compiled for
    last = {"step": start, "loss": None, "checkpoint": ckpt.latest_step(),
            "checkpoint_dir": str(run.run_dir / "checkpoints"), "preempted": False}
    reporter = StepReporter(cfg.train.steps, start, cfg.log.every, bar=use_bar(run.opts.progress),
                            enabled=distributed.is_primary())
    meter = StepMeter(cfg, jax.local_devices())
    bad = 0
    with contextlib.closing(reporter):
        while last["step"] < cfg.train.steps:
            if distributed.any_process(run.flag["signal"] is not None):
                last["preempted"] = True
                break
            batch = next(steps.batches)
            if batch["tokens"].shape != shape:  # data.curriculum: a new stage, compile for its shape
                shape = batch["tokens"].shape
                steps.step_fn.compile(state, batch)
            state, record, raw = _logged_step(run, state, batch, steps, meter)
            bad = bad + 1 if record["skipped"] else 0
            _check_bad(cfg, bad, record, raw, ckpt)
            if not record["skipped"]:
                if ckpt.maybe_save(record["step"], state, force=record["step"] == cfg.train.steps):
                    last["checkpoint"] = record["step"]
                last.update(step=record["step"], loss=record["loss"])
            reporter.report(record, bad)
        if last["preempted"] and last["step"] > start and ckpt.maybe_save(last["step"], state, force=True):
            last["checkpoint"] = last["step"]
    return last


def _logged_step(run: _Run, state, batch, steps: _Steps, meter: StepMeter):
    """One step on ``batch``, profiled, measured, evaluated when due and written to the metrics: (new state,
    metrics record, raw metrics)."""
    cfg, done = run.cfg, int(state.step) + 1
    tokens = batch["tokens"].shape
    steps.profiler.before(done)
    state, record, raw = _one_step(steps.step_fn, state, batch, run.loader, tokens[0] * tokens[1])
    record.update(meter.measure(record["tokens_per_sec"], tokens[1]))
    steps.profiler.after(done, state.params)
    every, n = cfg.eval.every, record["step"]
    if steps.evaluate is not None and not record["skipped"] and (n % every == 0 or n == cfg.train.steps):
        record.update(steps.evaluate(state.params))
    if steps.writer is not None:
        steps.writer.write(record)
    return state, record, raw


def _check_bad(cfg: Config, bad: int, record: dict, raw: dict, ckpt: Checkpointer) -> None:
    """Raise NonFiniteError after ``train.max_bad_steps`` non-finite steps in a row."""
    if bad >= cfg.train.max_bad_steps:
        raise NonFiniteError(
            f"train.max_bad_steps {cfg.train.max_bad_steps}: {bad} steps in a row after step "
            f"{record['step']} had a non-finite loss or gradient norm (loss {float(raw['loss'])}, "
            f"grad_norm {float(raw['grad_norm'])}); stopped without saving, newest checkpoint: "
            f"{_describe(ckpt)}")


def metrics_record(step: int, metrics: dict, step_time: float, tokens: int) -> dict:
    """One metrics.jsonl line; non-finite values become null. ``step`` counts applied updates, so a skipped
    (non-finite) step repeats the previous step number with ``skipped`` true."""
    return {"step": step, "loss": clean(metrics["loss"]), "grad_norm": clean(metrics["grad_norm"]),
            "lr": clean(metrics["lr"]), "tokens_per_sec": clean(tokens / step_time),
            "step_time_s": clean(step_time), "skipped": bool(metrics.get("skipped", 0) > 0)}


def _one_step(step_fn, state, batch, loader, tokens_per_step: int):
    """Run one step on ``batch``; return the new state (data position refreshed), its metrics record and
    the raw metrics (host floats, NaN kept)."""
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch)
    metrics = jax.device_get(metrics)
    step = int(state.step)
    record = metrics_record(step, metrics, time.perf_counter() - t0, tokens_per_step)
    return state._replace(data_state=data_state_arrays(loader.get_state())), record, metrics


def _describe(ckpt: Checkpointer) -> str:
    step = ckpt.latest_step()
    return "none" if step is None else f"{ckpt.directory / str(step)} (step {step})"
