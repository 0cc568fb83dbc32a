"""Hugging Face LlamaForCausalLM folders (config.json + safetensors) ⇄ lcjax parameters and run dirs.

Weights (HF name → lcjax leaf; HF ``Linear`` weights are [out, in], lcjax's [in, out], so matrices are
transposed; layer i of HF is index i of lcjax's stacked ``layers`` leaves, leading axis L):

    model.embed_tokens.weight [V, D]              → embed [V', D]   (V' = V padded to 128: zero rows)
    model.layers.i.input_layernorm.weight [D]     → layers.attn_norm [L, D]
    model.layers.i.self_attn.{q,k,v,o}_proj.weight → layers.{wq, wk, wv, wo} [L, in, out]
    model.layers.i.post_attention_layernorm.weight → layers.mlp_norm [L, D]
    model.layers.i.mlp.{gate,up,down}_proj.weight  → layers.{w_gate, w_up, w_down} [L, in, out]
    model.norm.weight [D]                          → final_norm [D]
    lm_head.weight [V, D] (untied only)            → lm_head [D, V'] (zero columns)

Query/key rows need no permutation: transformers' LLaMA rotates dimension i with i + H/2 ("rotate half"),
as lcjax does (tests/convert/test_convert.py checks the logits against transformers itself).

Tensors stream one lcjax leaf at a time: import builds one stacked leaf from its HF tensors and adds it to
the checkpoint (Orbax incremental saves), export reads one leaf from Orbax and writes shards of at most
``max_shard_bytes``; host memory is about one leaf plus one shard (plus Orbax's buffers for that leaf).
Parameters are float32 in lcjax; export writes an import's own safetensors dtypes (tensor by tensor)
unless told otherwise, so HF → lcjax → HF is bitwise for float32, bfloat16 and float16.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from lcjax import config as config_lib
from lcjax.checkpoint import check_step, restore_params, save_params_streamed
from lcjax.config import Config, ModelConfig, padded_vocab
from lcjax.convert.hf_config import hf_config_from_model, model_config_from_hf, read_config_json
from lcjax.convert.safetensors_io import SafetensorsFolder, ShardWriter
from lcjax.convert.tokenizer import complete_tokenizer_files

_LAYER = {  # lcjax stacked leaf -> HF name inside model.layers.i (all but the norms transposed)
    "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
}
_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some old exports saved
IMPORT_MARKER = "hf_import.json"
HF_EXTRAS = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "tokenizer.model")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def hf_model_config(hf_dir: str | Path) -> ModelConfig:
    """The lcjax ModelConfig of ``HF_DIR/config.json`` (ValueError naming the file and key otherwise)."""
    return model_config_from_hf(read_config_json(hf_dir), str(Path(hf_dir) / "config.json"))


def _leaf_name(path) -> tuple[str, ...]:
    return tuple(n for n in (str(getattr(k, "key", getattr(k, "name", k))) for k in path) if n != "value")


def hf_names(name: tuple[str, ...], n_layers: int) -> list[str]:
    """The HF tensor names of lcjax leaf ``name`` (e.g. ("layers", "wq")), one per layer for stacked leaves."""
    if name[0] == "layers":
        return [f"model.layers.{i}.{_LAYER[name[-1]]}" for i in range(n_layers)]
    return [_TOP[name[-1]]]


def _to_lcjax(name: str, array: np.ndarray, vocab_padded: int) -> np.ndarray:
    """One HF tensor in lcjax's orientation and vocabulary padding, float32."""
    a = array.astype(np.float32)
    if a.ndim == 2 and name != "embed":
        a = a.T
    if name in ("embed", "lm_head"):
        pad = vocab_padded - array.shape[0]
        a = np.pad(a, ((0, pad), (0, 0)) if name == "embed" else ((0, 0), (0, pad)))
    return a


def _to_hf(name: str, array: np.ndarray, vocab: int, dtype) -> np.ndarray:
    """One lcjax tensor (one layer's slice) in HF's orientation, padding dropped, cast to ``dtype``."""
    if name == "embed":
        array = array[:vocab]
    elif name == "lm_head":
        array = array[:, :vocab]
    return np.ascontiguousarray(array.T if array.ndim == 2 and name != "embed" else array).astype(dtype)


