"""The one Orbax wrapper: model, optimizer and data-iterator state saved together, restorable on any mesh.

Checkpoints live in ``<run dir>/checkpoints/<step>/``. Saves are asynchronous; a save that was killed
half-way leaves only a temporary directory, which Orbax never reports as a step and which is removed when
the next run opens the directory, so the previous good checkpoint always stays visible.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Save every ``every`` steps (and when forced), keep the newest ``keep``, restore the newest.

    The saved item is any pytree of arrays (here lcjax.train.state.TrainState). Restoring takes an
    abstract pytree (``jax.ShapeDtypeStruct`` leaves with shardings) and places every array on that
    sharding, whatever mesh wrote the checkpoint.
    """

    def __init__(self, directory: str | Path, *, every: int, keep: int):
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    @property
    def directory(self) -> Path:
        """The folder holding one sub-folder per saved step."""
        return Path(self._manager.directory)

    @staticmethod
    def read(directory: str | Path, abstract_state, step: int | None = None):
        """The state saved at ``step`` (default: newest) under ``directory``, laid out like ``abstract_state``,
        without writing anything there (no folder created, no leftovers cleaned). Raises ValueError (one line)
        when there is no checkpoint or it cannot be restored into ``abstract_state``."""
        steps = saved_steps(directory)
        step = steps[-1] if step is None and steps else step
        if step is None:
            raise ValueError(f"{directory}: holds no checkpoint")
        precheck(directory, step, abstract_state)
        manager = ocp.CheckpointManager(Path(directory).absolute())
        try:
            with _one_line_errors(Path(directory) / str(step)):
                return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        finally:
            manager.close()

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete checkpoint's step, oldest first."""
        return sorted(self._manager.all_steps())

    def maybe_save(self, step: int, state, *, force: bool = False) -> bool:
        """Save ``state`` as ``step`` when ``step`` is a multiple of ``every`` or ``force``; True if saved."""
        if not force and step % self.every:
            return False
        if step in self._manager.all_steps():
            return False
        return bool(self._manager.save(step, args=ocp.args.StandardSave(state), force=True))

    def save_params(self, step: int, params) -> bool:
        """Save ``{"params": params}`` alone as ``step`` (an imported model: no optimizer or data state;
        read it back with :func:`restore_params`). True if saved."""
        if step in self._manager.all_steps():
            return False
        return bool(self._manager.save(step, args=ocp.args.StandardSave({"params": params}), force=True))

    def restore(self, abstract_state, step: int | None = None):
        """The state saved at ``step`` (default: newest), laid out like ``abstract_state``.

        Raises FileNotFoundError when there is no checkpoint, ValueError (one line naming the checkpoint)
        when it cannot be read into ``abstract_state`` (another model shape, a foreign or damaged folder).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError("no checkpoint to restore")
        precheck(self.directory, step, abstract_state)
        with _one_line_errors(self._manager.directory / str(step)):
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def saved_steps(directory: str | Path) -> list[int]:
    """Steps of the complete checkpoints under ``directory`` (without opening Orbax or writing anything)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def check_step(run_dir: str | Path, step: int | None, field: str = "--run-dir") -> list[int]:
    """The complete checkpoint steps of the run dir ``run_dir``; raises ValueError (one line naming
    ``field``) when it has none, or not ``step`` (None: any)."""
    steps = saved_steps(Path(run_dir) / "checkpoints")
    if not steps or (step is not None and step not in steps):
        raise ValueError(f"{field} {run_dir}: no checkpoint{'' if step is None else f' at step {step}'} "
                         f"(saved: {steps or 'none'})")
    return steps


