"""The training loop: everything with I/O (data, run directory, metrics, progress bar, checkpoints).

Run directory layout (docs/design.md, "Public contracts"): ``config.yaml`` (resolved), ``tokenizer/``,
``checkpoints/``, ``metrics.jsonl`` (one JSON object per optimizer step, appended across resumes).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np
import optax

from lcjax import config as config_lib
from lcjax import distributed, memcheck, rundir
from lcjax.checkpoint import Checkpointer, abstract_like, check_directory, restore_opt_state, restore_params
from lcjax.config import Config
from lcjax.data import Dataset
from lcjax.data.mixture import build_data
from lcjax.data.curriculum import curriculum_loader, stage_index
from lcjax.model.llama import count_params
from lcjax.sharding.mesh import make_mesh
from lcjax.train.logs import StepMeter, StepReporter, use_bar
from lcjax.train.metrics import MetricsWriter, Profiler, clean, startup_summary
from lcjax.train.wandb_log import check_available, sinks
from lcjax.train.state import abstract_state, data_state_arrays, data_state_dict, init_opt_state, init_state
from lcjax.train.step import BATCH_FIELDS, batch_sharding, make_eval_loss, make_train_step


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Raise ValueError unless ``run_dir`` is new (missing or empty) and creatable (fresh run) or holds a
    run (``--resume``), and is writable."""
    if resume and not (run_dir / "config.yaml").is_file():
        what = "does not exist" if not run_dir.exists() else "holds no run (no config.yaml)"
        raise ValueError(f"--resume: run dir {run_dir} {what}")
    if not resume and (rundir.holds_run(run_dir) or (run_dir.exists() and not run_dir.is_dir())):
        raise ValueError(f"--run-dir {run_dir} already exists; pass --resume to continue it")
    rundir.check_writable(run_dir)


def check_resume_compatible(saved: Config, cfg: Config) -> None:
    """Raise ValueError when a resumed run changes what a checkpoint cannot follow (the model shape,
    the data order)."""
    for section in ("model", "data"):
        a, b = config_lib.to_dict(saved)[section], config_lib.to_dict(cfg)[section]
        for key in a:
            if a[key] != b[key] and key not in RESUME_FREE:
                raise ValueError(f"{section}.{key}: --resume cannot change it ({a[key]!r} -> {b[key]!r})")


