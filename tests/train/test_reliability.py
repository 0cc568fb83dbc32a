"""Reliability (issue 6): exact resume after SIGKILL, preemption by SIGTERM/SIGINT, restore on another mesh,
--init-from (and --init-optimizer), the non-finite guard, bad input of every kind, and a real two-process run
on loopback."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.conftest import relative_error
from lcjax import cli
from lcjax import config as config_lib
from lcjax import distributed
from lcjax.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
        "model.vocab_size=257", "data.tokenizer=bytes", "data.seq_len=64", "data.global_batch=2",
        "attention.block_q=16", "attention.block_k=16", "train.warmup_steps=2",
        "train.min_lr_ratio=1.0"]  # constant lr after warmup: updates do not depend on train.steps; mesh (1, 4, 2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small `files:` corpus (this package's top-level modules) and a cache dir, shared by the module."""
    tmp = tmp_path_factory.mktemp("corpus")
    (tmp / "text").mkdir()
    for path in sorted((ROOT / "lcjax").glob("*.py")):
        shutil.copy(path, tmp / "text" / path.name)
    return [f"data.source=files:{tmp / 'text'}", f"data.cache_dir={tmp / 'cache'}"]


def _cfg(corpus, *extra):
    return config_lib.load(ROOT / "configs/demo.yaml", [*TINY, *corpus, *extra])


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return [r["loss"] for r in _records(run_dir)]


def _snapshot(path: Path) -> dict:
    """Every file under ``path`` with its size and modification time (to check nothing was touched)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))} if path.exists() else {}


def _cli_args(corpus, run_dir, *sets):
    return ["train", "--config", str(ROOT / "configs/demo.yaml"), "--run-dir", str(run_dir), "--no-progress",
            *[a for s in [*TINY, *corpus, *sets] for a in ("--set", s)]]


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """12 uninterrupted steps on (1, 4, 2), a checkpoint every 2 steps (the reference for the other tests)."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    train(_cfg(corpus, "train.steps=12", "checkpoint.every=2", "checkpoint.keep=6"), run_dir, progress=False)
    return run_dir


# 1 + 2: SIGKILL at a random step, SIGTERM and SIGINT: --resume reproduces the uninterrupted run bitwise