def save_params_streamed(directory: str | Path, step: int, parts) -> None:
    """Write checkpoint ``directory/<step>`` holding ``{"params": ...}`` from ``parts``, an iterable of
    disjoint sub-trees of the parameters (nested dicts of the saved structure, numpy leaves), one at a time:
    host memory stays at about one part, not the whole model (Orbax buffers everything a save holds). The
    result reads like :meth:`Checkpointer.save_params`. Uses Orbax's incremental ``v1.partial`` saves where
    this Orbax has them, else one save of all parts. Raises ValueError if the step exists.
    """
    final = Path(directory).absolute() / str(step)
    if final.exists():
        raise ValueError(f"{final} already exists")
    partial = getattr(getattr(ocp, "v1", None), "partial", None)
    if partial is None:  # older Orbax: one save (memory: the whole model)
        merged: dict = {}
        for part in parts:
            _merge_into(merged, part)
        ckpt = Checkpointer(directory, every=1, keep=1 << 30)
        ckpt.save_params(step, merged)
        ckpt.close()
        return
    staging = final.parent / f"partial-{step}"  # no dots: Orbax parses the name
    for part in parts:
        partial.save(staging, {"params": part})
    partial.finalize(staging)
    (staging / "state").rename(staging / "default")  # v1 names the item "state", the manager "default"
    staging.rename(final)


def _merge_into(tree: dict, part: dict) -> None:
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge_into(tree[key], value)
        else:
            tree[key] = value


def abstract_like(tree):
    """ShapeDtypeStruct pytree (with shardings) of a pytree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def restore_params(directory: str | Path, abstract_params, step: int | None = None):
    """Only the model parameters (``params`` of a saved TrainState) of the checkpoint at ``step`` (default:
    newest) under ``directory``, placed like ``abstract_params`` (any mesh); the rest is not read.
    ``abstract_params``: ShapeDtypeStruct leaves (with shardings: jax arrays placed there; without: numpy
    arrays), the whole parameter tree or any part of it as nested dicts of the saved structure (e.g.
    ``{"layers": {"wq": {"value": ...}}}``), so one tensor can be read at a time. Works on a whole
    TrainState and on parameters saved alone (:meth:`Checkpointer.save_params`).

    Raises ValueError (one line naming the checkpoint) when there is none or it does not hold parameters of
    these shapes.
    """
    step = _newest_or(directory, step)
    params = _restore_part(directory, "params", abstract_params, step)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):  # partial restore skips them
        raise ValueError(f"checkpoint {Path(directory) / str(step)}: holds no model parameters of this shape")
    return params


def restore_opt_state(directory: str | Path, abstract_opt_state, step: int | None = None):
    """Only the optimizer state (``opt_state`` of a saved TrainState: every optax state, e.g. AdamW's moments
    and counts) of the checkpoint at ``step`` (default: newest) under ``directory``, placed like
    ``abstract_opt_state`` (ShapeDtypeStruct leaves with shardings: any mesh, any ZeRO layout); the rest is
    not read.

    Raises ValueError (one line naming the checkpoint) when there is none, it holds no optimizer state
    (parameters alone: :meth:`Checkpointer.save_params`, an import) or one of another structure (another
    optimizer: other states, arrays, shapes or dtypes).
    """
    directory = Path(directory)
    step = _newest_or(directory, step)
    path = directory / str(step)
    manager = ocp.CheckpointManager(directory.absolute(), item_handlers=ocp.StandardCheckpointHandler())
    try:
        with _one_line_errors(path, "this optimizer state"):
            saved = manager.item_metadata(step)
    finally:
        manager.close()
    saved = getattr(saved, "tree", saved) or {}  # newer Orbax wraps the tree in TreeMetadata
    if "opt_state" not in saved:
        raise ValueError(f"checkpoint {path}: holds no optimizer state (model parameters alone)")
    want, have = jax.tree.leaves(abstract_opt_state), len(jax.tree.leaves(saved["opt_state"]))
    if have != len(want):
        raise ValueError(f"checkpoint {path}: its optimizer state holds {have} arrays, this optimizer's "
                         f"{len(want)} (another optimizer structure)")
    opt_state = _restore_part(directory, "opt_state", abstract_opt_state, step, "this optimizer state")
    # partial restore leaves what the checkpoint lacks as ShapeDtypeStructs and keeps the saved shapes
    for got, target in zip(jax.tree.leaves(opt_state), want):
        if isinstance(got, jax.ShapeDtypeStruct) or got.shape != target.shape or got.dtype != target.dtype:
            raise ValueError(f"checkpoint {path}: its optimizer state does not match this optimizer's "
                             f"(another structure, shapes or dtypes)")
    return opt_state


def _newest_or(directory: str | Path, step: int | None) -> int:
    """``step``, or the newest complete checkpoint's under ``directory`` (ValueError when there is none)."""
    steps = saved_steps(directory)
    step = steps[-1] if step is None and steps else step
    if step is None:
        raise ValueError(f"{directory}: holds no checkpoint")
    return step


