"""Typed, frozen run configuration: YAML files merged with dotted ``--set`` overrides, then validated.

Loading goes through OmegaConf structured configs (unknown keys and wrong types are caught there); the
rules that relate keys to each other (divisibility by the mesh, head counts, layouts) are ours and live in
:func:`validate`. Every problem is reported as one ``ValueError`` line naming the key and the rule, which
the CLI prints and turns into exit code 2.

This module imports no other lcjax module but :mod:`lcjax.choices`, the choice lists it validates against
(docs/design.md, "Layout of the repository"). OmegaConf is imported
only by the functions that load or print YAML, so the dataclasses and :func:`validate` work on a host
without it (the GPU host has jax, flax, optax and orbax but none of our data dependencies).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from lcjax.choices import (ATTENTION_IMPLS, AXES, DKV_DTYPES, DTYPES, KERNELS, LAYOUTS, OFFLOAD_MODES,  # noqa: F401
                           REMAT_POLICIES, ROPE_TYPES)

BALANCE_CHUNK = 128  # tokens per chunk of the balanced layout: the Triton kernels' H100 bf16 forward tile
BALANCE_MIN_CHUNKS = 4  # chunks per sequence shard at least, for short windows (smaller chunks then)
TILE_GRAIN = 128  # tokens: a run of at most this is one tile of any kernel
MIN_BLOCK = 16  # the XLA kernel's blocks divide each run: longer runs get a divisor of 16…128 tokens
TOKENIZERS = ("bpe", "bytes")
VOCAB_MULTIPLE = 128  # the vocabulary is padded to a multiple of this whatever the mesh


@dataclass(frozen=True)
class MeshConfig:
    """Sizes of the three mesh axes; their product is the number of devices."""

    data: int = 1
    sequence: int = 1
    model: int = 1


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding (Su et al. 2021, arXiv:2104.09864): θ_i = base^(−2i/H), and its scaling for
    longer contexts (lcjax.ops.rope, docs/rope.md): ``type`` default (change ``base`` for ABF), linear (PI),
    ntk, dynamic, yarn or llama3; ``factor`` s; ``original_max_position`` L (yarn, llama3, dynamic);
    ``beta_fast``/``beta_slow`` and ``attention_factor`` (yarn; null: 0.1·ln s + 1);
    ``low_freq_factor``/``high_freq_factor`` (llama3)."""

    type: str = "default"
    base: float = 10000.0
    factor: float = 1.0
    original_max_position: Optional[int] = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclass(frozen=True)
class ModelConfig:
    """LLaMA decoder shape: L = n_layers, D = d_model, N = n_heads, K = n_kv_heads, F = d_ff, V = vocab_size."""

    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 8
    n_kv_heads: int = 2
    d_ff: int = 768
    vocab_size: int = 4096
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    rope: RopeConfig = field(default_factory=RopeConfig)


@dataclass(frozen=True)
class AttentionConfig:
    """How attention runs over the ``sequence`` axis (see lcjax.attention.attention)."""

    impl: str = "ring"
    layout: str = "zigzag"
    kernel: str = "xla"
    window: Optional[int] = None
    ulysses_size: Optional[int] = None
    block_q: Optional[int] = None  # None: the kernel's own (tuned) tiles
    block_k: Optional[int] = None
    dkv_dtype: str = "float32"  # dtype of the dK/dV partial sums on the backward ring's wire (or bfloat16)


@dataclass(frozen=True)
class MixtureSource:
    """One source of ``data.mixture``: a ``data.source`` form and its weight (the sources' weights, normalised,
    are their shares of the mixed token stream)."""

    source: str = ""
    weight: float = 1.0


