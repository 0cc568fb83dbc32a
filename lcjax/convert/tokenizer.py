"""Tokenizers across the Hugging Face boundary: an HF model's ``tokenizer.json`` as an lcjax Tokenizer (its own
EOS token instead of ``<|endoftext|>``), and the files ``transformers.AutoTokenizer`` needs beside an exported
``tokenizer.json`` (:func:`complete_tokenizer_files`)."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers

from lcjax.data.tokenizer import Tokenizer


class HFTokenizer(Tokenizer):
    """lcjax's Tokenizer interface over any ``tokenizers`` tokenizer, with an explicit EOS id."""

    def __init__(self, hf: tokenizers.Tokenizer, eos_id: int):
        hf.encode_special_tokens = True  # special-token strings in text are ordinary text
        self._hf = hf
        self.eos_id = int(eos_id)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)


def load_hf_tokenizer(hf_dir: str | Path) -> HFTokenizer:
    """``HF_DIR/tokenizer.json`` with EOS from config.json (``eos_token_id``) or tokenizer_config.json."""
    hf_dir = Path(hf_dir)
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{path}: no tokenizer.json (only the fast-tokenizer format is read)")
    hf = tokenizers.Tokenizer.from_file(str(path))
    eos = None
    if (hf_dir / "config.json").is_file():
        eos = json.loads((hf_dir / "config.json").read_text()).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
    if eos is None and (hf_dir / "tokenizer_config.json").is_file():
        token = json.loads((hf_dir / "tokenizer_config.json").read_text()).get("eos_token")
        token = token.get("content") if isinstance(token, dict) else token
        eos = hf.token_to_id(token) if token else None
    if eos is None:
        raise ValueError(f"{hf_dir}: no EOS token (config.json eos_token_id or tokenizer_config.json eos_token)")
    return HFTokenizer(hf, eos)


def complete_tokenizer_files(folder: str | Path, *, max_length: int) -> int | None:
    """Add what ``transformers.AutoTokenizer.from_pretrained(folder)`` needs beside ``folder/tokenizer.json``:
    ``tokenizer_config.json`` (``PreTrainedTokenizerFast``, the EOS token, ``model_max_length`` =
    ``max_length``, no BOS/EOS added by ``encode``, as lcjax trained) and ``special_tokens_map.json``; files
    already there (from an imported model) are kept. Returns the EOS id (None without a tokenizer.json).
    Raises ValueError when the tokenizer has no EOS token."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        return None
    tok = Tokenizer.load(folder, field="tokenizer")
    eos = tok.decode([tok.eos_id])
    files = {
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
                                  "model_max_length": int(max_length), "add_bos_token": False,
                                  "add_eos_token": False, "clean_up_tokenization_spaces": False},
        "special_tokens_map.json": {"eos_token": eos},
    }
    for name, content in files.items():
        if not (folder / name).is_file():
            (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    return tok.eos_id
