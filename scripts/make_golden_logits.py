"""Write the golden logits of tiny random transformers LLaMA models, so the default test suite checks
parity with Hugging Face without torch (tests/convert/test_convert.py).

    pip install -e '.[oracle]'   # torch (CPU) and transformers
    python scripts/make_golden_logits.py [--out tests/convert/data/hf_tiny]

Writes ``OUT/<weights>/{config.json, model.safetensors}`` for two weight sets — ``f32_untied`` (float32,
separate output head) and ``bf16_tied`` (bfloat16 storage, tied embeddings) — and ``OUT/golden.npz`` with
``tokens`` int32 [B, T] and, per case ``<weights>-<rope>``, ``config/<case>`` (the config.json text that
case runs with) and ``logits/<case>`` float32 [B, T, V] from LlamaForCausalLM in float32. The model: 2
layers, D = 32, 2 query heads and 1 kv head (GQA, head dim 16), F = 64, V = 160 (lcjax pads it to 256),
weights ~ N(0, 0.3²) and RMSNorm weights 1 + N(0, 0.3²), so attention is far from uniform and RoPE matters.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

B, T, V = 2, 16, 160
ROPES = {  # case -> transformers rope_parameters (+ max_position_embeddings)
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, 64),
    "linear": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, 64),
    "dynamic": ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 8),  # T > 8: base grows
    "yarn": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 2048},
             8192),
    "llama3": ({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, 256),
}
WEIGHTS = {"f32_untied": (False, "float32", list(ROPES)), "bf16_tied": (True, "bfloat16", ["default", "yarn"])}


def tiny_config(rope: dict, max_position: int, tied: bool):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=max_position, rms_norm_eps=1e-5, initializer_range=0.3,
        tie_word_embeddings=tied, rope_parameters=dict(rope), bos_token_id=0, eos_token_id=1)


def tiny_model(cfg, seed: int, bf16: bool):
    """A random LlamaForCausalLM in float32 (weights rounded through bfloat16 when ``bf16``)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            if bf16:
                p.copy_(p.to(torch.bfloat16).float())
    return model


def logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def main() -> None:
    import torch
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out",
                        default=str(Path(__file__).resolve().parents[1] / "tests" / "convert" / "data" / "hf_tiny"))
    out = Path(parser.parse_args().out)
    tokens = np.random.default_rng(0).integers(0, V, (B, T)).astype(np.int32)
    arrays = {"tokens": tokens}
    for seed, (weights, (tied, dtype, ropes)) in enumerate(WEIGHTS.items()):
        base = tiny_model(tiny_config(*ROPES["default"], tied), seed, dtype == "bfloat16")
        folder = out / weights
        base.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
        base.float()
        for rope in ropes:
            cfg = tiny_config(*ROPES[rope], tied)
            model = transformers.LlamaForCausalLM(cfg).eval()
            model.load_state_dict(base.state_dict())
            case = f"{weights}-{rope}"
            arrays[f"logits/{case}"] = logits(model, tokens)
            arrays[f"config/{case}"] = np.array(cfg.to_json_string())
            print(f"{case}: max |logit| {np.abs(arrays[f'logits/{case}']).max():.3f}")
    np.savez_compressed(out / "golden.npz", **arrays)
    print(f"wrote {out} (transformers {transformers.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