@dataclass(frozen=True)
class UpsampleConfig:
    """Length-based upsampling (ProLong, Llama 3): documents of at least ``min_tokens`` tokens appear
    ``factor`` times as often in the token stream (a fractional part is a seeded draw per document);
    ``min_tokens`` 0: off."""

    min_tokens: int = 0
    factor: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer and batching (docs/data.md). ``global_batch`` sequences of ``seq_len`` tokens per step.

    ``source``: ``stdlib``, ``files:PATH[,PATH...]``, ``jsonl:PATH[,PATH...]``, ``parquet:PATH[,PATH...]`` (the
    text in field/column ``text_field``) or ``tfds:NAME[/CONFIG]`` (under ``data_dir``, default
    ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``); ``mixture``: weighted sources used instead of ``source``;
    ``upsample_long``: long documents repeated; ``tokenizer``: ``bpe``, ``bytes`` or a path to a Hugging
    Face tokenizer.json; ``workers``: Grain worker processes (0: threads in the training process).

    ``passkey_fraction``: share of windows turned into PassKey retrieval examples (the window's text as
    filler, or for a share ``passkey_synthetic`` of them the standard synthetic sentences; loss on the
    answer only; lcjax.data.passkey). ``curriculum``: ``[[until_step, seq_len, global_batch], ...]``, the
    window length and batch of steps up to ``until_step`` (increasing); later steps use ``seq_len`` and
    ``global_batch`` (docs/evaluation.md).
    """

    source: str = "stdlib"
    text_field: str = "text"
    mixture: List[MixtureSource] = field(default_factory=list)
    upsample_long: UpsampleConfig = field(default_factory=UpsampleConfig)
    tokenizer: str = "bpe"
    seq_len: int = 4096
    global_batch: int = 1
    seed: int = 0
    cross_document_attention: bool = False
    cache_dir: Optional[str] = None
    data_dir: Optional[str] = None
    workers: int = 0
    passkey_fraction: float = 0.0
    passkey_synthetic: float = 0.5
    curriculum: List[List[int]] = field(default_factory=list)


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer (AdamW, linear warmup then cosine decay to ``lr * min_lr_ratio``), run length and memory.

    Memory options (docs/memory.md): ``dtype`` is the compute dtype of activations and matmuls;
    ``param_dtype`` the stored parameters' (float32: float32 master weights; bfloat16: no master copy, the
    optimizer state stays float32 either way); ``remat`` the per-layer rematerialisation policy (none;
    layer: save only each layer's input, the backward re-runs the ring forward too; full: the layer input
    and the ring's (out, lse), so the ring never runs twice; attention: also q, k, v; dots: the ring's
    residuals and every matmul output — table in docs/memory.md); ``fsdp`` shards parameters, gradients and optimizer state over data x sequence (ZeRO-3);
    ``shard_optimizer`` shards gradients and optimizer state only (ZeRO-1/2); ``loss_tile`` / ``mlp_tile``
    compute the cross-entropy / MLP over the sequence in tiles of that many tokens per shard (0: whole).
    ``offload``: where the residuals the remat policy saves live (none: device memory; layer: the layer
    inputs in pinned host memory; saved: every saved residual in pinned host memory; needs ``remat`` other
    than none). ``seq_chunk``: tokens per shard of each chunk of everything outside attention (norms,
    QKV/RoPE, output projection, MLP, final norm; 0: whole), so a layer's working set outside attention is
    O(seq_chunk) rather than O(seq_len / mesh.sequence). ``head_chunks``: the attention runs over that many
    groups of heads one after another (1: all at once), so its float32 accumulators are those of
    n_heads / head_chunks heads (ring or local attention; must divide the kv heads per model shard).
    ``grad_reduce_dtype``: the dtype gradients travel in when they are summed over data × sequence (the
    all-reduce, or the ZeRO-1/2 reduce-scatter; float32, or bfloat16 for half the bytes, each shard's
    partial rounded once; docs/performance.md has its measured effect on the loss). Under ``fsdp`` the
    reduce-scatter is the transpose of the per-layer weight all-gather and runs in ``dtype``.
    ``grad_accum``: micro-batches per optimizer step (the global batch is split into that many, their
    gradients summed inside the jitted step; same update as the whole batch).
    ``sequence_parallel_tp``: with mesh.model > 1, the hidden states between the tensor-parallel regions
    (norms, residual adds) are split over the model shards along tokens too, and the TP all-reduces become
    all-gathers and reduce-scatters overlapped with the projections (docs/parallelism.md); it applies when
    the tokens per sequence shard divide by mesh.model and train.seq_chunk is 0, else the layers all-reduce.
    """

    steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    fsdp: bool = False
    shard_optimizer: bool = False
    loss_tile: int = 0
    mlp_tile: int = 0
    offload: str = "none"
    seq_chunk: int = 0
    head_chunks: int = 1
    grad_reduce_dtype: str = "float32"
    grad_accum: int = 1
    sequence_parallel_tp: bool = True
    max_bad_steps: int = 5  # a run stops after this many non-finite (skipped) steps in a row
    check_memory: bool = True  # refuse a step whose compiled memory exceeds the devices' (lcjax.memcheck)