def _restore_part(directory: str | Path, key: str, abstract, step: int, into: str = "this model"):
    """``tree[key]`` of the checkpoint at ``step`` read by partial restore into ``abstract``; leaves the
    checkpoint lacks stay ShapeDtypeStructs. Raises ValueError (one line) when Orbax cannot read it."""
    target = {key: abstract}
    precheck(directory, step, target, into)
    manager = ocp.CheckpointManager(Path(directory).absolute())
    try:
        with _one_line_errors(Path(directory) / str(step), into):
            args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                          partial_restore=True)
            return manager.restore(step, args=args)[key]
    finally:
        manager.close()


def check_directory(directory: str | Path) -> list[int]:
    """The complete checkpoint steps of ``directory`` (a run's ``checkpoints/``), raising ValueError (one line)
    when it exists but is not a readable folder."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: is not a folder of checkpoints")
    try:
        return saved_steps(directory)
    except OSError as e:
        raise ValueError(f"{directory}: cannot be read ({e.strerror or e})") from None


@contextlib.contextmanager
def _one_line_errors(path: Path, into: str = "this model"):
    """Turn whatever Orbax raises while reading ``path`` (``<checkpoints>/<step>``) into one line naming it:
    DamagedCheckpoint when the folder fails :func:`verify` (with the intact ones), else ValueError (the
    checkpoint is whole but does not fit ``into``)."""
    try:
        yield
    except Exception as e:  # Orbax raises ValueError, FileNotFoundError, KeyError, TypeError, ...
        problem = verify(path) if path.name.isdigit() else None
        if problem is not None:
            raise damaged(path.parent, int(path.name), problem) from None
        raise ValueError(f"checkpoint {path}: cannot be restored into {into} ({_first_line(e)[:300]})") from None


# ------------------------------------------------------------------------------------------ verification

ITEM = "default"  # the folder of the saved item inside a step's folder (Orbax's default item name)
ARRAY_TYPES = ("jax.Array", "np.ndarray")


class DamagedCheckpoint(ValueError):
    """A checkpoint folder fails :func:`verify` (CLI exit 2, one line: which step, file and check, and the
    intact checkpoints)."""


def _read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; raises DamagedCheckpoint naming the file and the check."""
    name = path.name if path.parent.name != ITEM else f"{ITEM}/{path.name}"
    if not path.is_file():
        raise DamagedCheckpoint(f"{name}: missing ({what})")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{name}: not valid JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(data, dict):
        raise DamagedCheckpoint(f"{name}: not a JSON object")
    return data


def _array_keys(tree_metadata: dict) -> list[str]:
    """The store keys (``a.b.c``) of the arrays a checkpoint's ``_METADATA`` lists."""
    keys = []
    for entry in tree_metadata.values():
        if entry.get("value_metadata", {}).get("value_type") in ARRAY_TYPES:
            keys.append(".".join(str(k["key"]) for k in entry["key_metadata"]))
    return keys