def check_tensors(folder: SafetensorsFolder, m: ModelConfig, abstract_params) -> None:
    """ValueError (one line) unless the folder holds exactly the tensors of ``m`` (config.json's model) with
    their shapes, and ``abstract_params`` has the parameter shapes of ``m``."""
    import jax

    from lcjax.train.state import model_graph

    shapes = lambda tree: {_leaf_name(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    own, given = shapes(model_graph(Config(model=m))[1]), shapes(abstract_params)
    for name in sorted(set(own) | set(given)):
        if own.get(name) != given.get(name):
            raise ValueError(f"model config does not match the HF config.json: parameter {'.'.join(name)} "
                             f"is {given.get(name)} in the run, {own.get(name)} in the HF model")
    expected = {}
    for name, shape in own.items():
        shape = _hf_shape(name[-1], shape[1:] if name[0] == "layers" else shape, m.vocab_size)
        expected.update({n: shape for n in hf_names(name, m.n_layers)})
    present = {n for n in folder.names if not n.endswith(_IGNORED)}
    if m.tie_embeddings:
        present.discard("lm_head.weight")  # some exports keep the tied copy; the embedding is used
    missing, extra = sorted(set(expected) - present), sorted(present - set(expected))
    if missing:
        raise ValueError(f"safetensors: tensor {missing[0]} is missing ({len(missing)} missing)")
    if extra:
        raise ValueError(f"safetensors: unexpected tensor {extra[0]} ({len(extra)} unexpected; "
                         f"biases and other architectures are not supported)")
    for name, shape in expected.items():
        if folder.shape(name) != shape:
            raise ValueError(f"safetensors: tensor {name} has shape {list(folder.shape(name))}, "
                             f"config.json implies {list(shape)}")
        if not np.issubdtype(folder.dtype(name), np.floating) and folder.dtype(name).name != "bfloat16":
            raise ValueError(f"safetensors: tensor {name} has dtype {folder.dtype(name)}, not floating point")


def _hf_shape(leaf: str, shape: tuple[int, ...], vocab: int) -> tuple[int, ...]:
    if leaf == "embed":
        return (vocab, shape[1])
    if leaf == "lm_head":
        return (vocab, shape[0])
    return tuple(reversed(shape))


def hf_params(hf_dir: str | Path, abstract_params):
    """The parameters of an HF folder as a pytree shaped like ``abstract_params`` (the abstract nnx.State of
    ``lcjax.train.state.model_graph(cfg)[1]`` for ``cfg.model == hf_model_config(hf_dir)``), float32 numpy.

    Reads tensor by tensor (the result is the whole model in memory; ``lcjax convert`` streams instead).
    Raises ValueError (one line) for a folder whose tensors do not match the config.
    """
    import jax

    m = hf_model_config(hf_dir)
    folder = SafetensorsFolder(hf_dir)
    check_tensors(folder, m, abstract_params)
    return jax.tree_util.tree_map_with_path(lambda path, leaf: _load_leaf(folder, m, path, leaf.shape),
                                            abstract_params)


def _load_leaf(folder: SafetensorsFolder, m: ModelConfig, path, shape) -> np.ndarray:
    """One lcjax leaf (all L layers of a stacked one) from the HF tensors, float32."""
    name = _leaf_name(path)
    out = np.zeros(shape, np.float32)
    for i, hf_name in enumerate(hf_names(name, m.n_layers)):
        value = _to_lcjax(name[-1], folder.read(hf_name), padded_vocab(m.vocab_size))
        if name[0] == "layers":
            out[i] = value
        else:
            out[...] = value
    return out


def source_dtype(hf_dir: str | Path) -> str:
    """The dtype name of most weights of an HF folder (what export writes back by default)."""
    folder = SafetensorsFolder(hf_dir)
    names = [folder.dtype(n).name for n in folder.names]
    return max(set(names), key=names.count)


def _new_output_dir(out_dir: Path, what: str) -> Path:
    """A temporary sibling of ``out_dir`` to write into (renamed at the end: nothing half-written)."""
    if out_dir.exists():
        raise ValueError(f"{what} {out_dir} already exists")
    parent = out_dir.absolute().parent
    if not parent.is_dir():
        raise ValueError(f"{what} {out_dir}: parent {parent} is not a directory")
    tmp = parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _finish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``out_dir`` (one step); ValueError when another process created a
    non-empty ``out_dir`` meanwhile (its files are left as they are)."""
    try:
        tmp.rename(out_dir)
    except OSError as e:
        raise ValueError(f"output dir {out_dir} was created by another process while converting "
                         f"({e.strerror}); it is left as it is, nothing written") from None


def hf_to_lcjax(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Import an HF LLaMA folder as an lcjax run dir ``out_dir`` and return it.

    ``out_dir`` holds ``config.yaml`` (the model from config.json; other sections default: set the mesh and
    data for training), ``checkpoints/0/`` with the parameters alone (no optimizer or data state: an import
    is a starting point for ``lcjax train --init-from``, read with ``lcjax.checkpoint.restore_params``),
    ``tokenizer/`` (the folder's tokenizer files, if any), ``hf/`` (its config.json and generation config,
    kept for export) and ``hf_import.json`` (source, dtype, step). Raises ValueError before writing anything
    for a missing folder, an unsupported config, mismatched tensors or an existing ``out_dir``.
    """
    import jax

    from lcjax.train.state import model_graph

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    m = hf_model_config(hf_dir)
    cfg = Config(name=out_dir.name.lstrip(".") or "hf", model=m)
    config_lib.validate(cfg)
    _, abstract = model_graph(cfg)
    check_tensors(SafetensorsFolder(hf_dir), m, abstract)
    tmp = _new_output_dir(out_dir, "output dir")
    try:
        folder = SafetensorsFolder(hf_dir)
        parts = (_nest(path, _load_leaf(folder, m, path, leaf.shape))
                 for path, leaf in jax.tree_util.tree_leaves_with_path(abstract))
        save_params_streamed(tmp / "checkpoints", 0, parts)
        (tmp / "config.yaml").write_text(config_lib.to_yaml(cfg))
        _copy_extras(hf_dir, tmp / "hf", ("config.json", "generation_config.json"))
        _copy_extras(hf_dir, tmp / "tokenizer", HF_EXTRAS[1:])
        marker = {"source": str(hf_dir.absolute()), "dtype": source_dtype(hf_dir), "step": 0,
                  "contents": "params only (no optimizer or data state)",
                  "dtypes": {n: folder.dtype(n).name for n in folder.names}}
        (tmp / IMPORT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        _finish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _copy_extras(src: Path, dst: Path, names) -> None:
    found = [n for n in names if (src / n).is_file()]
    if found:
        dst.mkdir(parents=True, exist_ok=True)
    for n in found:
        shutil.copyfile(src / n, dst / n)


def lcjax_to_hf(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None, dtype: str = "auto",
                max_shard_bytes: int = 5 * 10**9) -> Path:
    """Export the parameters of an lcjax run dir (newest checkpoint, or ``step``) as an HF folder.

    Writes ``config.json`` (an imported model's own file when the model config is unchanged, else one built
    from the run's model config on top of it), safetensors shards (``dtype``: "auto" = an import's source
    dtype, else float32) and the tokenizer files. Streams one lcjax tensor at a time. Raises ValueError
    before writing anything for a run dir without config or checkpoint, a bad dtype or an existing output.
    """
    import jax

    from lcjax.train.state import model_graph

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir}: not an lcjax run dir (no config.yaml)")
    steps = check_step(run_dir, step, field="lcjax-to-hf")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} must be one of {', '.join(DTYPES)}")
    cfg = config_lib.load(run_dir / "config.yaml")
    marker = run_dir / IMPORT_MARKER
    imported = json.loads(marker.read_text()) if marker.is_file() else {}
    per_tensor = imported.get("dtypes", {}) if dtype == "auto" else {}  # an import's mixed dtypes, if any
    dtype = imported.get("dtype", "float32") if dtype == "auto" else dtype
    original = run_dir / "hf" / "config.json"
    base = json.loads(original.read_text()) if original.is_file() else None
    _, abstract = model_graph(cfg)
    tmp = _new_output_dir(out_dir, "output dir")
    try:
        writer = ShardWriter(tmp, max_shard_bytes)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
            name = _leaf_name(path)
            target = _nest(path, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
            value = _get(restore_params(run_dir / "checkpoints", target, step), path)
            for i, hf_name in enumerate(hf_names(name, cfg.model.n_layers)):
                part = value[i] if name[0] == "layers" else value
                out_dtype = _np_dtype(per_tensor.get(hf_name, dtype))
                writer.add(hf_name, _to_hf(name[-1], part, cfg.model.vocab_size, out_dtype))
            del value
        writer.close()
        _copy_extras(run_dir / "hf", tmp, ("generation_config.json",))
        _copy_extras(run_dir / "tokenizer", tmp, HF_EXTRAS[1:])
        eos_id = complete_tokenizer_files(tmp, max_length=cfg.data.seq_len)  # what AutoTokenizer needs
        unchanged = base is not None and _same_model(base, cfg.model)
        if unchanged and dtype == imported.get("dtype"):
            shutil.copyfile(original, tmp / "config.json")
        else:
            hf_cfg = hf_config_from_model(cfg.model, max_position=cfg.data.seq_len, dtype=dtype, base=base)
            if eos_id is not None:
                hf_cfg.setdefault("eos_token_id", eos_id)
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        _finish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _same_model(hf_cfg: dict, m: ModelConfig) -> bool:
    try:
        return model_config_from_hf(hf_cfg) == m
    except ValueError:
        return False


def _np_dtype(name: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def _nest(path, leaf):
    """A nested-dict tree holding only ``leaf`` at ``path`` (keys as Orbax saves them)."""
    for k in reversed(path):
        leaf = {str(getattr(k, "key", getattr(k, "name", k))): leaf}
    return leaf


def _get(tree, path):
    for k in path:
        tree = tree[str(getattr(k, "key", getattr(k, "name", k)))]
    return np.asarray(tree)
