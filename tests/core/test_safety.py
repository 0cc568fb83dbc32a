"""Run safety (issue 22): one writer per run dir (lcjax.rundir), memory refused before anything is allocated or
written (lcjax.memcheck), results never overwritten, damaged checkpoints named with the intact ones
(lcjax.checkpoint.verify, ``lcjax checkpoints``, ``--resume --step N``), and the small faults: --resume without
a run or a checkpoint, unwritable run dirs, SIGTERM during set-up, YAML errors with line and column."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lcjax import checkpoint, cli, memcheck, rundir
from lcjax import config as config_lib

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
        "model.vocab_size=257", "data.tokenizer=bytes", "data.seq_len=64", "data.global_batch=2",
        "attention.block_q=16", "attention.block_k=16"]


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lcjax: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


# --- the lock -----------------------------------------------------------------------------------------------

def test_second_writer_is_refused_naming_the_holder(tmp_path):
    with rundir.locked(tmp_path / "run", command="lcjax train", create=True) as lock:
        assert rundir.read_holder(lock.path).pid == os.getpid()
        with pytest.raises(rundir.RunDirBusy, match=rf"in use by pid {os.getpid()} on host {socket.gethostname()} "
                                                    r"\(lcjax train, since 20\d\d-"):
            rundir.acquire(tmp_path / "run", command="lcjax eval passkey")
    assert not (tmp_path / "run").exists()  # created by the lock, never kept: removed with it


def test_kept_run_dir_stays_and_an_existing_one_is_left_as_found(tmp_path):
    with rundir.locked(tmp_path / "a" / "run", command="t", create=True) as lock:
        (tmp_path / "a" / "run" / "config.yaml").write_text("x")
        lock.keep()
    assert sorted(os.listdir(tmp_path / "a" / "run")) == ["config.yaml"]  # the lock file is gone
    (tmp_path / "b").mkdir()
    with pytest.raises(RuntimeError):
        with rundir.locked(tmp_path / "b", command="t", create=True):
            raise RuntimeError
    assert (tmp_path / "b").is_dir() and not os.listdir(tmp_path / "b")


def test_kill_9_frees_the_lock_and_the_stale_holder_is_announced(tmp_path):
    """A holder killed with SIGKILL leaves its lock file; the next writer takes it over and says so."""
    run = tmp_path / "run"
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from lcjax import rundir; "
            f"rundir.acquire({str(run)!r}, command='holder', create=True); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(rundir.RunDirBusy, match=f"pid {proc.pid} on host"):
            rundir.acquire(run, command="second")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = []
    lock = rundir.acquire(run, command="third", log=lines.append)
    assert len(lines) == 1 and f"taking over the stale lock of pid {proc.pid}" in lines[0] and "no longer running" in lines[0]
    assert rundir.read_holder(lock.path).command == "third"
    lock.release()


def test_a_lock_file_of_another_host_is_not_taken_over(tmp_path):
    (tmp_path / rundir.LOCK_NAME).write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "started": "2020-01-01T00:00:00Z", "command": "lcjax train"}))
    with pytest.raises(rundir.RunDirBusy, match="pid 1 on host elsewhere .* another host, which may still run; "
                                                "if it does not, delete"):
        rundir.acquire(tmp_path, command="t")
    assert (tmp_path / rundir.LOCK_NAME).is_file()


def test_outputs_are_never_replaced_unless_asked(tmp_path):
    from lcjax.eval.passkey import result_paths

    target = tmp_path / "out.txt"
    rundir.write_new(target, b"one")
    with pytest.raises(ValueError, match="--out .*out.txt already exists \\(pass --overwrite"):
        rundir.check_new_file(target, overwrite=False)
    with pytest.raises(ValueError, match="already exists"):
        rundir.write_new(target, b"two")
    assert target.read_bytes() == b"one" and rundir.check_new_file(target, overwrite=True) == target
    rundir.write_new(target, b"three", overwrite=True)
    assert target.read_bytes() == b"three" and sorted(os.listdir(tmp_path)) == ["out.txt"]
    assert result_paths(tmp_path) == (tmp_path / "passkey.json", tmp_path / "passkey.png")
    (tmp_path / "passkey.png").write_bytes(b"")
    assert result_paths(tmp_path) == (tmp_path / "passkey-2.json", tmp_path / "passkey-2.png")
    with pytest.raises(ValueError, match="passkey.png already exists"):
        result_paths(tmp_path, tmp_path / "passkey.json")


def test_unwritable_places_are_one_line():
    with pytest.raises(ValueError, match="--run-dir /sys/kernel/lcjax-run: cannot write in /sys/kernel"):
        rundir.check_writable(Path("/sys/kernel/lcjax-run"))
    with pytest.raises(ValueError, match="is not a directory"):
        rundir.check_writable(Path(__file__) / "run")


# --- memory -------------------------------------------------------------------------------------------------

def _device(platform="gpu", limit=80e9, used=0):
    stats = {"bytes_limit": int(limit), "bytes_in_use": int(used)}
    return SimpleNamespace(platform=platform, device_kind="NVIDIA H100", memory_stats=lambda: stats)


def test_memory_refusal_names_needed_available_and_the_keys(monkeypatch):
    memcheck.check_fits(70e9, [_device(), _device()], what="the train step", kind="train")  # fits
    with pytest.raises(memcheck.DoesNotFit) as e:
        memcheck.check_fits(int(1369e9), [_device(), _device(used=20e9)], what="the train step", kind="train")
    assert str(e.value).startswith("the train step needs 1369.00 GB per device (XLA, compiled), more than the "
                                   "60.00 GB available per device (NVIDIA H100)")
    for key in ("mesh.sequence", "train.remat=full", "train.loss_tile", "train.fsdp", "train.check_memory=false"):
        assert key in str(e.value)
    memcheck.check_fits(int(1369e9), [_device()], what="x", kind="train", enabled=False)
    monkeypatch.setattr(memcheck, "host_available_bytes", lambda: int(8e9))
    cpus = [SimpleNamespace(platform="cpu", device_kind="cpu")] * 8
    memcheck.check_fits(int(0.9e9), cpus, what="x", kind="eval")
    with pytest.raises(memcheck.DoesNotFit, match="needs 1.10 GB per device .* 1.00 GB available per device "
                                                  r"\(8.0 GB available on the host, shared by 8 cpu devices\)"):
        memcheck.check_fits(int(1.1e9), cpus, what="x", kind="eval")
    with pytest.raises(memcheck.DoesNotFit, match="0.75 GB available per device"):  # the host's own arrays
        memcheck.check_fits(int(0.9e9), cpus, what="x", kind="eval", host_bytes=int(2e9))
    assert memcheck.host_available_bytes is not None and 0 < memcheck.budget(cpus).per_device


# --- checkpoints: verification, the listing, restore ----------------------------------------------------------

@pytest.fixture
def ckpts(tmp_path):
    """checkpoints/{1,2,3} of a small pytree (Orbax through lcjax.checkpoint), and the tree."""
    tree = {"params": {"w": np.arange(4096, dtype=np.float32).reshape(64, 64), "b": np.ones(7, np.float32)}}
    saver = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints", every=1, keep=5)
    for step in (1, 2, 3):
        saver.maybe_save(step, tree)
    saver.close()
    return tmp_path / "run" / "checkpoints", tree


def _damage(step_dir: Path, how: str) -> None:
    if how == "truncated":
        data = max(glob.glob(f"{step_dir}/default/**/d/*", recursive=True), key=os.path.getsize)
        os.truncate(data, os.path.getsize(data) // 2)
    elif how == "metadata":
        (step_dir / "default" / "_METADATA").write_text("{garbage")
    elif how == "item":
        shutil.rmtree(step_dir / "default")
    elif how == "commit":
        (step_dir / "_CHECKPOINT_METADATA").unlink()


@pytest.mark.parametrize("how,problem", [
    ("truncated", "default/: data of params."),
    ("metadata", "default/_METADATA: not valid JSON"),
    ("item", "default/: missing (the saved state)"),
    ("commit", "_CHECKPOINT_METADATA: missing"),
])
def test_damaged_checkpoint_is_named_with_the_intact_ones(ckpts, capsys, how, problem):
    directory, tree = ckpts
    _damage(directory / "3", how)
    rows = checkpoint.survey(directory)
    assert [s for s, p in rows if p is None] == [1, 2] and rows[2][0] == 3 and rows[2][1].startswith(problem)
    abstract = {"params": {k: np.zeros_like(v) for k, v in tree["params"].items()}}
    abstract = __import__("jax").tree.map(lambda x: __import__("jax").ShapeDtypeStruct(x.shape, x.dtype), abstract)
    with pytest.raises(checkpoint.DamagedCheckpoint) as e:
        checkpoint.Checkpointer.read(directory, abstract)
    assert str(e.value).startswith(f"checkpoint {directory / '3'} (step 3) is damaged: {problem}")
    assert str(e.value).endswith("intact: 1, 2 (pick one with --step 2)") and "\n" not in str(e.value)
    restored = checkpoint.Checkpointer.read(directory, abstract, 2)
    np.testing.assert_array_equal(restored["params"]["w"], tree["params"]["w"])
    assert cli.main(["checkpoints", str(directory.parent)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1:3] == ["step        1  intact", "step        2  intact"] and out[3].startswith(
        f"step        3  damaged: {problem}")


def test_checkpoints_listing_of_intact_and_of_nothing(ckpts, tmp_path, capsys):
    directory, _ = ckpts
    assert cli.main(["checkpoints", str(directory), "--quick"]) == 0
    assert capsys.readouterr().out.count("intact") == 3
    assert cli.main(["checkpoints", str(tmp_path / "nope")]) == 2
    _one_error_line(capsys, "DIR", "does not exist")


def test_restore_into_another_shape_is_one_line_without_starting_orbax(ckpts):
    import jax

    directory, _ = ckpts
    abstract = {"params": {"w": jax.ShapeDtypeStruct((3, 64), np.float32)}}
    with pytest.raises(ValueError, match=r"cannot be restored into this model: params.w is \(64, 64\) there, "
                                         r"\(3, 64\) here"):
        checkpoint.restore_params(directory, abstract["params"] | {"b": jax.ShapeDtypeStruct((7,), np.float32)})


# --- configs ------------------------------------------------------------------------------------------------

def test_yaml_syntax_error_names_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel:\n  n_layers: [1\n  d_model: 3\n")
    with pytest.raises(ValueError, match=r"not valid YAML \(line [34], column \d+: .*expected ',' or '\]'"):
        config_lib.load(bad)


# --- train: the CLI's one-line refusals -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    (tmp / "text").mkdir()
    for path in sorted((ROOT / "lcjax").glob("*.py"))[:3]:
        shutil.copy(path, tmp / "text" / path.name)
    return [f"data.source=files:{tmp / 'text'}", f"data.cache_dir={tmp / 'cache'}"]


def _train_args(corpus, run_dir, *sets):
    return ["train", "--config", str(ROOT / "configs/demo.yaml"), "--run-dir", str(run_dir), "--no-progress",
            *[a for s in [*TINY, *corpus, *sets] for a in ("--set", s)]]


def test_resume_refuses_a_missing_run_a_run_without_checkpoint_and_a_busy_one(tmp_path, capsys):
    assert cli.main(["train", "--run-dir", str(tmp_path / "missing"), "--resume"]) == 2
    line = _one_error_line(capsys, "--resume: run dir", "missing does not exist")
    assert "--config" not in line
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_lib.to_yaml(config_lib.load(None, TINY)))
    assert cli.main(["train", "--run-dir", str(run), "--resume"]) == 2
    _one_error_line(capsys, "holds no checkpoint to continue")
    assert cli.main(["train", "--run-dir", str(run), "--step", "3", "--config", str(ROOT / "configs/demo.yaml")]) == 2
    _one_error_line(capsys, "--step needs --resume")
    with rundir.locked(run, command="lcjax train"):
        for args in (["train", "--run-dir", str(run), "--resume"],
                     ["eval", "passkey", "--run-dir", str(run)]):
            assert cli.main(args) == 2
            _one_error_line(capsys, f"--run-dir {run} is in use by pid {os.getpid()}")
    assert sorted(os.listdir(run)) == ["config.yaml"]


def test_train_refusals_leave_no_run_dir(corpus, tmp_path, capsys, monkeypatch):
    """Busy, unwritable, too big for the devices: one line, exit 2, nothing created."""
    run = tmp_path / "run"
    with rundir.locked(run, command="lcjax train", create=True):
        assert cli.main(_train_args(corpus, run)) == 2
        _one_error_line(capsys, "is in use by pid")
    assert cli.main(_train_args(corpus, "/sys/kernel/lcjax-run")) == 2
    _one_error_line(capsys, "cannot write in /sys/kernel")
    monkeypatch.setattr(memcheck, "host_available_bytes", lambda: 1000)  # the step compiles, then is refused
    assert cli.main(_train_args(corpus, run, "train.steps=1")) == 2
    _one_error_line(capsys, "the train step needs", "more than the 0.0 MB available per device",
                    "--set train.check_memory=false")
    assert not run.exists()


def test_sigterm_during_set_up_writes_nothing(corpus, tmp_path, capsys, monkeypatch):
    """A signal while the step compiles (here: at the memory check) stops before the first write: no
    step-0 checkpoint of random weights, no run dir."""
    run, check = tmp_path / "run", memcheck.check_fits

    def check_and_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        return check(*args, **kwargs)
    monkeypatch.setattr(memcheck, "check_fits", check_and_signal)
    assert cli.main(_train_args(corpus, run, "train.steps=1")) == 0
    assert "lcjax: preempted before step 1: nothing written\n" in capsys.readouterr().out
    assert not run.exists()


@pytest.mark.slow
def test_damaged_newest_checkpoint_then_resume_from_an_intact_one(corpus, tmp_path, capsys):
    """Truncated data in the newest checkpoint: --resume names it and the intact ones (exit 2, nothing
    touched); --resume --step 2 continues from step 2, the damaged one and the old metrics set aside."""
    run = tmp_path / "run"
    assert cli.main(_train_args(corpus, run, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=5")) == 0
    _damage(run / "checkpoints" / "4", "truncated")
    capsys.readouterr()
    assert cli.main(["train", "--run-dir", str(run), "--resume", "--no-progress", "--set", "train.steps=6"]) == 2
    _one_error_line(capsys, f"checkpoint {run / 'checkpoints' / '4'} (step 4) is damaged: default/: data of ",
                    "intact: 2 (pick one with --step 2)")
    args = ["train", "--run-dir", str(run), "--resume", "--step", "2", "--no-progress", "--set", "train.steps=4"]
    assert cli.main(args) == 0
    assert "set aside the later checkpoints 4" in capsys.readouterr().err
    aside = run / "set-aside" / "after-2"
    assert sorted(os.listdir(aside / "checkpoints")) == ["4"] and (aside / "metrics.jsonl").is_file()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert [p is None for _, p in checkpoint.survey(run / "checkpoints")] == [True, True]