RESUME_FREE = ("cache_dir", "data_dir", "workers")  # keys of the model/data sections that do not affect a resumed run


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop metrics.jsonl records of the steps a run resumed at ``step`` is about to redo: those after
    ``step`` and the skipped (non-finite) ones that followed it."""
    if path.is_file():
        kept = []
        for line in path.read_text().splitlines(keepends=True):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if not isinstance(r, dict) or not isinstance(r.get("step"), int):
                continue
            if r["step"] < step or (r["step"] == step and not r.get("skipped")):
                kept.append(line if line.endswith("\n") else line + "\n")
        write_atomic(path, "".join(kept))


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step (a kill leaves the old file or the new one, never half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def metrics_record(step: int, metrics: dict, step_time: float, tokens: int) -> dict:
    """One metrics.jsonl line; non-finite values become null. ``step`` counts applied updates, so a skipped
    (non-finite) step repeats the previous step number with ``skipped`` true."""
    return {"step": step, "loss": clean(metrics["loss"]), "grad_norm": clean(metrics["grad_norm"]),
            "lr": clean(metrics["lr"]), "tokens_per_sec": clean(tokens / step_time),
            "step_time_s": clean(step_time), "skipped": bool(metrics.get("skipped", 0) > 0)}


class NonFiniteError(RuntimeError):
    """``train.max_bad_steps`` steps in a row had a NaN or infinite loss or gradient norm (CLI exit 3)."""


HF_FILES = ("config.json", "*.safetensors")


def check_init_from(path: Path, cfg: Config) -> None:
    """Raise ValueError (one line) unless ``path`` is a run dir with a checkpoint of ``cfg``'s model shape or a
    Hugging Face folder (config.json + *.safetensors)."""
    if not path.is_dir():
        raise ValueError(f"--init-from {path}: {'not a folder' if path.exists() else 'no such folder'}")
    if _is_hf_folder(path):
        return
    if not (path / "config.yaml").is_file() or not (path / "checkpoints").exists():
        raise ValueError(f"--init-from {path}: neither a run dir (config.yaml, checkpoints/) nor a Hugging Face "
                         f"folder (config.json, *.safetensors)")
    if not check_directory(path / "checkpoints"):
        raise ValueError(f"--init-from {path}: holds no complete checkpoint")
    source = config_lib.to_dict(config_lib.load(path / "config.yaml"))["model"]
    target = config_lib.to_dict(cfg)["model"]
    for key in SHAPE_KEYS:
        if source[key] != target[key]:
            raise ValueError(f"model.{key}: --init-from {path} has {source[key]!r}, this config {target[key]!r} "
                             f"(the model shape must match)")


SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "tie_embeddings")


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def load_init_params(path: str | Path, cfg: Config, abstract_params, *, hf_params=None):
    """Parameters to start a new run from: the newest checkpoint of the run dir ``path``, or the weights of a
    Hugging Face folder (config.json + *.safetensors) read by ``hf_params(hf_dir, abstract_params)``
    (lcjax.convert.hf_params, passed in by the CLI: train/ sits above convert/ in the layering), placed like
    ``abstract_params`` (any mesh).

    Raises ValueError (one line) when ``path`` is neither, holds parameters of another shape, or is a
    Hugging Face folder and no ``hf_params`` was given.
    """
    path = Path(path)
    check_init_from(path, cfg)
    if _is_hf_folder(path):
        if hf_params is None:
            raise ValueError(f"--init-from {path}: a Hugging Face folder needs a converter (lcjax.convert)")
        weights = hf_params(path, abstract_params)  # host arrays (float32) in the structure of abstract_params
        return jax.tree.map(lambda w, a: jax.device_put(np.asarray(w).astype(a.dtype), a.sharding), weights,
                            abstract_params)
    return restore_params(path / "checkpoints", abstract_params)


def check_init_optimizer(init_from, init_optimizer: bool) -> None:
    """Raise ValueError (one line) when ``--init-optimizer`` is asked for without ``--init-from`` or with a
    Hugging Face folder (which holds no optimizer state)."""
    if not init_optimizer:
        return
    if init_from is None:
        raise ValueError("--init-optimizer needs --init-from RUN_DIR (the run whose optimizer state to take)")
    if _is_hf_folder(Path(init_from)):
        raise ValueError(f"--init-optimizer: --init-from {init_from} is a Hugging Face folder, which holds no "
                         f"optimizer state (pass an lcjax run dir, or drop --init-optimizer)")


def load_init_opt_state(path: str | Path, abstract_opt_state):
    """The optimizer state of the newest checkpoint of the run dir ``path`` (``--init-optimizer``), placed like
    ``abstract_opt_state`` (ShapeDtypeStructs with shardings: any mesh, ZeRO-1/2 or FSDP layout included).
    Every optax state carries over (AdamW's moments and their count, which the bias correction needs) except
    the learning-rate schedule's counts, which restart at 0: the new run follows its own schedule from
    step 1, as its logged ``lr`` says.

    Raises ValueError (one line naming ``--init-optimizer``) when the checkpoint holds no optimizer state
    (parameters alone, e.g. an import) or one of another structure than this config's optimizer.
    """
    try:
        opt_state = restore_opt_state(Path(path) / "checkpoints", abstract_opt_state)
    except ValueError as e:
        raise ValueError(f"--init-optimizer: {e}") from None
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    restart = lambda c: jax.device_put(np.zeros(c.shape, c.dtype), c.sharding)
    return jax.tree.map(lambda x: x._replace(count=restart(x.count)) if is_schedule(x) else x, opt_state,
                        is_leaf=is_schedule)


def _zeros_batch(cfg: Config, step: int) -> dict:
    """A batch of the shape of 1-based ``step``'s batches (for compiling ahead of it; data.curriculum)."""
    stages = config_lib.stages(cfg)
    _, seq_len, batch = stages[stage_index(stages, step)]
    padded = config_lib.padded_seq_len(seq_len, cfg.attention.layout, cfg.mesh.sequence)  # as the loader pads
    return {k: np.zeros((batch, padded), np.int32) for k in BATCH_FIELDS}


def process_rows(sharding, global_shape: tuple[int, int]) -> slice:
    """The rows (sequences) of a [B, T] global batch that this process's devices hold: a contiguous block
    when ``data`` is split across processes (devices are laid out process by process), else all rows."""
    rows = [index[0] for index in sharding.addressable_devices_indices_map(global_shape).values()]
    return slice(min(r.start or 0 for r in rows), max(global_shape[0] if r.stop is None else r.stop for r in rows))


def _device_batch(local: dict, sharding, rows: slice, global_shape: tuple[int, int]) -> dict:
    """Global [B, T] arrays from ``local``, this process's ``rows`` of the global batch; every process places
    only its own devices' shards."""
    def put(v):
        v = np.asarray(v, np.int32)

        def shard(index):
            r = index[0]
            return v[slice((r.start or 0) - rows.start, (rows.stop if r.stop is None else r.stop) - rows.start),
                     index[1]]
        return jax.make_array_from_callback(global_shape, sharding, shard)
    return {k: put(v) for k, v in local.items()}


def placer(sharding):
    """``put(global_batch) -> device batch``: global [B, T] arrays of which every process places only the
    rows its devices hold (:func:`process_rows`). The loader builds the whole global batch, the same in every
    process; a loader that builds only a process's rows can replace the slice here. B and T may change
    from batch to batch (``data.curriculum``)."""
    def put(batch: dict) -> dict:
        shape = next(iter(batch.values())).shape
        rows = process_rows(sharding, shape)
        return _device_batch({k: v[rows] for k, v in batch.items()}, sharding, rows, shape)
    return put


def _batches(loader, put):
    """Endless device batches from ``loader``'s global batches."""
    while True:
        yield put(next(loader))


@contextlib.contextmanager
def preemption_signals():
    """While open, SIGTERM and SIGINT only set ``flag["signal"]`` (the loop saves and stops after the current
    step); a second one raises KeyboardInterrupt. In a thread other than the main one signals cannot be
    caught and nothing is installed."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        if flag["signal"] is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        flag["signal"] = signum
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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


def _load_data(cfg: Config, tokenizer_dir: Path | None) -> Dataset:
    """The run's :class:`lcjax.data.Dataset`, tokenized with ``data.tokenizer`` or, for ``--init-from``, the
    tokenizer saved in ``tokenizer_dir`` (when it holds one)."""
    d, m = cfg.data, cfg.model
    what = " + ".join(s.source for s in d.mixture) or d.source
    print(f"lcjax: data {what}: loading (tokenized on first use, then cached)", flush=True)
    own = tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file()
    try:
        dataset = build_data(d, tokenizer_kind=str(tokenizer_dir) if own else None, vocab_size=m.vocab_size)
    except OSError as e:
        raise ValueError(f"data.cache_dir {d.cache_dir or '~/.cache/lcjax'}: {e.strerror or e}") from None
    print("\n".join(f"lcjax: {line}" for line in dataset.summary(d.seq_len)), flush=True)
    if dataset.tokenizer.vocab_size > m.vocab_size:
        raise ValueError(f"model.vocab_size {m.vocab_size} must be >= the tokenizer's {dataset.tokenizer.vocab_size}")
    return dataset


def _eval_batches(cfg: Config, heldout: Dataset, put) -> list[dict]:
    """The fixed validation batches: the first ``eval.batches`` global batches of the held-out split (in a
    fixed shuffled order), placed on the devices. Raises ValueError when the split is too small."""
    d = cfg.data
    try:
        loader = heldout.loader(seq_len=d.seq_len, global_batch=d.global_batch, seed=0, prefetch=0,
                                layout=cfg.attention.layout, num_shards=cfg.mesh.sequence,
                                cross_document_attention=d.cross_document_attention,
                                attention_window=cfg.attention.window)
    except ValueError as e:
        raise ValueError(f"eval.holdout {cfg.eval.holdout}: the held-out split is too small ({e})") from None
    batches = [put(next(loader)) for _ in range(cfg.eval.batches)]
    loader.close()
    return batches


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, init_from: str | Path | None = None,
          init_optimizer: bool = False, progress: bool = True, devices=None, hf_params=None,
          profile: tuple[int, int] | None = None, step: int | None = None) -> dict:
    """Train ``cfg`` into ``run_dir``. Returns {"step", "loss", "checkpoint", "checkpoint_dir", "preempted"}
    of the last step.

    ``resume`` continues the newest checkpoint of ``run_dir`` (model, optimizer and data-iterator state,
    on any mesh); ``init_from`` starts a new run from the parameters of another run's newest checkpoint or a
    Hugging Face folder (fresh optimizer; mesh, seq_len and RoPE may differ, the model shape may not;
    ``hf_params``: see :func:`load_init_params`); with ``init_optimizer`` also the optimizer state of that
    run's newest checkpoint (:func:`load_init_opt_state`; step 1 and a fresh data order all the same).
    ``devices`` defaults to every device (their number must equal the mesh product). SIGTERM or SIGINT
    (even during set-up) finishes the current step, saves and returns with ``preempted`` True. A step with
    a non-finite loss or gradient norm is not applied. ``eval.every`` > 0 evaluates the held-out split;
    ``profile`` (START, END) traces those optimizer steps into ``run_dir/profile``. ``step`` (with ``resume``)
    continues checkpoint ``step`` instead of the newest; later checkpoints and their metrics are set aside
    (:func:`set_aside`). The run dir's lock (:mod:`lcjax.rundir`) is held throughout (process 0); the step
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
    with preemption_signals() as flag, rundir.locked(run_dir, command="lcjax train", create=not resume,
                                                      enabled=distributed.is_primary()) as lock:
        return _train(cfg, run_dir, resume, init_from, init_optimizer, progress, devices, hf_params, flag,
                      profile, step, lock)


def _train(cfg: Config, run_dir: Path, resume: bool, init_from, init_optimizer: bool, progress: bool, devices,
           hf_params, flag: dict, profile, step: int | None, lock) -> dict:
    saved = check_inputs(cfg, run_dir, resume, init_from, init_optimizer, step)
    check_available(cfg)  # log.wandb needs the wandb extra
    devices = check_devices(cfg, devices)
    d = cfg.data
    source = Path(init_from) if init_from else None
    dataset = _load_data(cfg, None if source is None else source if _is_hf_folder(source) else source / "tokenizer")
    tokenizer, heldout = dataset.tokenizer, None
    if cfg.eval.every:
        dataset, heldout = dataset.split(cfg.eval.holdout)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model, devices=devices)
    loader = curriculum_loader(dataset.loader, config_lib.stages(cfg), seed=d.seed,
                               layout=cfg.attention.layout, num_shards=cfg.mesh.sequence,
                               attention_window=cfg.attention.window,
                               cross_document_attention=d.cross_document_attention, workers=d.workers,
                               passkey_fraction=d.passkey_fraction, passkey_synthetic=d.passkey_synthetic)
    start = saved[-1] if saved else 0
    put = placer(batch_sharding(mesh))
    try:  # until the loop's own cleanup takes over: close the loader on any error
        step_fn, summary = _compile_and_check(cfg, mesh, devices, start)
        eval_batches = _eval_batches(cfg, heldout, put) if heldout is not None else None
        graphdef, specs, optimizer, state = init_state(cfg, mesh, loader.get_state())
        # the fresh arrays are dropped before reading, so memory holds one state at a time
        if init_from is not None:
            abstract, abstract_opt = abstract_like(state.params), abstract_like(state.opt_state)
            state = state._replace(params=None, opt_state=None)
            params = load_init_params(init_from, cfg, abstract, hf_params=hf_params)
            opt_state = (load_init_opt_state(init_from, abstract_opt) if init_optimizer
                         else init_opt_state(cfg, mesh, optimizer, params, specs))
            state = state._replace(params=params, opt_state=opt_state)
        if saved:
            abstract, state = abstract_like(state), None
            state = Checkpointer.read(run_dir / "checkpoints", abstract, start)
            loader.set_state(data_state_dict(state.data_state))
        if distributed.any_process(flag["signal"] is not None):  # stopped during set-up: nothing written
            loader.close()
            return {"step": start, "loss": None, "checkpoint": start or None,
                    "checkpoint_dir": str(run_dir / "checkpoints"), "preempted": True, "set_up_only": True}
        distributed.barrier("lcjax-checks")  # every process has checked its input before the first write
        if distributed.is_primary():  # the first write: everything above only read
            set_aside(run_dir, start)
            _write_run_files(run_dir, cfg, tokenizer, start)
            if lock is not None:
                lock.keep()
    except BaseException:
        loader.close()
        raise
    ckpt = Checkpointer(run_dir / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
    evaluate = None
    if eval_batches is not None:
        eval_loss = make_eval_loss(graphdef, specs, mesh, cfg)
        evaluate = lambda params: _evaluate(eval_loss, params, eval_batches)
    batches = _batches(loader, put)
    writer = MetricsWriter(run_dir, start, sinks(cfg, run_dir)) if distributed.is_primary() else None
    if writer is not None:
        writer.text("config", "\n".join(["```", config_lib.to_yaml(cfg), "```", *summary]))
    profiler = Profiler(run_dir, profile)
    try:
        return _run_steps(cfg, state, step_fn, batches, loader, ckpt, run_dir, progress, flag, writer, evaluate,
                          profiler)
    finally:
        profiler.close()
        if writer is not None:
            writer.close()
        ckpt.close()
        loader.close()


def _compile_and_check(cfg: Config, mesh, devices, start: int):
    """Compile the train step for abstract arrays (the batch shape of step ``start + 1``: data.curriculum's
    stage), print the start-up summary, and raise DoesNotFit when XLA's per-device bytes exceed what the
    devices have (``train.check_memory``). Returns (the step function, compiled; the summary lines)."""
    graphdef, specs, optimizer, abstract = abstract_state(cfg, mesh)
    step_fn = make_train_step(graphdef, specs, mesh, cfg, optimizer)
    sharding = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
             for k, v in _zeros_batch(cfg, start + 1).items()}
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


