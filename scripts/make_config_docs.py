"""Write docs/configs.md from the config dataclasses of lcjax/config.py: every key, its type, its default, and
what it means and which rule it must satisfy.

    python scripts/make_config_docs.py            # (re)write docs/configs.md
    python scripts/make_config_docs.py --check    # exit 1 if docs/configs.md is not what this writes now

The keys, types, defaults and section texts come from the dataclasses themselves (``dataclasses.fields``,
recursively), so a key added to lcjax/config.py appears after re-running this script with no other change.
:data:`DESCRIPTIONS` adds a sentence per key, and the rule that :func:`lcjax.config.validate` enforces, in
words; keys without an entry get their type and default only. tests/core/test_config_docs.py fails when the
committed file is out of date.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lcjax import config as C  # noqa: E402

OUT = ROOT / "docs" / "configs.md"


def choices(name: str) -> str:
    """``one of `a`, `b` `` from the tuple ``lcjax.config.<name>`` (e.g. ATTENTION_IMPLS)."""
    return "one of " + ", ".join(f"`{v}`" for v in getattr(C, name, ("(see lcjax/config.py)",)))



# key -> (what it means, the rule it must satisfy in words; "" for none beyond its type)
DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "name": ("Run name: the default run directory is `runs/<name>-<UTC time>`. Defaults to the config file's "
             "name.", "A plain file name: no `/`, not starting with `.`."),
    "mesh.data": ("Devices along `data` (data parallel: the global batch is split over them).",
                  ">= 1; divides `data.global_batch`. The product of the three mesh sizes is the number of "
                  "devices used."),
    "mesh.sequence": ("Devices along `sequence` (sequence parallel: every sequence's tokens are split over "
                      "them; attention over them by `attention.impl`).",
                      ">= 1 (any `data.seq_len`: windows are padded to the layout); 1 for "
                      "`attention.impl: local`."),
    "mesh.model": ("Devices along `model` (tensor parallel: heads, MLP width and vocabulary are split over "
                   "them).", ">= 1; divides `model.n_heads`, `model.d_ff` and the padded vocabulary; divides "
                   "`model.n_kv_heads` or is a multiple of it."),
    "model.n_layers": ("L, decoder layers (stored stacked, run by `lax.scan`).", ">= 1."),
    "model.d_model": ("D, the model width.", ">= 1; divisible by `model.n_heads` with an even head dim "
                      "D/N (RoPE); with `train.fsdp` or `train.shard_optimizer`, divisible by "
                      "`mesh.data` x `mesh.sequence`."),
    "model.n_heads": ("N, query heads.", ">= 1; divisible by `model.n_kv_heads` and by `mesh.model`."),
    "model.n_kv_heads": ("K, key/value heads (grouped-query attention; K = N is multi-head attention).",
                         ">= 1; divides `model.n_heads`; divisible by `mesh.model`, or divides it when "
                         "smaller (the kv heads are then replicated over TP)."),
    "model.d_ff": ("F, the SwiGLU MLP's hidden width.", ">= 1; divisible by `mesh.model`."),
    "model.vocab_size": ("V, the vocabulary size (padded to a multiple of 128 inside the model, whatever "
                         "the mesh).", ">= 1; at least the tokenizer's size (checked when training starts); "
                         "`mesh.model` divides the padded size."),
    "model.tie_embeddings": ("Use the embedding table as the output head (no separate `lm_head`).", ""),
    "model.norm_eps": ("ε of RMSNorm.", "A finite number > 0."),
    "model.init_std": ("Standard deviation of the normal initialisation of every matrix.",
                       "A finite number > 0."),
    "model.rope.base": ("b, the RoPE base (θ_i = b^(−2i/H)); changing it alone is ABF.",
                        "A finite number > 1."),
    # model.rope scaling keys (branch hf; listed ahead of the merge)
    "model.rope.type": ("RoPE scaling for longer contexts (lcjax.ops.rope, docs/rope.md): `default` (none), "
                        "`linear` (position interpolation), `ntk`, `dynamic` (dynamic NTK), `yarn`, `llama3`.",
                        "One of those; `factor` 1 for `default`."),
    "model.rope.factor": ("s, the context extension factor of the scaling.", "A finite number >= 1."),
    "model.rope.original_max_position": ("L, the pre-training context (yarn, llama3, dynamic).",
                                         ">= 1 for yarn, llama3 and dynamic; null for the other types."),
    "model.rope.beta_fast": ("YaRN: pairs rotating more than this many times in L keep their frequency.",
                             "Finite and > `model.rope.beta_slow` > 0 (yarn)."),
    "model.rope.beta_slow": ("YaRN: pairs rotating fewer than this many times in L are interpolated.",
                             "> 0 and < `model.rope.beta_fast` (yarn)."),
    "model.rope.attention_factor": ("YaRN: factor on cos and sin; null: 0.1·ln(factor) + 1.",
                                    "null, or a finite number > 0 with type yarn."),
    "model.rope.low_freq_factor": ("LLaMA 3.1 scaling: wavelengths above L / this are interpolated.",
                                   "> 0 and < `model.rope.high_freq_factor` (llama3)."),
    "model.rope.high_freq_factor": ("LLaMA 3.1 scaling: wavelengths below L / this keep their frequency.",
                                    "Finite and > `model.rope.low_freq_factor` (llama3)."),
    "attention.impl": ("Attention over the `sequence` axis: `ring` (K/V travel by ppermute), `ulysses` "
                       "(all-to-all heads ⇄ sequence), `hybrid` (Ulysses inside groups of "
                       "`attention.ulysses_size`, ring across them), `allgather` (K/V of every shard gathered, "
                       "Llama 3 style; any layout and mask; with `attention.ulysses_size`, all-to-all inside "
                       "groups and the K/V gathered across them), `local` (no sequence parallelism).",
                       f"{choices('ATTENTION_IMPLS')}; `local` needs `mesh.sequence` = 1; `ulysses`, "
                       "`hybrid` (and `allgather` with `attention.ulysses_size`) need the query heads per model "
                       "shard (and the kv heads, or the group size) divisible by the Ulysses group."),
    "attention.layout": ("Order of the tokens across sequence shards: `zigzag` (2·SP chunks, shard i holds "
                         "chunks i and 2·SP−1−i: balanced causal work), `striped` (token t on shard t mod "
                         "SP), `contiguous`, `balanced` (the loader assigns 128-token chunks of each packed window to shards so "
                         "the masked causal + document + window work is equal: lcjax.data.balance).",
                         f"{choices('LAYOUTS')}."),
    "attention.kernel": ("The per-device blockwise attention kernel: `xla` (portable), `pallas_triton` (Pallas "
                         "Triton-backend flash kernels for GPUs; interpret mode elsewhere), `pallas` (the best "
                         "verified Pallas kernel for the GPUs: today `pallas_triton`), `pallas_mosaic` (Pallas Mosaic GPU "
                         "kernels for H100/H200, opt-in until GPU parity is verified; bf16, head dim a multiple of 64; "
                         "JAX's Mosaic GPU interpreter elsewhere) or `cudnn` (cuDNN fused "
                         "attention per block, GPUs with cuDNN only: docs/kernels.md).",
                         f"{choices('KERNELS')}. `cudnn` needs `train.dtype: bfloat16`, a head dim that is a "
                         "multiple of 8 and <= 256, `data.cross_document_attention: true`, a `data.seq_len` the "
                         "layout splits without padding and, on several sequence shards, layout `contiguous` or "
                         "`zigzag`, impl `ring`, `hybrid` or `ulysses` (`ulysses`, and `hybrid` with `ulysses_size` = "
                         "`mesh.sequence`, only with `contiguous`) and no `attention.window` unless the ring has one "
                         "position."),
    "attention.window": ("Sliding window W: a query at position p sees keys p−W+1 … p; null: no window.",
                         "null or >= 1."),
    "attention.ulysses_size": ("Shards per all-to-all group of `attention.impl: hybrid` (a ring across the "
                               "groups) or `allgather` (K/V gathered across the groups: the gathered K/V and "
                               "their traffic ÷ the group size); null for `allgather`: no groups.",
                               "Set only for `hybrid` (required) and `allgather`, where it must divide "
                               "`mesh.sequence`."),
    "attention.block_q": ("Query tile of the kernel; null: the kernel's own tiles (512 for `xla`, the tuned "
                          "table lcjax/kernels/flash_attention/triton_tiles.json for the Triton kernels, the whole "
                          "block for `cudnn`: the half blocks in the zigzag ring). An integer overrides them "
                          "(clipped to a divisor of the local length for `xla` and `cudnn`, to a power of two in "
                          "[16, 128] for the Triton kernels).", "null or >= 1."),
    "attention.block_k": ("Key tile of the kernel; null: the kernel's own tiles (as `attention.block_q`).",
                          "null or >= 1."),
    "data.source": ("The corpus: `stdlib` (the Python standard library's source), `files:PATH[,PATH...]` "
                    "(text files and folders, one document per file), `jsonl:PATH[,PATH...]` / "
                    "`parquet:PATH[,PATH...]` (one document per line / row; files or folders) or "
                    "`tfds:NAME[/CONFIG]` (a prepared TFDS dataset, docs/data.md).",
                    "One of those forms; left at `stdlib` when `data.mixture` is used."),
    "data.text_field": ("The JSON field / Parquet column holding each record's text (`jsonl:` and `parquet:` "
                        "sources, all of a mixture's).", "Not empty."),
    "data.mixture": ("Weighted sources used instead of `data.source`: a list of `{source: FORM, weight: W}`, "
                     "e.g. `--set 'data.mixture=[{source: \"jsonl:a\", weight: 3}, {source: \"parquet:b\", "
                     "weight: 1}]'`; the weights (normalised) are the sources' shares of the mixed tokens "
                     "(docs/data.md); `[]`: `data.source` alone.",
                     "Every source one of the `data.source` forms, every weight a finite number > 0."),
    "data.upsample_long.min_tokens": ("Documents of at least this many tokens (EOS not counted) are "
                                      "upsampled by `data.upsample_long.factor`; 0: off.", ">= 0."),
    "data.upsample_long.factor": ("How many times as often a long document appears in the token stream "
                                  "(a fractional part is a seeded draw per document).", "A finite number >= 1."),
    "log.every": ("A log line (step, loss, lr, grad norm, tokens/s, MFU, memory, ETA) every this many "
                  "optimizer steps when the progress bar is off (`--no-progress`) or stderr is not a terminal.",
                  ">= 1."),
    "log.wandb.project": ("W&B project to log every metrics record to (needs the `wandb` extra); null: no "
                          "W&B.", "null or a non-empty name."),
    "log.wandb.name": ("W&B run name; null: the run directory's name.", ""),
    "log.wandb.mode": ("`online`, or `offline` (written under `<run dir>/wandb/` without a network; "
                       "`wandb sync` uploads it later).", f"{choices('WANDB_MODES')}."),
    "data.tokenizer": ("`bpe` (byte-level BPE trained on the corpus and cached), `bytes` (256 bytes + EOS) "
                       "or a path to a Hugging Face tokenizer.json (or a folder holding one).",
                       f"{choices('TOKENIZERS')}, or a path (contains `/` or ends in `.json`)."),
    "data.seq_len": ("T, tokens per training sequence (documents are packed into windows of T). The loader "
                     "pads each window to what the layout needs (a multiple of `mesh.sequence`; zigzag: of "
                     "2 x `mesh.sequence`; balanced: of `mesh.sequence` x its chunk) with padding that no real "
                     "token sees and that carries no loss.", ">= 1 (any length, on any mesh)."),
    "data.global_batch": ("B, sequences per optimizer step, over all devices.",
                          ">= 1; divisible by `mesh.data`."),
    "data.seed": ("Seed of the data order (window shuffling).", ""),
    "data.cross_document_attention": ("Let packed documents attend to each other (positions then run across "
                                      "the whole window) instead of masking by document.", ""),
    "data.cache_dir": ("Where tokenized corpora and trained tokenizers are cached; null: `$LCJAX_CACHE` or "
                       "`~/.cache/lcjax`.", ""),
    "data.data_dir": ("TFDS data dir of `tfds:` sources; null: `$TFDS_DATA_DIR` or `~/tensorflow_datasets`.",
                      ""),
    "data.workers": ("Grain worker processes; 0: threads in the training process.", ">= 0."),
    "train.steps": ("Optimizer steps of the run (the last step's number).",
                    ">= 1; with `--resume`, greater than the newest checkpoint's step."),
    "train.lr": ("Peak learning rate of AdamW.", "A finite number > 0."),
    "train.warmup_steps": ("Steps of linear warm-up from 0 to `train.lr`.", ">= 0."),
    "train.min_lr_ratio": ("The cosine decay ends at `train.lr` x this.", "In [0, 1]."),
    "train.weight_decay": ("AdamW's decoupled weight decay.", "A finite number >= 0."),
    "train.b1": ("AdamW's β1.", "In [0, 1)."),
    "train.b2": ("AdamW's β2.", "In [0, 1)."),
    "train.grad_clip": ("Gradients are clipped to this global L2 norm.", "A finite number > 0."),
    "train.seed": ("Seed of the parameter initialisation (values do not depend on the mesh).", ""),
    "train.dtype": ("Compute dtype of activations, matmuls and parameter all-gathers (the loss, softmax "
                    "statistics and optimizer stay float32).", f"{choices('DTYPES')}."),
    "train.param_dtype": ("Dtype the parameters are stored in (float32: float32 master weights).",
                          f"{choices('DTYPES')}."),
    "train.remat": ("Rematerialisation policy of the layer body: `full` saves only each layer's input, "
                    "`dots` also the matmul outputs, `attention` also the attention outputs (docs/memory.md).",
                    f"{choices('REMAT_POLICIES')}."),
    "train.fsdp": ("FSDP / ZeRO-3: parameters, gradients and optimizer state split over data x sequence, "
                   "parameters all-gathered per layer.", "Needs `model.d_model` divisible by `mesh.data` x "
                   "`mesh.sequence`."),
    "train.shard_optimizer": ("ZeRO-1/2: gradients and optimizer state split over data x sequence, "
                              "parameters replicated.", "Needs `model.d_model` divisible by `mesh.data` x "
                              "`mesh.sequence`."),
    "train.loss_tile": ("Compute the cross-entropy over tiles of this many tokens per shard (the logits "
                        "never exist whole); 0: untiled.", "0, or a divisor of the padded `data.seq_len` / "
                        "`mesh.sequence`."),
    "train.mlp_tile": ("Compute the MLP over tiles of this many tokens per shard; 0: untiled.",
                       "0, or a divisor of the padded `data.seq_len` / `mesh.sequence`."),
    "train.offload": ("Where the residuals the remat policy saves live: `none` device memory, `layer` each "
                      "layer's input in pinned host memory, `saved` every saved residual there (docs/memory.md, "
                      "\"One node\").", "one of `none`, `layer`, `saved`; not `none` needs `train.remat` other "
                      "than `none`."),
    "train.seq_chunk": ("Tokens per shard of each chunk of everything outside attention (norms, QKV and RoPE, "
                        "output projection, MLP); 0: whole.", "0, or a divisor of the padded `data.seq_len` / "
                        "`mesh.sequence`."),
    "train.head_chunks": ("Run the attention over this many groups of heads one after another (smaller "
                          "float32 accumulators); 1: all at once.", ">= 1, divides the kv heads per model shard; "
                          "> 1 needs `attention.impl` ring or local."),
    "train.grad_accum": ("Micro-batches per optimizer step: the global batch is split into that many and "
                         "their gradients summed inside the jitted step (the same update as the whole batch).",
                         ">= 1; divides the sequences per data shard, `data.global_batch` / `mesh.data`."),
    "eval.every": ("Validate every this many optimizer steps; 0: never.", ">= 0."),
    "eval.batches": ("Global batches of the held-out split averaged per validation.", ">= 1."),
    "eval.holdout": ("Fraction of the corpus held out for validation (the last whole documents; never "
                     "trained on).", "In (0, 0.5)."),
    "train.max_bad_steps": ("The run stops (exit code 3) after this many non-finite, skipped steps in a row "
                            "(branch rel; listed ahead of the merge).", ">= 1."),
    "train.check_memory": ("Before anything is allocated or written, refuse (exit 2) a train step, PassKey "
                           "evaluation or generation whose XLA-compiled per-device memory exceeds what the "
                           "devices have (GPU: memory_stats; CPU: the host's MemAvailable shared by the "
                           "simulated devices); false skips the check.", "true or false."),
    "checkpoint.every": ("Save a checkpoint every this many steps (and always after the last step).", ">= 1."),
    "checkpoint.keep": ("Keep the newest this many checkpoints.", ">= 1."),
}


def type_name(tp) -> str:
    """int, float, str, bool; ``Optional[X]`` as ``X or null``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args) + (" or null" if len(args) < len(typing.get_args(tp))
                                                           else "")
    return getattr(tp, "__name__", str(tp))