@dataclass(frozen=True)
class EvalConfig:
    """Validation: every ``every`` optimizer steps (0: never) the mean loss over ``batches`` global batches
    of a held-out split — the last whole documents holding a ``holdout`` fraction of the corpus, never
    trained on."""

    every: int = 0
    batches: int = 4
    holdout: float = 0.01


@dataclass(frozen=True)
class CheckpointConfig:
    """Save every ``every`` steps and at the end; keep the newest ``keep`` checkpoints."""

    every: int = 100
    keep: int = 2


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging (the optional ``wandb`` extra): off while ``project`` is null; ``name`` the
    run's name (null: the run directory's name); ``mode`` online, or offline (written under the run dir,
    no network needed; ``wandb sync`` uploads it later)."""

    project: Optional[str] = None
    name: Optional[str] = None
    mode: str = "online"


@dataclass(frozen=True)
class LogConfig:
    """What the trainer reports while it runs: a log line every ``every`` optimizer steps (when the progress
    bar is off or stderr is not a terminal; metrics.jsonl and TensorBoard get every step) and W&B."""

    every: int = 1
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True)
class Config:
    """The whole run configuration (docs/design.md, "Config keys that scripts and checks use")."""

    name: str = "run"
    mesh: MeshConfig = field(default_factory=MeshConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config, merge ``key=value`` overrides (``model.n_layers=4``) and validate.

    A YAML file may contain ``defaults: [other.yaml, ...]`` (paths relative to it), merged first.
    Raises ValueError with one line naming the key and the rule: unknown key, wrong type, malformed
    override, unreadable file, or a rule of :func:`validate`.
    """
    from omegaconf import OmegaConf

    merged = OmegaConf.structured(Config)
    if path is not None:
        merged = _merge(merged, _read_yaml(Path(path)), str(path))
        if "name" not in _read_yaml(Path(path)):
            merged = _merge(merged, OmegaConf.create({"name": Path(path).stem}), "name")
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"--set {item!r} must have the form key=value")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"--set {item}")
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def _read_yaml(path: Path, seen: tuple = ()):
    from omegaconf import OmegaConf

    if not path.exists():
        raise ValueError(f"--config {path}: file does not exist")
    if not path.is_file():
        raise ValueError(f"--config {path}: not a file")
    if path.resolve() in seen:
        raise ValueError(f"--config {path}: 'defaults' includes itself")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and OmegaConf's own; reported as one line
        raise ValueError(f"--config {path}: not valid YAML ({yaml_problem(e)})") from None
    if not OmegaConf.is_dict(raw):
        raise ValueError(f"--config {path}: must be a mapping of config sections (mesh:, model:, ...)")
    defaults = raw.pop("defaults", [])
    base = OmegaConf.create({})
    for rel in defaults:
        base = _merge(base, _read_yaml(path.parent / rel, seen + (path.resolve(),)), str(path.parent / rel))
    return _merge(base, raw, str(path))


def yaml_problem(error: Exception) -> str:
    """One line for a YAML parse error: "line L, column C: problem" (1-based, from the error's marks)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or (str(error).splitlines() or [type(error).__name__])[0]
    context = getattr(error, "context", None)
    what = f"{problem} {context}" if context else problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


def _merge(base, other, origin: str):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        msg = str(e).splitlines()[0]
        if "not in" in msg:
            raise ValueError(f"{key}: unknown config key (from {origin})") from None
        if "Merge error" in msg or "subclass" in msg:
            msg = "must be a mapping of keys, not a single value"
        raise ValueError(f"{key}: {msg} (from {origin})") from None


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (what the run directory's ``config.yaml`` holds)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts."""
    return dataclasses.asdict(cfg)


def padded_vocab(vocab_size: int) -> int:
    """Vocabulary rounded up to a multiple of 128, independent of the mesh (so results are too)."""
    return math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def validate(cfg: Config) -> None:
    """Check the rules that relate keys to each other; raise ValueError naming the key and the rule."""
    for rule in _RULES:
        msg = rule(cfg)
        if msg:
            raise ValueError(msg)