def _wait_for_steps(proc, metrics: Path, count: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before step {count}: {proc.poll()}")


def test_killed_run_resumes_bitwise(corpus, base_run, tmp_path):
    rng = random.Random()
    run_dir = tmp_path / "run"
    sets = ["train.steps=12", "checkpoint.every=1", "checkpoint.keep=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(*extra):
        args = _cli_args(corpus, run_dir, *sets) + list(extra)
        return subprocess.Popen([sys.executable, "-m", "lcjax.cli", *args], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # SIGKILL at a random step, possibly in the middle of an asynchronous save
    proc = start()
    _wait_for_steps(proc, run_dir / "metrics.jsonl", rng.randint(1, 6))  # 6 steps before the end
    ckpts = run_dir / "checkpoints"
    deadline = time.monotonic() + 60  # a committed checkpoint to resume from (a kill before the first one
    while time.monotonic() < deadline and not (ckpts.is_dir() and any(  # is refused, test_safety)
            p.name.isdigit() for p in ckpts.iterdir())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    print(f"SIGKILL: {len(_records(run_dir))} steps logged, checkpoints "
          f"{sorted(p.name for p in (run_dir / 'checkpoints').iterdir())}")

    proc = start("--resume")  # runs to the end
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert [r["step"] for r in _records(run_dir)] == list(range(1, 13))
    assert _losses(run_dir) == _losses(base_run)  # bitwise on CPU, float32, data order included
    assert not [p for p in (run_dir / "checkpoints").iterdir() if "tmp" in p.name]


def test_metrics_of_redone_steps_and_cut_lines_are_dropped(tmp_path):
    from lcjax.train.run_files import keep_metrics_up_to

    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1}, {"step": 2}, {"step": 2, "skipped": True}, {"step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    keep_metrics_up_to(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_sigterm_finishes_the_step_saves_and_exits_0(corpus, tmp_path, capsys):
    """In-process CLI: SIGTERM while training (SIGINT has the same handler)."""
    run_dir, handlers = tmp_path / "run", []

    def preempt():
        while not (run_dir / "metrics.jsonl").is_file() or len(_records(run_dir)) < 2:
            time.sleep(0.02)
        handlers.extend([signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)])
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=preempt, daemon=True).start()
    assert cli.main(_cli_args(corpus, run_dir, "train.steps=1000", "checkpoint.every=1000")) == 0
    step = len(_records(run_dir))
    assert f"lcjax: preempted at step {step}, saved checkpoint to {run_dir / 'checkpoints' / str(step)}\n" in \
        capsys.readouterr().out
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [step] and step < 1000
    assert handlers[0] is handlers[1] and callable(handlers[0])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers were put back


# 3: restore on another mesh; --init-from with a new seq_len

@pytest.mark.parametrize("mesh", [(1, 8, 1), pytest.param((2, 2, 2), marks=pytest.mark.slow), (1, 1, 1)])
def test_checkpoint_continues_on_another_mesh(corpus, base_run, tmp_path, mesh):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    for step in (6, 8, 10, 12):
        shutil.rmtree(run_dir / "checkpoints" / str(step))
    leftover = run_dir / "checkpoints" / "6.orbax-checkpoint-tmp-1234"  # a save killed half-way
    leftover.mkdir()
    (leftover / "junk").write_text("half")
    keys = ("mesh.data", "mesh.sequence", "mesh.model")
    cfg = _cfg(corpus, "train.steps=5", "checkpoint.every=2", "checkpoint.keep=4",
               *[f"{k}={v}" for k, v in zip(keys, mesh)])
    train(cfg, run_dir, resume=True, progress=False, devices=jax.devices()[:int(np.prod(mesh))])
    assert relative_error(_losses(run_dir)[4], _losses(base_run)[4]) <= 1e-4
    assert [r["step"] for r in _records(run_dir)] == [1, 2, 3, 4, 5] and not leftover.exists()


def test_init_from_with_a_new_seq_len_and_mesh(corpus, base_run, tmp_path):
    losses = []
    for mesh, n in (("mesh.sequence=4", 8), ("mesh.sequence=1", 1)):
        run_dir = tmp_path / f"run{n}"
        cfg = _cfg(corpus, "train.steps=1", "data.seq_len=128", mesh, f"mesh.model={min(n, 2)}")
        train(cfg, run_dir, init_from=base_run, progress=False, devices=jax.devices()[:n])
        assert [r["step"] for r in _records(run_dir)] == [1]
        losses.append(_losses(run_dir)[0])
    assert relative_error(losses[1], losses[0]) <= 1e-4
    assert losses[1] < _losses(base_run)[0] - 0.05  # the trained weights were used (a fresh model: ~ln 257)


ZERO1 = ("mesh.data=2", "mesh.sequence=2", "mesh.model=2", "train.shard_optimizer=true")  # another mesh and layout


def _opt_state(run_dir, cfg, step=None):
    """(the optimizer state of ``run_dir``'s checkpoint at ``step`` placed for ``cfg``'s mesh, its target)."""
    from lcjax.checkpoint import restore_opt_state
    from lcjax.sharding.mesh import make_mesh
    from lcjax.train.state import abstract_state

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model)
    target = abstract_state(cfg, mesh)[3].opt_state
    return restore_opt_state(run_dir / "checkpoints", target, step), target


def _adam(opt_state):
    """(ScaleByAdamState, ScaleByScheduleState) of lcjax's optimizer: chain(clip, adamw(...))."""
    return opt_state[1][0], opt_state[1][-1]


@pytest.mark.slow  # test_checkpoint_continues_on_another_mesh restores on other meshes in the default suite
def test_init_optimizer_restores_the_moments_on_another_mesh(corpus, base_run, tmp_path):
    """--init-optimizer: the source's AdamW moments and count, resharded onto (2, 2, 2) with ZeRO-1, bitwise;
    the schedule restarts with the new run. Through a whole run: after one update the moments are those of
    a fresh optimizer plus b1 (b2) times the source's, and its checkpoint's Adam count is the source's + 1."""
    from lcjax.train.init_from import load_init_opt_state

    cfg = _cfg(corpus, "train.steps=1", "checkpoint.every=1", *ZERO1)
    source, target = _opt_state(base_run, cfg)
    restored = load_init_opt_state(base_run, target)
    assert any("data" in str(x.sharding.spec) for x in jax.tree.leaves(target))  # not the source's layout
    adam, sched = _adam(restored)
    assert int(adam.count) == 12 and int(sched.count) == 0 and int(_adam(source)[1].count) == 12
    for got, want, where in zip(jax.tree.leaves(restored), jax.tree.leaves(source), jax.tree.leaves(target)):
        assert got.sharding == where.sharding
        if got.ndim:  # the moments (the scalars are the counts above)
            assert np.abs(np.asarray(want)).max() > 0  # trained moments, not fresh zeros
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    runs = {}
    for name, carry in (("carried", True), ("fresh", False)):
        train(cfg, tmp_path / name, init_from=base_run, init_optimizer=carry, progress=False)
        assert [r["step"] for r in _records(tmp_path / name)] == [1]  # a new run: step 1, fresh data
        runs[name] = _adam(_opt_state(tmp_path / name, cfg, 1)[0])
    assert _losses(tmp_path / "carried") == _losses(tmp_path / "fresh")  # the same weights
    (carried, carried_sched), (fresh, fresh_sched) = runs["carried"], runs["fresh"]
    assert (int(carried.count), int(fresh.count), int(carried_sched.count), int(fresh_sched.count)) == (13, 1, 1, 1)
    src = _adam(source)[0]
    for moments, beta in (("mu", cfg.train.b1), ("nu", cfg.train.b2)):
        for c, f, s in zip(*(jax.tree.leaves(getattr(a, moments)) for a in (carried, fresh, src))):
            c, f, s = (np.asarray(x, np.float64) for x in (c, f, s))
            np.testing.assert_allclose(c - f, beta * s, rtol=1e-5, atol=1e-6 * np.abs(c).max())
    b1, b2 = cfg.train.b1, cfg.train.b2
    for mu, nu in zip(jax.tree.leaves(fresh.mu), jax.tree.leaves(fresh.nu)):  # one update from zeros
        g = np.asarray(mu, np.float64) / (1 - b1)  # mu = (1-b1) g, nu = (1-b2) g²
        np.testing.assert_allclose(np.asarray(nu, np.float64), (1 - b2) * g**2, rtol=1e-4,
                                   atol=1e-6 * np.abs(nu).max())


def test_restore_opt_state_refuses_other_shapes(corpus, base_run):
    """Orbax's partial restore would keep the saved shape where the target's differs: refused instead."""
    from lcjax.checkpoint import restore_opt_state

    _, target = _opt_state(base_run, _cfg(corpus))
    leaves, tree = jax.tree.flatten(target)
    i = next(i for i, x in enumerate(leaves) if x.ndim)
    leaves[i] = jax.ShapeDtypeStruct((leaves[i].shape[0] + 1, *leaves[i].shape[1:]), leaves[i].dtype)
    with pytest.raises(ValueError, match=r"cannot be restored into this optimizer state: .* there, .* here"):
        restore_opt_state(base_run / "checkpoints", jax.tree.unflatten(tree, leaves))


# 4: non-finite guard

def test_non_finite_steps_are_skipped_then_the_run_stops(corpus, tmp_path, capsys):
    """lr 1e30: the first update is finite but makes every later loss NaN; those steps are not applied
    (without the guard the run would go on to step 20 on NaN parameters)."""
    run_dir = tmp_path / "run"
    args = _cli_args(corpus, run_dir, "train.steps=20", "train.lr=1e30", "train.warmup_steps=0",
                     "train.max_bad_steps=3", "checkpoint.every=1", "checkpoint.keep=5")
    assert cli.main(args) == cli.EXIT_NON_FINITE == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lcjax: stopped: train.max_bad_steps 3: 3 steps in a row after "
                                               "step 1 had a non-finite loss or gradient norm (loss nan"), err
    records = _records(run_dir)
    assert [(r["step"], r["skipped"]) for r in records] == [(1, False), (1, True), (1, True), (1, True)]
    assert records[0]["loss"] is not None and None in (records[-1]["loss"], records[-1]["grad_norm"])
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [1]