def set_aside(run_dir: Path, start: int) -> list[int]:
    """Move the checkpoints after step ``start`` (a ``--resume --step`` to an older one) and a copy of
    metrics.jsonl into ``run_dir/set-aside/after-<start>[-N]/``, so the continued run never mixes with
    them and nothing is lost; say so on stderr. Returns the steps moved."""
    import shutil
    import sys

    later = [s for s in check_directory(run_dir / "checkpoints") if s > start]
    if not later:
        return []
    dest = rundir.new_name(run_dir / "set-aside" / f"after-{start}")
    (dest / "checkpoints").mkdir(parents=True)
    for s in later:
        os.replace(run_dir / "checkpoints" / str(s), dest / "checkpoints" / str(s))
    if (run_dir / "metrics.jsonl").is_file():
        shutil.copy2(run_dir / "metrics.jsonl", dest / "metrics.jsonl")
    print(f"lcjax: --resume --step {start}: set aside the later checkpoints {', '.join(map(str, later))} "
          f"and a copy of metrics.jsonl in {dest}", file=sys.stderr, flush=True)
    return later


def _evaluate(eval_loss, params, batches) -> dict:
    """Validation loss (nats per target token) and perplexity over the fixed held-out batches."""
    total = count = 0.0
    for batch in batches:
        s, c = jax.device_get(eval_loss(params, batch))
        total, count = total + float(s), count + float(c)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


