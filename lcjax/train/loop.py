"""The training loop: everything with I/O (data, run directory, metrics, progress bar, checkpoints).

Run directory layout (DESIGN.md, "Public contracts"): ``config.yaml`` (resolved), ``tokenizer/``,
``checkpoints/``, ``metrics.jsonl`` (one JSON object per optimizer step, appended across resumes).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from lcjax import config as config_lib
from lcjax.checkpoint import Checkpointer, abstract_like, saved_steps
from lcjax.config import Config
from lcjax.data import build_dataset
from lcjax.data.curriculum import curriculum_loader, stage_index
from lcjax.model.llama import count_params
from lcjax.sharding.mesh import make_mesh
from lcjax.train.state import data_state_arrays, data_state_dict, init_state
from lcjax.train.step import BATCH_FIELDS, batch_sharding, make_train_step


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Raise ValueError unless ``run_dir`` is new and creatable (fresh run) or holds a run (``--resume``)."""
    if resume and not (run_dir / "config.yaml").is_file():
        raise ValueError(f"--resume: run dir {run_dir} holds no run (no config.yaml)")
    if not resume and run_dir.exists():
        raise ValueError(f"--run-dir {run_dir} already exists; pass --resume to continue it")
    ancestor = run_dir.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--run-dir {run_dir}: {ancestor} is not a directory")


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
    """Drop metrics.jsonl records after ``step`` (steps a resumed run is about to redo)."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


def metrics_record(step: int, metrics: dict, step_time: float, tokens: int) -> dict:
    """One metrics.jsonl line; non-finite values become null."""
    def clean(x):
        x = float(x)
        return x if math.isfinite(x) else None
    return {"step": step, "loss": clean(metrics["loss"]), "grad_norm": clean(metrics["grad_norm"]),
            "lr": clean(metrics["lr"]), "tokens_per_sec": clean(tokens / step_time),
            "step_time_s": clean(step_time)}


def _zeros_batch(cfg: Config, step: int) -> dict:
    """A batch of the shape of 1-based ``step``'s batches (for compiling ahead of it; data.curriculum)."""
    stages = config_lib.stages(cfg)
    _, seq_len, batch = stages[stage_index(stages, step)]
    return {k: np.zeros((batch, seq_len), np.int32) for k in BATCH_FIELDS}


def _device_batch(batch: dict, sharding) -> dict:
    return {k: jax.device_put(np.asarray(v, np.int32), sharding) for k, v in batch.items()}


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` into ``run_dir``. Returns {"step", "loss", "checkpoint"} of the last step.

    Raises ValueError (one line naming the field and the rule) for unusable input before anything is
    written: an existing run dir without ``resume``, a tokenizer larger than model.vocab_size, too few
    devices for the mesh, a corpus too small for one batch.
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume)
    saved = saved_steps(run_dir / "checkpoints") if resume else []
    if resume:
        check_resume_compatible(config_lib.load(run_dir / "config.yaml"), cfg)
        if saved and cfg.train.steps <= saved[-1]:
            raise ValueError(f"train.steps {cfg.train.steps} must be greater than the newest checkpoint's step "
                             f"{saved[-1]} to --resume")
    d, m = cfg.data, cfg.model
    print(f"lcjax: data {d.source}: loading (tokenized on first use, then cached)", flush=True)
    try:
        dataset = build_dataset(d.source, tokenizer_kind=d.tokenizer, vocab_size=m.vocab_size,
                                cache_dir=d.cache_dir, data_dir=d.data_dir)
    except OSError as e:
        raise ValueError(f"data.cache_dir {d.cache_dir or '~/.cache/lcjax'}: {e.strerror or e}") from None
    tokenizer = dataset.tokenizer
    print("\n".join(f"lcjax: {line}" for line in dataset.summary(d.seq_len)), flush=True)
    if tokenizer.vocab_size > m.vocab_size:
        raise ValueError(f"model.vocab_size {m.vocab_size} must be >= the tokenizer's {tokenizer.vocab_size}")
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model)
    loader = curriculum_loader(dataset.loader, config_lib.stages(cfg), seed=d.seed,
                               layout=cfg.attention.layout, num_shards=cfg.mesh.sequence,
                               cross_document_attention=d.cross_document_attention, workers=d.workers,
                               passkey_fraction=d.passkey_fraction, passkey_synthetic=d.passkey_synthetic)
    graphdef, specs, optimizer, state = init_state(cfg, mesh, loader.get_state())
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run_dir / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
    if saved:
        state = ckpt.restore(abstract_like(state))
        loader.set_state(data_state_dict(state.data_state))
    start = int(state.step)
    keep_metrics_up_to(run_dir / "metrics.jsonl", start)
    (run_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))
    tokenizer.save(run_dir / "tokenizer")

    step_fn = make_train_step(graphdef, specs, mesh, cfg, optimizer)
    sharding = batch_sharding(mesh)
    compiled = _zeros_batch(cfg, start + 1)["tokens"].shape  # the shape the step is compiled for
    step_fn.compile(state, _device_batch(_zeros_batch(cfg, start + 1), sharding))
    tokens_per_step = int(np.prod(compiled))
    print(f"lcjax: mesh data={cfg.mesh.data} sequence={cfg.mesh.sequence} model={cfg.mesh.model} "
          f"({mesh.devices.size} {jax.devices()[0].platform} devices), {count_params(m):,} parameters, "
          f"{tokens_per_step:,} tokens/step, steps {start + 1}..{cfg.train.steps}", flush=True)
    last = {"step": start, "loss": None, "checkpoint": ckpt.latest_step()}
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    with open(run_dir / "metrics.jsonl", "a") as log:
        for step in range(start + 1, cfg.train.steps + 1):
            batch = _device_batch(next(loader), sharding)
            if batch["tokens"].shape != compiled:  # data.curriculum: a new stage, recompile for its shape
                compiled = batch["tokens"].shape
                step_fn.compile(state, batch)
            tokens_per_step = int(np.prod(compiled))
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            metrics = jax.device_get(metrics)
            record = metrics_record(step, metrics, time.perf_counter() - t0, tokens_per_step)
            log.write(json.dumps(record) + "\n")
            log.flush()
            state = state._replace(data_state=data_state_arrays(loader.get_state()))
            if ckpt.maybe_save(step, state, force=step == cfg.train.steps):
                last["checkpoint"] = step
            bar.set_postfix(loss=f"{record['loss']:.4f}" if record["loss"] is not None else "nan",
                            tok_s=f"{record['tokens_per_sec']:.0f}")
            bar.update(1)
            last.update(step=step, loss=record["loss"])
    bar.close()
    ckpt.close()
    loader.close()
    return last