def test_guard_keeps_the_state_of_a_non_finite_step(corpus):
    """The jitted step alone: NaN in one parameter leaves params, optimizer state and step as they were."""
    from lcjax.sharding.mesh import make_mesh
    from lcjax.train.state import init_state
    from lcjax.train.step import batch_sharding, make_train_step

    cfg = _cfg(corpus, "mesh.sequence=1", "mesh.model=1")
    mesh = make_mesh(1, 1, 1)
    graphdef, specs, optimizer, state = init_state(cfg, mesh, {})
    leaves, tree = jax.tree.flatten(state.params)
    leaves[0] = jax.numpy.full_like(leaves[0], np.nan)
    state = state._replace(params=jax.tree.unflatten(tree, leaves))
    before = jax.device_get((state.params, state.opt_state))
    batch = {k: jax.device_put(np.ones((2, 64), np.int32), batch_sharding(mesh))
             for k in ("tokens", "labels", "positions", "segment_ids", "loss_mask")}
    new, metrics = make_train_step(graphdef, specs, mesh, cfg, optimizer)(state, batch)
    assert float(metrics["skipped"]) == 1.0 and int(new.step) == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get((new.params, new.opt_state)),
                 before)


# 5: multi-process

def test_resolve_distributed_settings():
    assert distributed.resolve(environ={}) is None
    s = distributed.resolve("10.0.0.1:1234", 4, 3, environ={})
    assert (s.coordinator, s.num_processes, s.process_id) == ("10.0.0.1:1234", 4, 3)
    env = {"JAX_COORDINATOR_ADDRESS": "h:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.resolve(environ=env).process_id == 1
    assert distributed.resolve(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}).cluster == "slurm"
    assert distributed.resolve(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert distributed.resolve("h:1", 1, 0, environ={}) is None
    for args, message in ((("h", 2, 0), "must have the form HOST:PORT"), (("h:1", 2, 2), "--process-id 2 must be"),
                          (("h:1", None, 0), "--num-processes is needed too"), (("h:1", 0, 0), "must be >= 1")):
        with pytest.raises(ValueError, match=message):
            distributed.resolve(*args, environ={})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES 'x' must be an integer"):
        distributed.resolve(environ={**env, "JAX_NUM_PROCESSES": "x"})
    assert distributed.local_device_count(8, s) == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(corpus, tmp_path):
    """2 processes x 4 CPU devices (gloo over loopback) resume a 1-process x 8-device run on mesh (2, 2, 2)
    (each process holds its own rows of every batch) and give its losses; they save step 4 together."""
    mesh = ["mesh.data=2", "mesh.sequence=2", "mesh.model=2", "train.steps=4", "checkpoint.every=2"]
    single, run_dir, port = tmp_path / "single", tmp_path / "run", _free_port()
    train(_cfg(corpus, *mesh), single, progress=False)
    shutil.copytree(single, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "4")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, "-m", "lcjax.cli", *_cli_args(corpus, run_dir, *mesh), "--resume",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                               "--init-timeout", "60"], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "(8 cpu devices)" in outs[0][0] and "2 process(es), steps 3..4" in outs[1][0]
    assert [r["step"] for r in _records(run_dir)] == [1, 2, 3, 4]
    np.testing.assert_allclose(_losses(run_dir), _losses(single), rtol=1e-5)
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