def check_inputs(cfg: Config, run_dir: Path, resume: bool, init_from, init_optimizer: bool = False,
                 step: int | None = None) -> list[int]:
    """Check the run dir and what ``--resume`` (``--step``) or ``--init-from`` (and ``--init-optimizer``)
    point at (ValueError, one line); return the steps of the run dir's complete checkpoints up to the one
    to continue (none for a new run). ``--resume`` needs a checkpoint: a run dir without one is refused."""
    check_run_dir(run_dir, resume)
    if resume and init_from is not None:
        raise ValueError("--resume and --init-from exclude each other")
    if init_from is not None:
        check_init_from(Path(init_from), cfg)
    check_init_optimizer(init_from, init_optimizer)
    if step is not None and not resume:
        raise ValueError("--step needs --resume (the checkpoint of --run-dir to continue)")
    if not resume:
        return []
    saved = check_directory(run_dir / "checkpoints")
    if not saved:
        raise ValueError(f"--resume: run dir {run_dir} holds no checkpoint to continue (its run stopped before "
                         f"the first save); start afresh with --config {run_dir / 'config.yaml'} and a new --run-dir")
    if step is not None:
        if step not in saved:
            raise ValueError(f"--step {step}: run dir {run_dir} has no checkpoint at that step "
                             f"(saved: {', '.join(map(str, saved))})")
        saved = [s for s in saved if s <= step]
    check_resume_compatible(config_lib.load(run_dir / "config.yaml"), cfg)
    if saved and cfg.train.steps <= saved[-1]:
        raise ValueError(f"train.steps {cfg.train.steps} must be greater than the newest checkpoint's step "
                         f"{saved[-1]} to --resume")
    return saved