def verify(step_dir: str | Path, *, data: bool = True) -> str | None:
    """None when the checkpoint folder ``step_dir`` (``checkpoints/<step>``) is intact, else one line
    "FILE: CHECK" naming the first problem: the folder, ``_CHECKPOINT_METADATA`` (present, a JSON
    object), the item folder ``default/``, its ``_METADATA`` (the saved tree), every array listed there
    (its ``.zarray`` present and valid JSON) and, with ``data``, every stored byte read back (a
    truncated or missing data file fails here). Reads only; memory: one chunk at a time."""
    import tensorstore as ts

    step_dir = Path(step_dir)
    try:
        if not step_dir.is_dir():
            raise DamagedCheckpoint(f"{step_dir.name}: not a folder")
        _read_json(step_dir / "_CHECKPOINT_METADATA", "written when a save completes")
        item = step_dir / ITEM
        if not item.is_dir():
            raise DamagedCheckpoint(f"{ITEM}/: missing (the saved state)")
        meta = _read_json(item / "_METADATA", "the saved tree")
        tree = meta.get("tree_metadata")
        if not isinstance(tree, dict) or not tree:
            raise DamagedCheckpoint(f"{ITEM}/_METADATA: lists no saved arrays")
        base = {"driver": "file", "path": str(item.absolute()) + "/"}
        spec = {"driver": "ocdbt", "base": base} if meta.get("use_ocdbt", True) else base
        try:
            store = ts.KvStore.open(spec).result()
            stored = {k.decode() for k in store.list().result()}
        except Exception as e:  # tensorstore raises ValueError with a status text
            raise DamagedCheckpoint(f"{ITEM}/manifest.ocdbt: cannot be read ({_first_line(e)})") from None
        for key in _array_keys(tree):
            header = f"{key}/.zarray" if f"{key}/.zarray" in stored else f"{key}/zarr.json"
            if header not in stored:
                raise DamagedCheckpoint(f"{ITEM}/: array {key} is missing")
            try:
                json.loads(store.read(header).result().value)
            except Exception as e:
                raise DamagedCheckpoint(f"{ITEM}/: array {key}: header unreadable ({_first_line(e)})") from None
        if data:
            for key in sorted(stored):
                try:
                    store.read(key).result()
                except Exception as e:
                    raise DamagedCheckpoint(f"{ITEM}/: data of {key} unreadable ({_first_line(e)})") from None
    except DamagedCheckpoint as e:
        return str(e)
    except OSError as e:
        return f"{step_dir.name}: cannot be read ({e.strerror or e})"
    return None


def precheck(directory: str | Path, step: int, abstract, into: str = "this model") -> None:
    """Before restoring checkpoint ``step`` under ``directory`` into ``abstract`` (a pytree of
    ShapeDtypeStructs, or any part of the saved tree): its structure passes :func:`verify` (without reading
    the data) and every array both hold has the same shape in both (read from the saved metadata, so
    Orbax never starts a restore that would fail half-way). Raises DamagedCheckpoint or ValueError (one
    line naming the first mismatching array)."""
    path = Path(directory) / str(step)
    problem = verify(path, data=False)
    if problem is not None:
        raise damaged(directory, step, problem)
    manager = ocp.CheckpointManager(Path(directory).absolute(), item_handlers=ocp.StandardCheckpointHandler())
    try:
        with _one_line_errors(path, into):
            saved = manager.item_metadata(step)
    finally:
        manager.close()
    saved = getattr(saved, "tree", saved) or {}
    shapes = {_names(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]
              if getattr(x, "shape", None) is not None}
    for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        have = shapes.get(_names(p))
        if have is not None and have != tuple(leaf.shape):
            raise ValueError(f"checkpoint {path}: cannot be restored into {into}: {'.'.join(_names(p))} is "
                             f"{have} there, {tuple(leaf.shape)} here (another model shape)")


def _names(path) -> tuple[str, ...]:
    """A pytree key path as plain names (dict keys, attribute names, sequence indices)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _first_line(e: Exception) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:160]


def survey(directory: str | Path, *, data: bool = True) -> list[tuple[int, str | None]]:
    """(step, problem or None) of every checkpoint folder under ``directory``, oldest first
    (:func:`verify`)."""
    return [(step, verify(Path(directory) / str(step), data=data)) for step in saved_steps(directory)]


def intact_steps(directory: str | Path, but: int | None = None) -> list[int]:
    """Steps of the checkpoints under ``directory`` that pass :func:`verify` (``but``: one not to read)."""
    return [step for step in saved_steps(directory) if step != but and verify(Path(directory) / str(step)) is None]


def damaged(directory: str | Path, step: int, problem: str) -> DamagedCheckpoint:
    """The error for checkpoint ``step`` under ``directory`` failing ``problem``: says it is damaged, which
    file and check, and lists the intact ones (to pick with ``--step N``)."""
    intact = intact_steps(directory, but=step)
    where = Path(directory) / str(step)
    rest = (f"intact: {', '.join(map(str, intact))} (pick one with --step {intact[-1]})" if intact
            else "no other checkpoint is intact")
    return DamagedCheckpoint(f"checkpoint {where} (step {step}) is damaged: {problem}; {rest}")