# 6: bad input: one line, exit 2, nothing written

def _bad(corpus, tmp_path, capsys, args, message, run_dir):
    before = _snapshot(run_dir)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lcjax: error:") and message in err[0], err
    assert _snapshot(run_dir) == before
    return err[0]


@pytest.mark.parametrize("sets,message", [
    (["mesh.sequence=2"], "= 4 must equal the number of devices, 8 cpu"),
    (["data.source=files:/nonexistent/corpus"], "path /nonexistent/corpus does not exist"),
    (["model.n_kv_heads=3"], "must be divisible by model.n_kv_heads = 3"),
    (["data.global_batch=-1"], "data.global_batch -1 must be >= 1"),
    (["train.max_bad_steps=0"], "train.max_bad_steps 0 must be >= 1"),
])
def test_bad_config_or_corpus(corpus, tmp_path, capsys, sets, message):
    run_dir = tmp_path / "run"
    _bad(corpus, tmp_path, capsys, _cli_args(corpus, run_dir, *sets), message, run_dir)
    assert not run_dir.exists()


@pytest.mark.parametrize("content", ["", None])
def test_empty_corpus(corpus, tmp_path, capsys, content):
    (tmp_path / "empty").mkdir()
    if content is not None:
        (tmp_path / "empty" / "a.txt").write_text(content)
    run_dir = tmp_path / "run"
    _bad(corpus, tmp_path, capsys, _cli_args(corpus, run_dir, f"data.source=files:{tmp_path / 'empty'}"),
         "data.", run_dir)
    assert not run_dir.exists()