def yaml_value(value) -> str:
    """A default as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    return repr(value)


def markdown(text: str) -> str:
    """A docstring as one markdown paragraph (RST ``code`` becomes `code`)."""
    return " ".join(inspect.cleandoc(text or "").split()).replace("``", "`")


def rows(cls, prefix: str = ""):
    """(key, type, default) of every leaf field of the dataclass ``cls``, and (key, class) of every nested
    section, in declaration order, depth first."""
    hints = typing.get_type_hints(cls)
    leaves, sections = [], []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            sections.append((key, tp))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            leaves.append((key, type_name(tp), yaml_value(default)))
    return leaves, sections


def row(key: str, tp: str, default: str) -> str:
    """One table row: key, type, default, meaning and rule (``|`` escaped)."""
    meaning, rule = (text.replace("|", "\\|") for text in DESCRIPTIONS.get(key, ("", "")))
    return f"| `{key}` | {tp} | `{default}` | {meaning} | {rule} |"


def keys(cls=C.Config, prefix: str = "") -> list[str]:
    """Every leaf key of the config, dotted."""
    leaves, sections = rows(cls, prefix)
    return [k for k, _, _ in leaves] + [k for key, sub in sections for k in keys(sub, f"{key}.")]


def section(title: str, cls, prefix: str, level: int = 2) -> list[str]:
    leaves, sections = rows(cls, prefix)
    lines = [f"{'#' * level} {title}", "", markdown(cls.__doc__), ""]
    if leaves:
        lines += ["| key | type | default | meaning | rule |", "|---|---|---|---|---|"]
        for key, tp, default in leaves:
            lines.append(row(key, tp, default))
        lines.append("")
    for key, sub in sections:
        lines += section(f"`{key}`", sub, f"{key}.", level + 1)
    return lines


def render() -> str:
    """The text of docs/configs.md."""
    top, sections = rows(C.Config)
    lines = [
        "# Configuration keys",
        "",
        "<!-- Generated by scripts/make_config_docs.py from lcjax/config.py; do not edit by hand. -->",
        "",
        "A run is configured by a YAML file (`--config FILE`, which may list `defaults: [other.yaml, ...]` to "
        "merge first) and dotted overrides (`--set model.n_layers=2`, repeatable). Every key below is a field "
        "of the frozen dataclasses in `lcjax/config.py`; an unknown key, a wrong type or a broken rule stops "
        "the command with one line naming the key and the rule (exit code 2) before anything is written. "
        "The resolved config is saved as `<run dir>/config.yaml`.",
        "",
        markdown(C.Config.__doc__),
        "",
        "| key | type | default | meaning | rule |",
        "|---|---|---|---|---|",
        *(row(key, tp, default) for key, tp, default in top),
        "",
    ]
    for key, cls in sections:
        lines += section(f"`{key}`", cls, f"{key}.")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configs.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    stale = sorted(set(DESCRIPTIONS) - set(keys()))
    if stale:
        print(f"note: DESCRIPTIONS names keys that are not config fields here: {', '.join(stale)}",
              file=sys.stderr)
    if args.check:
        current = OUT.read_text() if OUT.is_file() else ""
        if current != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run python scripts/make_config_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
