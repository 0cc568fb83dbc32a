"""Hugging Face ``config.json`` (LlamaForCausalLM) ⇄ lcjax ``ModelConfig``.

RoPE settings are read from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``
(older files; the type under ``rope_type`` or ``type``; ``rope_scaling`` wins when both are set, as in
transformers), with transformers 5's defaults: YaRN's
``original_max_position_embeddings`` falls back to ``max_position_embeddings``, a missing YaRN ``factor`` is
``max_position_embeddings / original_max_position_embeddings``, ``beta_fast``/``beta_slow`` default to 32/1,
and DeepSeek's ``mscale``/``mscale_all_dim`` become an explicit ``attention_factor``. transformers'
``dynamic`` uses ``max_position_embeddings`` as the original length. A static NTK base change has no
transformers type: lcjax's ``ntk`` is exported as ``default`` with the changed ``rope_theta`` (same θ).

Every problem raises ValueError with one line naming the file and the key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lcjax.config import ModelConfig, RopeConfig

ARCHITECTURE = "LlamaForCausalLM"
HF_ROPE_TYPES = {"default": "default", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn",
                 "llama3": "llama3"}  # transformers rope_type -> lcjax model.rope.type


def read_config_json(hf_dir: str | Path) -> dict:
    """The parsed ``HF_DIR/config.json``; ValueError when the folder or file is missing or not JSON."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ValueError(f"{hf_dir}: not a directory")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: no config.json (not a Hugging Face model folder)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    return raw


def model_config_from_hf(raw: dict, origin: str = "config.json") -> ModelConfig:
    """The lcjax ModelConfig of a transformers LlamaConfig dict; ValueError for what lcjax cannot run."""
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "llama" or (archs and ARCHITECTURE not in archs):
        raise ValueError(f"{origin}: architecture {archs or raw.get('model_type')!r} is not supported "
                         f"(lcjax converts {ARCHITECTURE}, model_type 'llama')")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(raw.get(key), int):
            raise ValueError(f"{origin}: {key} must be an integer, got {raw.get(key)!r}")
    d, n = raw["hidden_size"], raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or d // n
    if head_dim * n != d:
        raise ValueError(f"{origin}: head_dim {head_dim} x num_attention_heads {n} must equal hidden_size {d}")
    unsupported = {"hidden_act": ("silu",), "attention_bias": (False, None), "mlp_bias": (False, None)}
    for key, allowed in unsupported.items():
        if raw.get(key, allowed[0]) not in allowed:
            raise ValueError(f"{origin}: {key} {raw[key]!r} is not supported (lcjax needs {allowed[0]!r})")
    return ModelConfig(
        n_layers=raw["num_hidden_layers"], d_model=d, n_heads=n,
        n_kv_heads=raw.get("num_key_value_heads") or n, d_ff=raw["intermediate_size"],
        vocab_size=raw["vocab_size"], tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)), init_std=float(raw.get("initializer_range", 0.02)),
        rope=rope_config_from_hf(raw, origin))