def _broken_checkpoints(base_run, tmp_path, how):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    ckpts = run_dir / "checkpoints"
    if how == "file":
        shutil.rmtree(ckpts)
        ckpts.write_text("not a folder")
    elif how == "garbage":
        shutil.rmtree(ckpts)
        (ckpts / "10").mkdir(parents=True)
        (ckpts / "10" / "junk.bin").write_bytes(os.urandom(64))
    elif how == "empty-step":  # the newest step's folder, emptied
        newest = ckpts / str(max(int(p.name) for p in ckpts.iterdir()))
        shutil.rmtree(newest)
        newest.mkdir()
    elif how == "other-shape":
        other = tmp_path / "other"
        train(_cfg(_corpus_sets(base_run), "train.steps=1", "model.d_model=64", "mesh.sequence=1", "mesh.model=1"),
              other, progress=False, devices=jax.devices()[:1])
        shutil.rmtree(ckpts)
        shutil.copytree(other / "checkpoints", ckpts)
    return run_dir


def _corpus_sets(run_dir):
    cfg = config_lib.load(run_dir / "config.yaml")
    return [f"data.source={cfg.data.source}", f"data.cache_dir={cfg.data.cache_dir}"]


@pytest.mark.parametrize("how,message", [("file", "is not a folder of checkpoints"),
                                         ("garbage", "(step 10) is damaged: _CHECKPOINT_METADATA: missing"),
                                         ("empty-step", "(step 12) is damaged: _CHECKPOINT_METADATA: missing (written "
                                                        "when a save completes); intact: 2, 4, 6, 8, 10 (pick one "
                                                        "with --step 10)"),
                                         pytest.param("other-shape", "cannot be restored into this model: "
                                                      "params.embed.value", marks=pytest.mark.slow)])
def test_resume_from_broken_or_foreign_checkpoints(base_run, tmp_path, capsys, how, message):
    run_dir = _broken_checkpoints(base_run, tmp_path, how)
    args = ["train", "--run-dir", str(run_dir), "--resume", "--no-progress", "--set", "train.steps=20"]
    _bad([], tmp_path, capsys, args, message, run_dir)