def _positive(cfg: Config) -> str | None:
    checks = {
        "mesh.data": cfg.mesh.data, "mesh.sequence": cfg.mesh.sequence, "mesh.model": cfg.mesh.model,
        "model.n_layers": cfg.model.n_layers, "model.d_model": cfg.model.d_model,
        "model.n_heads": cfg.model.n_heads, "model.n_kv_heads": cfg.model.n_kv_heads,
        "model.d_ff": cfg.model.d_ff, "model.vocab_size": cfg.model.vocab_size,
        "data.seq_len": cfg.data.seq_len, "data.global_batch": cfg.data.global_batch,
        "train.steps": cfg.train.steps, "train.grad_accum": cfg.train.grad_accum,
        "checkpoint.every": cfg.checkpoint.every,
        "checkpoint.keep": cfg.checkpoint.keep, "train.max_bad_steps": cfg.train.max_bad_steps,
        **{f"attention.{k}": getattr(cfg.attention, k) for k in ("block_q", "block_k")
           if getattr(cfg.attention, k) is not None},  # None: the kernel's own tiles
        "log.every": cfg.log.every,
    }
    for key, value in checks.items():
        if value < 1:
            return f"{key} {value} must be >= 1"
    t = cfg.train
    # written as "not (x > bound)" so that NaN fails every rule
    floats = (("train.lr", t.lr, 0, False), ("train.grad_clip", t.grad_clip, 0, False),
              ("train.weight_decay", t.weight_decay, 0, True), ("model.norm_eps", cfg.model.norm_eps, 0, False),
              ("model.init_std", cfg.model.init_std, 0, False), ("model.rope.base", cfg.model.rope.base, 1, False))
    for key, value, bound, inclusive in floats:
        if not (value >= bound if inclusive else value > bound) or math.isinf(value):
            return f"{key} {value} must be a finite number {'>=' if inclusive else '>'} {bound}"
    for key, value in (("train.b1", t.b1), ("train.b2", t.b2)):
        if not 0 <= value < 1:
            return f"{key} {value} must be in [0, 1)"
    if cfg.eval.every < 0 or cfg.eval.batches < 1:
        return f"eval.every {cfg.eval.every} must be >= 0 (0: no validation) and eval.batches {cfg.eval.batches} >= 1"
    if not 0 < cfg.eval.holdout < 0.5:
        return f"eval.holdout {cfg.eval.holdout} must be a fraction of the corpus in (0, 0.5)"
    if t.warmup_steps < 0:
        return f"train.warmup_steps {t.warmup_steps} must be >= 0"
    if not 0 <= t.min_lr_ratio <= 1:
        return f"train.min_lr_ratio {t.min_lr_ratio} must be in [0, 1]"
    if not cfg.name or "/" in cfg.name or cfg.name.startswith("."):
        return f"name {cfg.name!r} must be a plain file name (no '/', not starting with '.')"
    return None


def _choices(cfg: Config) -> str | None:
    for key, value, allowed in (
        ("attention.impl", cfg.attention.impl, ATTENTION_IMPLS),
        ("attention.layout", cfg.attention.layout, LAYOUTS),
        ("attention.dkv_dtype", cfg.attention.dkv_dtype, DKV_DTYPES),
        ("attention.kernel", cfg.attention.kernel, KERNELS),
        ("train.dtype", cfg.train.dtype, DTYPES),
        ("train.param_dtype", cfg.train.param_dtype, DTYPES),
        ("train.grad_reduce_dtype", cfg.train.grad_reduce_dtype, DTYPES),
        ("train.remat", cfg.train.remat, REMAT_POLICIES),
        ("train.offload", cfg.train.offload, OFFLOAD_MODES),
    ):
        if value not in allowed:
            return f"{key} {value!r} must be one of {', '.join(allowed)}"
    if cfg.attention.window is not None and cfg.attention.window < 1:
        return f"attention.window {cfg.attention.window} must be >= 1 (or null for no window)"
    return None


