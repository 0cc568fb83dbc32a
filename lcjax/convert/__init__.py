"""Hugging Face LLaMA checkpoints in and out (docs/convert.md).

- :func:`hf_model_config` (HF_DIR → ModelConfig), :func:`hf_params` (HF_DIR → parameter pytree),
  :func:`load_hf` (HF_DIR → a callable model giving logits), :func:`load_run` (the same for an lcjax run
  dir), :func:`hf_tokenizer` (HF_DIR → Tokenizer);
- :func:`hf_to_lcjax` / :func:`lcjax_to_hf`: the ``lcjax convert`` commands (whole folders, streamed).

Reading needs only numpy (and ``safetensors`` for writing), never torch.
"""

from __future__ import annotations

from pathlib import Path

from lcjax.convert.hf import hf_model_config, hf_params, hf_to_lcjax, lcjax_to_hf
from lcjax.convert.hf_config import hf_config_from_model, model_config_from_hf

__all__ = ["hf_model_config", "hf_params", "hf_to_lcjax", "lcjax_to_hf", "load_hf", "load_run", "hf_tokenizer",
           "hf_config_from_model", "model_config_from_hf", "is_hf_dir"]


def is_hf_dir(path: str | Path) -> bool:
    """True when ``path`` looks like a Hugging Face model folder (config.json and *.safetensors)."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def load_hf(hf_dir: str | Path, mesh_shape=(1, 1, 1), **attention):
    """The HF LLaMA in ``hf_dir`` as a :class:`lcjax.convert.forward.CausalLM` on a (data, sequence, model)
    mesh (default one device): ``load_hf(d)(tokens)`` maps int32 [B, T] to float32 logits [B, T, V].
    ``attention``: AttentionConfig keys (impl, layout, kernel, ...). Raises ValueError (one line)."""
    from lcjax.convert.forward import CausalLM, run_config
    from lcjax.train.state import model_graph

    cfg = run_config(hf_model_config(hf_dir), mesh_shape, **attention)
    _, abstract = model_graph(cfg)
    return CausalLM(cfg, hf_params(hf_dir, abstract))


def load_run(run_dir: str | Path, mesh_shape=(1, 1, 1), *, step: int | None = None, **attention):
    """The model of an lcjax run dir (its config.yaml; the newest checkpoint, or ``step``) as a
    :class:`lcjax.convert.forward.CausalLM`, e.g. to compare an import with its source. Raises ValueError."""
    import jax

    from lcjax import config as config_lib
    from lcjax.checkpoint import restore_params, saved_steps
    from lcjax.convert.forward import CausalLM, run_config
    from lcjax.train.state import model_graph

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not saved_steps(run_dir / "checkpoints"):
        raise ValueError(f"{run_dir}: not an lcjax run dir with a checkpoint")
    cfg = run_config(config_lib.load(run_dir / "config.yaml").model, mesh_shape, **attention)
    _, abstract = model_graph(cfg)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
    return CausalLM(cfg, restore_params(run_dir / "checkpoints", target, step))  # ValueError: one line


def hf_tokenizer(hf_dir: str | Path):
    """The ``tokenizer.json`` of an HF folder as an lcjax Tokenizer (``encode_batch``, ``decode``, ``save``,
    ``eos_id``, ``vocab_size``). EOS is config.json's ``eos_token_id`` (the first, if a list), else
    tokenizer_config.json's ``eos_token``. Raises ValueError when there is no tokenizer.json or no EOS."""
    from lcjax.convert.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(hf_dir)