def _foreign_run(base_run, tmp_path):
    """A run dir whose checkpoints/ holds a valid Orbax checkpoint of something else."""
    import orbax.checkpoint as ocp

    src = tmp_path / "foreign"
    src.mkdir()
    shutil.copy(base_run / "config.yaml", src / "config.yaml")
    manager = ocp.CheckpointManager(src / "checkpoints", options=ocp.CheckpointManagerOptions(create=True))
    manager.save(3, args=ocp.args.StandardSave({"x": np.ones(3, np.float32)}))
    manager.wait_until_finished()
    manager.close()
    return src


@pytest.mark.parametrize("source,message", [("missing", "no such folder"), ("file", "not a folder"),
                                            ("plain", "neither a run dir"), ("shape", "model.d_model: --init-from"),
                                            ("foreign", "holds no model parameters")])
def test_init_from_refuses_what_it_cannot_use(corpus, base_run, tmp_path, capsys, source, message):
    (tmp_path / "afile").write_text("")
    src = {"missing": tmp_path / "nope", "file": tmp_path / "afile", "plain": tmp_path, "shape": base_run,
           "foreign": _foreign_run(base_run, tmp_path) if source == "foreign" else None}[source]
    run_dir = tmp_path / "new"
    extra = ["model.d_model=64"] if source == "shape" else []
    _bad(corpus, tmp_path, capsys, [*_cli_args(corpus, run_dir, *extra), "--init-from", str(src)], message, run_dir)
    assert not run_dir.exists()


def _copy_with_checkpoint(source, dst, state_of):
    """A run dir ``dst``: ``source``'s config and tokenizer and one checkpoint (step 12) holding
    ``state_of(params)``, ``params`` being ``source``'s newest (numpy)."""
    import orbax.checkpoint as ocp

    from lcjax.checkpoint import restore_params
    from lcjax.train.state import abstract_params

    shutil.copytree(source / "tokenizer", dst / "tokenizer")
    shutil.copy(source / "config.yaml", dst / "config.yaml")
    params = restore_params(source / "checkpoints", abstract_params(config_lib.load(source / "config.yaml"))[1])
    manager = ocp.CheckpointManager(dst / "checkpoints", options=ocp.CheckpointManagerOptions(create=True))
    manager.save(12, args=ocp.args.StandardSave(state_of(params)))
    manager.wait_until_finished()
    manager.close()
    return dst


def _init_optimizer_source(kind, base_run, tmp_path):
    if kind == "hf":  # only the folder's shape matters: refused before anything is read
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "config.json").write_text("{}")
        (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
        return tmp_path / "hf"
    if kind == "params_only":  # like an import: parameters alone
        return _copy_with_checkpoint(base_run, tmp_path / kind, lambda params: {"params": params})
    if kind == "other":  # another optimizer: Lion's state (no nu)
        import optax

        lion = optax.chain(optax.clip_by_global_norm(1.0), optax.lion(1e-3))
        return _copy_with_checkpoint(base_run, tmp_path / kind, lambda params: {
            "params": params, "opt_state": lion.init(params), "step": np.int32(12)})
    return None


@pytest.mark.parametrize("source,message", [
    ("none", "--init-optimizer needs --init-from"),
    ("hf", "is a Hugging Face folder, which holds no optimizer state"),
    ("params_only", "holds no optimizer state (model parameters alone)"),
    ("other", "another optimizer structure"),
])
def test_init_optimizer_refuses_what_it_cannot_use(corpus, base_run, tmp_path, capsys, source, message):
    src = _init_optimizer_source(source, base_run, tmp_path)
    run_dir, before = tmp_path / "new", _snapshot(base_run)
    args = [*_cli_args(corpus, run_dir, *ZERO1), "--init-optimizer", *(["--init-from", str(src)] if src else [])]
    assert _bad(corpus, tmp_path, capsys, args, message, run_dir).startswith("lcjax: error: --init-optimizer")
    assert not run_dir.exists() and _snapshot(base_run) == before