def rope_config_from_hf(raw: dict, origin: str = "config.json") -> RopeConfig:
    """RopeConfig of a transformers config dict (``rope_parameters`` or ``rope_theta`` + ``rope_scaling``)."""
    params = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})  # transformers' priority
    if params and not isinstance(next(iter(params.values())), (str, int, float, type(None), bool, list)):
        raise ValueError(f"{origin}: rope_parameters per layer type are not supported")
    base = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    hf_type = params.get("rope_type", params.get("type", "default"))
    if hf_type not in HF_ROPE_TYPES:
        raise ValueError(f"{origin}: rope_type {hf_type!r} is not supported "
                         f"(lcjax converts {', '.join(HF_ROPE_TYPES)})")
    if float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise ValueError(f"{origin}: partial_rotary_factor must be 1 (lcjax rotates the whole head)")
    if hf_type == "default":
        return RopeConfig(base=base)
    max_pos = raw.get("max_position_embeddings", 2048)  # transformers' LlamaConfig default
    original = params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings", max_pos))
    factor = params.get("factor")
    if factor is None and hf_type == "yarn" and original and max_pos:
        factor = max_pos / original
    if factor is None:
        raise ValueError(f"{origin}: rope {hf_type!r} needs a factor")
    if hf_type == "linear":
        return RopeConfig(type="linear", base=base, factor=float(factor))
    if hf_type == "dynamic":
        return RopeConfig(type="dynamic", base=base, factor=float(factor), original_max_position=max_pos)
    if hf_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if not isinstance(params.get(key), (int, float)):
                raise ValueError(f"{origin}: rope llama3 needs {key}, got {params.get(key)!r}")
        return RopeConfig(type="llama3", base=base, factor=float(factor), original_max_position=int(original),
                          low_freq_factor=float(params["low_freq_factor"]),
                          high_freq_factor=float(params["high_freq_factor"]))
    if not params.get("truncate", True):
        raise ValueError(f"{origin}: rope yarn with truncate false is not supported")
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None and mscale and mscale_all_dim:
        m = lambda scale, k: 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0
        attention_factor = m(factor, mscale) / m(factor, mscale_all_dim)
    return RopeConfig(type="yarn", base=base, factor=float(factor), original_max_position=int(original),
                      beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
                      attention_factor=None if attention_factor is None else float(attention_factor))


def hf_rope_parameters(rope: RopeConfig, head_dim: int) -> dict:
    """transformers' ``rope_parameters`` dict for a RopeConfig (``ntk`` as a ``default`` base change)."""
    if rope.type in ("default", "ntk"):
        base = rope.base * (rope.factor ** (head_dim / (head_dim - 2)) if rope.type == "ntk" else 1.0)
        return {"rope_type": "default", "rope_theta": base}
    out = {"rope_type": rope.type, "rope_theta": rope.base, "factor": rope.factor}
    if rope.type in ("yarn", "llama3"):
        out["original_max_position_embeddings"] = rope.original_max_position
    if rope.type == "yarn":
        out.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow)
        if rope.attention_factor is not None:
            out["attention_factor"] = rope.attention_factor
    if rope.type == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    return out


def hf_config_from_model(m: ModelConfig, *, max_position: int, dtype: str = "float32", base: dict | None = None
                         ) -> dict:
    """A transformers LlamaConfig dict for ``m``, on top of ``base`` (an imported model's own config.json,
    whose other keys are kept). RoPE is written both ways: ``rope_parameters`` (transformers 5) and
    ``rope_theta`` + ``rope_scaling`` (older readers). ``max_position`` sets ``max_position_embeddings`` unless
    the RoPE type fixes it (dynamic: the original length; yarn, llama3: original length x factor)."""
    head_dim = m.d_model // m.n_heads
    rope = hf_rope_parameters(m.rope, head_dim)
    if m.rope.type == "dynamic":
        max_position = m.rope.original_max_position
    elif m.rope.type in ("yarn", "llama3"):
        max_position = max(max_position, round(m.rope.original_max_position * m.rope.factor))
    out = dict(base or {})
    for key in ("rope_scaling", "rope_parameters", "rope_theta", "torch_dtype", "dtype", "head_dim",
                "original_max_position_embeddings", "partial_rotary_factor"):
        out.pop(key, None)
    out.update({
        "architectures": [ARCHITECTURE], "model_type": "llama", "hidden_size": m.d_model,
        "intermediate_size": m.d_ff, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads, "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": max_position, "rms_norm_eps": m.norm_eps, "initializer_range": m.init_std,
        "vocab_size": m.vocab_size, "tie_word_embeddings": m.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "rope_theta": rope["rope_theta"],
        "rope_scaling": None if rope["rope_type"] == "default" else {**rope, "type": rope["rope_type"]},
        "rope_parameters": rope, "torch_dtype": dtype, "dtype": dtype,
    })
    out.setdefault("use_cache", True)
    return out