def _write_run_files(run_dir: Path, cfg: Config, tokenizer, start: int) -> None:
    """Create the run dir (or continue it from step ``start``): config.yaml, tokenizer/, metrics.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_metrics_up_to(run_dir / "metrics.jsonl", start)
    write_atomic(run_dir / "config.yaml", config_lib.to_yaml(cfg))
    if not (run_dir / "tokenizer" / "tokenizer.json").is_file():  # a resumed run keeps its own
        tokenizer.save(run_dir / "tokenizer")


def _run_steps(cfg: Config, state, step_fn, batches, loader, ckpt: Checkpointer, run_dir: Path,
               progress: bool, flag: dict, writer: MetricsWriter | None, evaluate, profiler: Profiler) -> dict:
    """The step loop: log, evaluate, checkpoint, count non-finite steps, stop on SIGTERM/SIGINT (see
    :func:`train`)."""
    start, primary = int(state.step), distributed.is_primary()
    shape = _zeros_batch(cfg, start + 1)["tokens"].shape  # what the step is compiled for
    last = {"step": start, "loss": None, "checkpoint": ckpt.latest_step(),
            "checkpoint_dir": str(run_dir / "checkpoints"), "preempted": False}
    reporter = StepReporter(cfg.train.steps, start, cfg.log.every, bar=use_bar(progress), enabled=primary)
    meter = StepMeter(cfg, jax.local_devices())
    bad, every = 0, cfg.eval.every
    with contextlib.closing(reporter):
        while last["step"] < cfg.train.steps:
            if distributed.any_process(flag["signal"] is not None):
                last["preempted"] = True
                break
            batch = next(batches)
            if batch["tokens"].shape != shape:  # data.curriculum: a new stage, compile for its shape
                shape = batch["tokens"].shape
                step_fn.compile(state, batch)
            profiler.before(last["step"] + 1)
            state, record, raw = _one_step(step_fn, state, batch, loader, shape[0] * shape[1])
            record.update(meter.measure(record["tokens_per_sec"], shape[1]))
            profiler.after(last["step"] + 1, state.params)
            done = record["step"]
            if evaluate is not None and not record["skipped"] and (done % every == 0 or done == cfg.train.steps):
                record.update(evaluate(state.params))
            if writer is not None:
                writer.write(record)
            bad = bad + 1 if record["skipped"] else 0
            if bad >= cfg.train.max_bad_steps:
                raise NonFiniteError(
                    f"train.max_bad_steps {cfg.train.max_bad_steps}: {bad} steps in a row after step "
                    f"{record['step']} had a non-finite loss or gradient norm (loss {float(raw['loss'])}, "
                    f"grad_norm {float(raw['grad_norm'])}); stopped without saving, newest checkpoint: "
                    f"{_describe(ckpt)}")
            if not record["skipped"]:
                if ckpt.maybe_save(record["step"], state, force=record["step"] == cfg.train.steps):
                    last["checkpoint"] = record["step"]
                last.update(step=record["step"], loss=record["loss"])
            reporter.report(record, bad)
        if last["preempted"] and last["step"] > start and ckpt.maybe_save(last["step"], state, force=True):
            last["checkpoint"] = last["step"]
    return last


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
