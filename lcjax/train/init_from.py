"""Starting a new run from another one (``--init-from``): a run dir's newest checkpoint (parameters, and
with ``--init-optimizer`` the optimizer state) or a Hugging Face folder (config.json + *.safetensors, read
by a converter the CLI passes in: train/ sits above convert/ in the layering)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import optax

from lcjax import config as config_lib
from lcjax.checkpoint import check_directory, restore_opt_state, restore_params
from lcjax.config import Config

HF_FILES = ("config.json", "*.safetensors")
SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "tie_embeddings")


def check_init_from(path: Path, cfg: Config) -> None:
    """Raise ValueError (one line) unless ``path`` is a run dir with a checkpoint of ``cfg``'s model shape or a
    Hugging Face folder (config.json + *.safetensors)."""
    if not path.is_dir():
        raise ValueError(f"--init-from {path}: {'not a folder' if path.exists() else 'no such folder'}")
    if is_hf_folder(path):
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


def is_hf_folder(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face model folder: a ``config.json`` file and at least one
    ``*.safetensors`` file in it (raises nothing; a missing folder is not one)."""
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
    if is_hf_folder(path):
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
    if is_hf_folder(Path(init_from)):
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




def tokenizer_dir(init_from) -> Path | None:
    """Where the tokenizer of ``--init-from`` lives (the Hugging Face folder itself, or a run dir's
    ``tokenizer/``); None without ``--init-from``."""
    if init_from is None:
        return None
    source = Path(init_from)
    return source if is_hf_folder(source) else source / "tokenizer"