def _heads(cfg: Config) -> str | None:
    m, tp = cfg.model, cfg.mesh.model
    if m.d_model % m.n_heads:
        return f"model.d_model {m.d_model} must be divisible by model.n_heads = {m.n_heads}"
    if (m.d_model // m.n_heads) % 2:
        return f"model.d_model / model.n_heads = {m.d_model // m.n_heads} (head dim) must be even for RoPE"
    if m.n_heads % m.n_kv_heads:
        return f"model.n_heads {m.n_heads} must be divisible by model.n_kv_heads = {m.n_kv_heads} (GQA)"
    if m.n_heads % tp:
        return f"model.n_heads {m.n_heads} must be divisible by mesh.model = {tp}"
    if m.n_kv_heads >= tp and m.n_kv_heads % tp:
        return f"model.n_kv_heads {m.n_kv_heads} must be divisible by mesh.model = {tp} (or smaller than it)"
    if m.n_kv_heads < tp and tp % m.n_kv_heads:
        return f"mesh.model {tp} must be divisible by model.n_kv_heads = {m.n_kv_heads} when it is larger"
    if m.d_ff % tp:
        return f"model.d_ff {m.d_ff} must be divisible by mesh.model = {tp}"
    if padded_vocab(m.vocab_size) % tp:
        return (f"mesh.model {tp} must divide the padded vocabulary {padded_vocab(m.vocab_size)} "
                f"(model.vocab_size rounded up to a multiple of {VOCAB_MULTIPLE})")
    return None


def _sequence(cfg: Config) -> str | None:
    sp, a = cfg.mesh.sequence, cfg.attention
    if a.impl == "local" and sp > 1:
        return f"attention.impl 'local' needs mesh.sequence = 1, got {sp} (use 'ring')"
    if cfg.data.global_batch % cfg.mesh.data:
        return (f"data.global_batch {cfg.data.global_batch} must be divisible by "
                f"mesh.data = {cfg.mesh.data}")
    accum = cfg.train.grad_accum
    if accum > 1 and (cfg.data.global_batch // cfg.mesh.data) % accum:
        return (f"train.grad_accum {accum} must divide the sequences per data shard, data.global_batch / "
                f"mesh.data = {cfg.data.global_batch // cfg.mesh.data}")
    return None


def _ulysses(cfg: Config) -> str | None:
    a, m, sp, tp = cfg.attention, cfg.model, cfg.mesh.sequence, cfg.mesh.model
    if a.impl == "hybrid" or (a.impl == "allgather" and a.ulysses_size is not None):
        if a.ulysses_size is None or a.ulysses_size < 1 or sp % a.ulysses_size:
            return (f"attention.ulysses_size {a.ulysses_size} must divide mesh.sequence = {sp} for impl "
                    f"{a.impl!r}")
    elif a.ulysses_size is not None:
        return (f"attention.ulysses_size is only used by attention.impl 'hybrid' and 'allgather' "
                f"(impl is {a.impl!r})")
    if a.impl not in ("ulysses", "hybrid") and a.ulysses_size is None:
        return None
    group = sp if a.impl == "ulysses" else a.ulysses_size
    heads, kv = m.n_heads // tp, max(m.n_kv_heads // tp, 1)
    if heads % group:
        return (f"attention.impl {a.impl!r} splits the {heads} query heads per model shard over {group} "
                f"shards: model.n_heads / mesh.model must be divisible by {group}")
    if kv % group and group % kv:
        return (f"attention.impl {a.impl!r}: the {kv} kv heads per model shard and the {group} Ulysses shards "
                f"must divide one another")
    return None


def _memory(cfg: Config) -> str | None:
    t, m = cfg.train, cfg.model
    group = cfg.mesh.data * cfg.mesh.sequence
    for key, on in (("train.fsdp", t.fsdp), ("train.shard_optimizer", t.shard_optimizer)):
        if on and m.d_model % group:
            return (f"{key}: model.d_model {m.d_model} must be divisible by mesh.data x mesh.sequence = "
                    f"{group} (parameters are sharded over it along d_model)")
    if t.offload != "none" and t.remat == "none":
        return (f"train.offload {t.offload!r} moves the residuals a remat policy saves: it needs train.remat "
                f"layer, full, attention or dots (it is 'none')")
    kv_local = max(m.n_kv_heads // cfg.mesh.model, 1)
    if t.head_chunks < 1 or kv_local % t.head_chunks:
        return (f"train.head_chunks {t.head_chunks} must be >= 1 and divide the kv heads per model shard, "
                f"max(model.n_kv_heads / mesh.model, 1) = {kv_local}")
    if t.head_chunks > 1 and cfg.attention.impl not in ("ring", "local"):
        return (f"train.head_chunks {t.head_chunks} needs attention.impl ring or local (the "
                f"{cfg.attention.impl!r} all-to-all splits the heads itself)")
    local = padded_seq_len(cfg.data.seq_len, cfg.attention.layout, cfg.mesh.sequence) // cfg.mesh.sequence
    for key, tile in (("train.loss_tile", t.loss_tile), ("train.mlp_tile", t.mlp_tile),
                      ("train.seq_chunk", t.seq_chunk)):
        if tile < 0 or (tile and local % tile):
            return (f"{key} {tile} must be 0 (no tiling) or divide the tokens per sequence shard, "
                    f"data.seq_len padded for the {cfg.attention.layout} layout / mesh.sequence = {local}")
    return None


SOURCE_PREFIXES = ("files:", "jsonl:", "parquet:", "tfds:")
SOURCE_FORMS = ("'stdlib', 'files:PATH[,PATH...]', 'jsonl:PATH[,PATH...]', 'parquet:PATH[,PATH...]' or "
                "'tfds:NAME[/CONFIG]'")
WANDB_MODES = ("online", "offline")


def _data(cfg: Config) -> str | None:
    d = cfg.data
    for key, source in (("data.source", d.source), *((f"data.mixture[{i}].source", m.source)
                                                       for i, m in enumerate(d.mixture))):
        if not (source == "stdlib" or source.startswith(SOURCE_PREFIXES)):
            return f"{key} {source!r} must be {SOURCE_FORMS}"
    if d.mixture and d.source != "stdlib":
        return (f"data.source {d.source!r} and data.mixture exclude each other: name every source in "
                f"data.mixture (and leave data.source at its default)")
    for i, m in enumerate(d.mixture):
        if not (m.weight > 0) or math.isinf(m.weight):
            return f"data.mixture[{i}].weight {m.weight} must be a finite number > 0"
    u = d.upsample_long
    if u.min_tokens < 0 or not (u.factor >= 1) or math.isinf(u.factor):
        return (f"data.upsample_long: min_tokens {u.min_tokens} must be >= 0 (0: off) and factor {u.factor} a "
                f"finite number >= 1")
    if not d.text_field.strip():
        return "data.text_field must name the JSON field / Parquet column holding the text (default 'text')"
    if d.tokenizer not in TOKENIZERS and "/" not in d.tokenizer and not d.tokenizer.endswith(".json"):
        return (f"data.tokenizer {d.tokenizer!r} must be one of {', '.join(TOKENIZERS)} or a path to a "
                f"Hugging Face tokenizer.json (or a folder holding one)")
    if d.workers < 0:
        return f"data.workers {d.workers} must be >= 0 (0: no worker processes)"
    for key, value in (("data.passkey_fraction", d.passkey_fraction), ("data.passkey_synthetic", d.passkey_synthetic)):
        if not 0 <= value <= 1:
            return f"{key} {value} must be a fraction in [0, 1]"
    return None


def balance_chunk(seq_len: int, num_shards: int) -> int:
    """Tokens per chunk of the ``balanced`` layout for windows of ``seq_len`` tokens on ``num_shards``
    sequence shards: BALANCE_CHUNK, or for short windows the largest power of two that gives every shard
    at least BALANCE_MIN_CHUNKS chunks (so chunks and power-of-two kernel tiles nest; lcjax.data.balance
    assigns chunks to shards)."""
    fit = max(1, seq_len // (num_shards * BALANCE_MIN_CHUNKS))
    return min(BALANCE_CHUNK, 1 << (fit.bit_length() - 1))


def run_length(seq_len: int, pieces: int) -> int:
    """Tokens of each of a layout's ``pieces`` contiguous runs for a ``seq_len`` window: the least
    n >= seq_len / pieces that is one tile (n <= TILE_GRAIN) or has a divisor of MIN_BLOCK…TILE_GRAIN
    tokens (at most MIN_BLOCK − 1 more). The XLA kernel's blocks divide the run, so a prime run had
    one-token blocks: 4096 tokens in zigzag on 3 shards (runs of 683) trained 50× slower than the 4,104
    this gives (runs of 684 = 6 × 114)."""
    n = -(-seq_len // pieces)
    while n > TILE_GRAIN and not any(n % b == 0 for b in range(MIN_BLOCK, TILE_GRAIN + 1)):
        n += 1
    return n


def padded_seq_len(seq_len: int, layout: str, num_shards: int) -> int:
    """The window length the loader feeds the model for ``data.seq_len`` = ``seq_len``: the smallest
    length >= seq_len the layout splits evenly over ``num_shards`` (``mesh.sequence``) shards in runs the
    kernels tile well — 2·P runs for zigzag, P otherwise, each of :func:`run_length` tokens; for balanced a
    multiple of P·:func:`balance_chunk`. The loader fills the extra tokens with padding that no real token
    sees and that carries no loss (lcjax.data.loader.pad_window)."""
    if layout == "balanced":
        unit = num_shards * balance_chunk(seq_len, num_shards)
        return -(-seq_len // unit) * unit
    pieces = 2 * num_shards if layout == "zigzag" else num_shards
    return pieces * run_length(seq_len, pieces)


def stages(cfg: Config) -> list[tuple[int, int, int]]:
    """The curriculum as (until_step, seq_len, global_batch) stages, the last one (data.seq_len,
    data.global_batch) open-ended (until_step = train.steps or later)."""
    d = cfg.data
    last = max([cfg.train.steps, *(s[0] for s in d.curriculum)])
    return [tuple(s) for s in d.curriculum] + [(last, d.seq_len, d.global_batch)]


def _curriculum(cfg: Config) -> str | None:
    d, sp, dp = cfg.data, cfg.mesh.sequence, cfg.mesh.data
    previous = 0
    for i, stage in enumerate(d.curriculum):
        where = f"data.curriculum[{i}] {list(stage)}"
        if len(stage) != 3:
            return f"{where} must be [until_step, seq_len, global_batch]"
        until, seq_len, batch = stage
        if until <= previous:
            return f"{where}: until_step must be > {previous} (stages in increasing order)"
        if not 1 <= seq_len <= d.seq_len:
            return f"{where}: seq_len must be in [1, data.seq_len = {d.seq_len}]"
        per_shard = batch // dp if batch >= 1 and batch % dp == 0 else 0
        if not per_shard or per_shard % cfg.train.grad_accum:
            return (f"{where}: global_batch must be a positive multiple of mesh.data = {dp} whose share per "
                    f"data shard train.grad_accum = {cfg.train.grad_accum} divides")
        local = padded_seq_len(seq_len, cfg.attention.layout, sp) // sp
        for key, tile in (("train.loss_tile", cfg.train.loss_tile), ("train.mlp_tile", cfg.train.mlp_tile),
                          ("train.seq_chunk", cfg.train.seq_chunk)):
            if tile and local % tile:
                return f"{where}: {key} {tile} must divide the tokens per sequence shard, {local} (padded)"
        previous = until
    return None


def _rope(cfg: Config) -> str | None:
    r = cfg.model.rope
    if r.type not in ROPE_TYPES:
        return f"model.rope.type {r.type!r} must be one of {', '.join(ROPE_TYPES)}"
    finite = lambda x: not (math.isinf(x) or math.isnan(x))
    if not (r.factor >= 1) or not finite(r.factor):
        return f"model.rope.factor {r.factor} must be a finite number >= 1"
    if r.type == "default" and r.factor != 1:
        return f"model.rope.factor {r.factor} needs a scaling model.rope.type (it is 'default'), or factor 1"
    needs_length = r.type in ("yarn", "llama3", "dynamic")
    if needs_length and (r.original_max_position is None or r.original_max_position < 1):
        return (f"model.rope.original_max_position {r.original_max_position} must be >= 1 "
                f"for model.rope.type {r.type!r} (the pre-training context)")
    if not needs_length and r.original_max_position is not None:
        return f"model.rope.original_max_position is only used by types yarn, llama3, dynamic (type is {r.type!r})"
    if r.type == "yarn" and (not (0 < r.beta_slow < r.beta_fast) or not finite(r.beta_fast)):
        return f"model.rope.beta_fast {r.beta_fast} must be finite and > model.rope.beta_slow {r.beta_slow} > 0"
    if r.attention_factor is not None and (r.type != "yarn" or not (r.attention_factor > 0)
                                           or not finite(r.attention_factor)):
        return (f"model.rope.attention_factor {r.attention_factor} must be a finite number > 0, "
                f"and is only used by type yarn (null: 0.1·ln(factor) + 1)")
    if r.type == "llama3" and (not (0 < r.low_freq_factor < r.high_freq_factor) or not finite(r.high_freq_factor)):
        return (f"model.rope.high_freq_factor {r.high_freq_factor} must be finite and > "
                f"model.rope.low_freq_factor {r.low_freq_factor} > 0")
    return None


def _log(cfg: Config) -> str | None:
    w = cfg.log.wandb
    if w.mode not in WANDB_MODES:
        return f"log.wandb.mode {w.mode!r} must be one of {', '.join(WANDB_MODES)}"
    if w.project is not None and not w.project.strip():
        return "log.wandb.project must be a W&B project name (or null: no W&B)"
    return None


def _cudnn(cfg: Config) -> str | None:
    """``attention.kernel: cudnn`` only where cuDNN's masks express every block pair the kernel meets
    (lcjax.kernels.flash_attention.cudnn: its ``check_arrays``, ``layout_refusal`` and
    ``positions_refusal`` are the same rules for the public entry; this module imports no JAX)."""
    a, m, sp = cfg.attention, cfg.model, cfg.mesh.sequence
    if a.kernel != "cudnn":
        return None
    if cfg.train.dtype != "bfloat16":
        return f"attention.kernel 'cudnn' needs train.dtype bfloat16 (cuDNN flash attention), got {cfg.train.dtype!r}"
    head_dim = m.d_model // m.n_heads
    if head_dim % 8 or head_dim > 256:
        return (f"attention.kernel 'cudnn' needs a head dim (model.d_model / model.n_heads) that is a multiple "
                f"of 8 and <= 256, got {head_dim}")
    if a.block_q != a.block_k:
        return (f"attention.kernel 'cudnn' needs attention.block_q = attention.block_k (square tiles), got "
                f"{a.block_q} and {a.block_k}")
    if not cfg.data.cross_document_attention:
        return ("attention.kernel 'cudnn' needs data.cross_document_attention: true (the mask between packed "
                "documents is not expressible with cuDNN's masks here)")
    for _, seq_len, _ in stages(cfg):
        padded = padded_seq_len(seq_len, a.layout, sp)
        if padded != seq_len:
            return (f"attention.kernel 'cudnn': seq_len {seq_len} is padded to {padded} for layout {a.layout!r} "
                    f"on mesh.sequence = {sp}, and the padding is a segment of its own, which cuDNN's masks "
                    f"cannot express here; use a seq_len the layout splits evenly")
    if sp <= 1:
        return None
    if a.layout not in ("contiguous", "zigzag"):
        return (f"attention.kernel 'cudnn' needs attention.layout contiguous or zigzag on mesh.sequence = {sp}: "
                f"a {a.layout} shard's tokens are not contiguous position ranges")
    if a.impl == "allgather":
        return ("attention.kernel 'cudnn' cannot run attention.impl allgather: the gathered keys of the other "
                "shards are not one contiguous position range")
    ring = sp if a.impl == "ring" else (sp // a.ulysses_size if a.impl == "hybrid" and a.ulysses_size else 1)
    if a.impl in ("ulysses", "hybrid") and ring == 1 and a.layout != "contiguous":
        return (f"attention.kernel 'cudnn' with attention.impl {a.impl} over the whole sequence axis needs "
                f"attention.layout contiguous: the gathered {a.layout} sequence is not contiguous in position")
    if a.window is not None and ring > 1:
        return (f"attention.kernel 'cudnn' cannot combine attention.window with a ring of {ring} positions "
                f"(impl {a.impl}): steps between blocks need a window off the diagonal, which cuDNN cannot "
                f"express; use impl ulysses with layout contiguous, or kernel xla/pallas")
    return None


def _mosaic(cfg: Config) -> str | None:
    """What the Mosaic GPU kernels (lcjax.kernels.flash_attention.pallas_mosaic) cannot run."""
    if cfg.attention.kernel != "pallas_mosaic":
        return None
    h = cfg.model.d_model // cfg.model.n_heads
    if h % 64 or h > 256:
        return (f"attention.kernel 'pallas_mosaic' needs a head dim (model.d_model / model.n_heads) that is a "
                f"multiple of 64 and at most 256, got {h}")
    if cfg.train.dtype != "bfloat16":
        return (f"attention.kernel 'pallas_mosaic' needs train.dtype bfloat16 (a float32 wgmma is TF32), "
                f"got {cfg.train.dtype}")
    return None


_RULES = (_positive, _choices, _heads, _sequence, _ulysses, _rope, _memory, _data, _curriculum, _log, _cudnn,
          _mosaic)
