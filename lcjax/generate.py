"""Text generation with a KV cache: a sharded prefill of the prompts, then decoding token by token.

Prefill runs the prompts through the training model on the mesh (lcjax.model.sharded), exactly as a
training step's forward does (the layers are :class:`lcjax.model.llama.Block` itself; the per-shard math is
:mod:`lcjax.model.decode`): prompts [B, T] in
the config's layout (zigzag …) split over ``sequence`` (ring, Ulysses or hybrid attention), batch over
``data``, heads, MLP width and vocabulary over ``model`` (TP). Besides the logits of every prompt's last
token it returns the KV cache: each layer's roped keys and values, the ones the layer itself computed, and
left where they were made, in layout order and split over ``sequence`` (flash-decoding style, so the
cache of a long prompt is divided by SP × TP, never gathered).

Decoding runs one new token per prompt through the same layers on the same mesh. The new token (its
query) is replicated over ``sequence``; every sequence shard attends it to its slice of the prompt's cache
and the partial results are merged across ``sequence`` by the log-sum-exp rule (one ``pmax`` and one
``psum`` per layer), together with the keys of the tokens generated so far, which live in a small "tail"
cache replicated over ``sequence``. Heads stay split over ``model`` (TP; row-parallel ``psum`` as in
training) and the batch over ``data``. GQA: the caches hold kv heads only — per model shard its K/tp kv
heads, or, when K < tp, the one kv head its query heads use — never the N query heads.

Shapes (global, as held between calls): cache keys/values [L, B, T, K', H] with K' = max(K, tp) (P(None,
data, sequence, model)); tail [L, B, M, K', H] for M = ``max_new_tokens`` (P(None, data, None, model));
logits float32 [B, V] over the true vocabulary. Prompts of different lengths are right-padded to a common
T (a multiple of the layout's unit); padded keys are masked by position, and generated token i of a
prompt of length n takes position n + i whatever the padding. Parameters are replicated over data ×
sequence here (no optimizer state is loaded), whatever ``train.fsdp`` says; compute in ``train.dtype``.
Single process only (results are fetched to the host). RoPE tables (``model.rope.*``, as in
``Llama.hidden``) are built for max_position = max(T + M, ``data.seq_len``) (T the padded prompt length) in
both prefill and decode: a ``dynamic`` scaling uses one length throughout, never less than training's.

Entry points: :func:`load` (a run dir's newest checkpoint, config and tokenizer), :func:`from_params`
(parameters in memory), :func:`prompt_logits` (next-token logits of a batch of prompts),
:func:`prefill` / :func:`decode_step` (the cache, e.g. for teacher-forced scoring), :func:`generate`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lcjax import config as config_lib
from lcjax.checkpoint import check_step, restore_params
from lcjax.config import Config
from lcjax.model import decode
from lcjax.model.llama import Llama
from lcjax.model.sharded import model_settings, run_sharded
from lcjax.ops.layout import permute
from lcjax.sharding import rules
from lcjax.sharding.mesh import AXES, make_mesh

DATA, SEQUENCE, MODEL = AXES
CACHE_SPEC = P(None, DATA, SEQUENCE, MODEL, None)  # prefill keys/values [L, B, T, K', H]
TAIL_SPEC = P(None, DATA, None, MODEL, None)  # generated keys/values [L, B, M, K', H]


class Cache(NamedTuple):
    """The KV cache of a batch of prompts (global arrays, see the module doc for shapes and specs).

    k, v: prefill keys (roped) and values, layout order; positions: int32 [B, T] their positions (layout
    order); lengths: int32 [B] prompt lengths; tail_k, tail_v: keys/values of generated tokens, slot i =
    the i-th token fed to :func:`decode_step`; step: int32 [] tokens decoded so far.
    """

    k: Any
    v: Any
    positions: Any
    lengths: Any
    tail_k: Any
    tail_v: Any
    step: Any


class Model(NamedTuple):
    """A model ready to generate: its config, mesh, NNX graphdef, parameters (an nnx.State of global arrays
    placed by ``specs``) and the jitted prefill/decode functions built for them."""

    cfg: Config
    mesh: Any
    graphdef: Any
    params: Any
    specs: Any
    fns: dict


# ---------------------------------------------------------------------------------------------- loading

def abstract_params(cfg: Config, mesh):
    """(graphdef, specs, ShapeDtypeStructs with shardings) of the parameters for generation on ``mesh``:
    ``train.param_dtype``, split over ``model`` only (replicated over data × sequence)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(cfg.model, nnx.Rngs(0))))
    specs = rules.param_specs(abstract, n_kv_heads=cfg.model.n_kv_heads, tp=mesh.shape[MODEL])
    dtype = jnp.dtype(cfg.train.param_dtype)
    sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=NamedSharding(mesh, s))
    return graphdef, specs, jax.tree.map(sds, abstract, specs)


def from_params(cfg: Config, params, mesh=None) -> Model:
    """A :class:`Model` from parameters in memory: an nnx.State (or a TrainState, whose ``params`` are
    used) of arrays placed anywhere; they are moved to ``mesh`` (default: the config's mesh)."""
    params = params.params if hasattr(params, "opt_state") else params  # a TrainState
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model) if mesh is None else mesh
    graphdef, specs, abstract = abstract_params(cfg, mesh)
    params = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params, abstract)
    return _model(cfg, mesh, graphdef, params, specs)


def load(run_dir: str | Path, overrides: Sequence[str] = (), *, step: int | None = None, fits=None):
    """(:class:`Model`, tokenizer) of a run dir: its ``config.yaml`` with ``overrides`` (``key=value``;
    e.g. ``mesh.*``, ``attention.*``, ``train.dtype``; never ``model.*``), the newest checkpoint's (or
    ``step``'s) parameters on the config's mesh, and ``<run dir>/tokenizer``. ``fits(cfg, mesh, graphdef,
    specs, abstract_params, tokenizer)`` runs before the parameters are read (e.g. a memory check); what it
    returns, compiled functions of :func:`memory_needed`, the model uses for calls of their shapes.
    Reads only; raises ValueError (one line) for a missing run dir, config, checkpoint or tokenizer, or a
    changed model, and whatever ``fits`` raises."""
    from lcjax.data.tokenizer import Tokenizer

    run_dir = Path(run_dir)
    cfg = run_config(run_dir, overrides)
    steps = check_step(run_dir, step)
    tokenizer = Tokenizer.load(run_dir / "tokenizer", field="--run-dir tokenizer")
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model)
    graphdef, specs, abstract = abstract_params(cfg, mesh)
    compiled = fits(cfg, mesh, graphdef, specs, abstract, tokenizer) if fits is not None else None
    try:
        params = restore_params(run_dir / "checkpoints", abstract, step)
    except (OSError, KeyError) as e:  # a foreign checkpoint: one line (ValueErrors are one line already)
        raise ValueError(f"--run-dir {run_dir}: cannot read checkpoint {step or steps[-1]} "
                         f"({(str(e).splitlines() or [type(e).__name__])[0][:160]})") from None
    return _model(cfg, mesh, graphdef, params, specs, compiled), tokenizer


def run_config(run_dir: str | Path, overrides: Sequence[str] = (), what: str = "generation") -> Config:
    """The run's ``config.yaml`` with ``overrides``; ValueError when there is none or a ``model.*`` key
    changes (the checkpoint fixes the model; ``what`` names the command in the message)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        what = "does not exist" if not run_dir.exists() else "holds no run (no config.yaml)"
        raise ValueError(f"--run-dir {run_dir} {what}")
    saved = config_lib.load(run_dir / "config.yaml")
    cfg = config_lib.load(run_dir / "config.yaml", list(overrides))
    before, after = config_lib.to_dict(saved)["model"], config_lib.to_dict(cfg)["model"]
    for key in before:
        if before[key] != after[key]:
            raise ValueError(f"model.{key}: {what} cannot change it (the checkpoint's model is fixed)")
    return cfg


def _model(cfg: Config, mesh, graphdef, params, specs, compiled: dict | None = None) -> Model:
    from lcjax.memcheck import reusing

    fns = _fns(cfg, mesh, graphdef, specs)
    for name, (max_position, executable) in (compiled or {}).items():
        fns[name] = reusing(fns[name], executable, static=max_position)
    return Model(cfg, mesh, graphdef, params, specs, fns)


def _fns(cfg: Config, mesh, graphdef, specs) -> dict:
    common = dict(graphdef=graphdef, specs=specs, mesh=mesh, cfg=cfg)
    return {"prefill": _prefill_fn(**common, keep_cache=True), "logits": _prefill_fn(**common, keep_cache=False),
            "decode": _decode_fn(**common)}


MAX_POSITIONS = 2**31 - 1  # positions are int32


def padded_length(cfg: Config, prompt_len: int) -> int:
    """The prompt length T that :func:`prefill` pads ``prompt_len`` tokens to (a multiple of 16 tokens per
    sequence shard and of the layout's unit)."""
    unit = 16 * cfg.mesh.sequence * (2 if cfg.attention.layout == "zigzag" else 1)
    return -(-prompt_len // unit) * unit


def check_positions(cfg: Config, prompt_len: int, max_new_tokens: int) -> None:
    """Raise ValueError (one line naming --max-new-tokens) when the padded prompt and the new tokens need
    more positions than int32 holds."""
    total = padded_length(cfg, prompt_len) + max(max_new_tokens, 1)
    if total > MAX_POSITIONS:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: prompt + new tokens = {total:,} positions, more "
                         f"than the {MAX_POSITIONS:,} int32 positions hold")


def memory_needed(cfg: Config, mesh, graphdef, specs, abstract, *, batch: int, prompt_len: int,
                  max_new_tokens: int) -> tuple[int | None, dict]:
    """XLA's per-device bytes of generating ``max_new_tokens`` tokens after ``batch`` prompts of
    ``prompt_len`` tokens: the larger of the compiled prefill and decode step (parameters ``abstract``,
    the KV cache and its tail included; None when the backend has no memory analysis), compiled for
    abstract arrays: nothing is allocated. Also returns {"prefill"|"decode": (max_position, executable)}
    for :func:`load` to reuse. Raises ValueError when the positions exceed int32."""
    from lcjax import memcheck

    check_positions(cfg, prompt_len, max_new_tokens)
    t, slots = padded_length(cfg, prompt_len), max(max_new_tokens, 1)
    b = -(-batch // cfg.mesh.data) * cfg.mesh.data
    fns = _fns(cfg, mesh, graphdef, specs)
    sds = lambda shape, spec, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
    tokens, lengths = sds((b, t), P(DATA, SEQUENCE)), sds((b,), P(DATA))
    max_position = max(t + slots, cfg.data.seq_len)
    prefill = fns["prefill"].lower(abstract, tokens, tokens, lengths, max_position)
    k = prefill.out_info[1]
    tail = sds((k.shape[0], b, slots, *k.shape[3:]), TAIL_SPEC, k.dtype)
    cache = Cache(sds(k.shape, CACHE_SPEC, k.dtype), sds(k.shape, CACHE_SPEC, k.dtype), tokens, lengths, tail, tail,
                  sds((), P()))
    decode = fns["decode"].lower(abstract, cache, sds((b,), P(DATA)), max_position)
    compiled = {"prefill": (max_position, prefill.compile()), "decode": (max_position, decode.compile())}
    totals = [memcheck.compiled_total(c) for _, c in compiled.values()]
    return (None if None in totals else max(totals)), compiled


# ------------------------------------------------------------------------------- jitted global functions

def _prefill_fn(*, graphdef, specs, mesh, cfg: Config, keep_cache: bool) -> Callable:
    """jit((params, tokens, positions, lengths, max_position) -> logits [B, Vp] (and keys, values))."""
    batch, rows, settings = P(DATA, SEQUENCE), P(DATA), model_settings(cfg)

    def run(params, tokens, positions, lengths, max_position):
        local = lambda *a: decode.prefill_local(*a, graphdef=graphdef, run=settings, max_position=max_position,
                                                keep_cache=keep_cache)
        out_specs = (P(DATA, MODEL), CACHE_SPEC, CACHE_SPEC) if keep_cache else P(DATA, MODEL)
        return run_sharded(local, mesh, in_specs=(specs, batch, batch, rows), out_specs=out_specs,
                           kernel=cfg.attention.kernel)(params, tokens, positions, lengths)

    return jax.jit(run, static_argnums=4)


def _decode_fn(*, graphdef, specs, mesh, cfg: Config) -> Callable:
    """jit((params, cache, tokens [B], max_position) -> (logits [B, Vp], cache)); the cache is donated."""
    cache_specs = Cache(CACHE_SPEC, CACHE_SPEC, P(DATA, SEQUENCE), P(DATA), TAIL_SPEC, TAIL_SPEC, P())
    settings = model_settings(cfg)

    def run(params, cache, tokens, max_position):
        local = lambda *a: decode.decode_local(*a, graphdef=graphdef, run=settings, max_position=max_position)
        logits, tail_k, tail_v = run_sharded(
            local, mesh, in_specs=(specs, cache_specs, P(DATA)), out_specs=(P(DATA, MODEL), TAIL_SPEC, TAIL_SPEC),
            kernel=cfg.attention.kernel)(params, cache, tokens)
        return logits, cache._replace(tail_k=tail_k, tail_v=tail_v, step=cache.step + 1)

    return jax.jit(run, static_argnums=3, donate_argnums=1)


# ----------------------------------------------------------------------------------------- public API

def _padded_batch(model: Model, prompts: Sequence[Sequence[int]]):
    """Prompts right-padded to T tokens (T a multiple of 16 tokens per sequence shard and of the layout's
    unit) and to a row count divisible by mesh.data (extra rows copy the first prompt), laid out for the
    mesh: (tokens, positions, lengths) as placed arrays, and the true row count."""
    cfg = model.cfg
    vocab = cfg.model.vocab_size
    if not prompts:
        raise ValueError("prompts: need at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i}: token ids must be in [0, model.vocab_size = {vocab})")
    sp, dp = cfg.mesh.sequence, cfg.mesh.data
    t = padded_length(cfg, max(len(p) for p in prompts))
    rows = list(prompts) + [prompts[0]] * (-len(prompts) % dp)
    tokens = np.zeros((len(rows), t), np.int32)
    for i, p in enumerate(rows):
        tokens[i, : len(p)] = p
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape)
    lengths = np.array([len(p) for p in rows], np.int32)
    put = lambda x, spec: jax.device_put(x, NamedSharding(model.mesh, spec))
    lay = lambda x: put(np.ascontiguousarray(permute(x, cfg.attention.layout, sp)), P(DATA, SEQUENCE))
    return lay(tokens), lay(positions), put(lengths, P(DATA)), len(prompts)


def _max_position(model: Model, prompt_len: int, slots: int) -> int:
    """Positions the RoPE tables serve: the padded prompt plus the generated tokens, and at least the
    training length (so that a ``dynamic`` RoPE scaling is never scaled for less than training was)."""
    return max(prompt_len + slots, model.cfg.data.seq_len)


def _true_vocab(model: Model, logits, rows: int):
    return logits[:rows, : model.cfg.model.vocab_size]


def prompt_logits(model: Model, prompts: Sequence[Sequence[int]]) -> np.ndarray:
    """Next-token logits float32 [B, V] after each prompt (lists of token ids, any lengths), from one
    sharded prefill without a cache. Raises ValueError for an empty prompt or an id outside the vocabulary."""
    tokens, positions, lengths, rows = _padded_batch(model, prompts)
    logits = model.fns["logits"](model.params, tokens, positions, lengths, int(tokens.shape[1]))
    return np.asarray(_true_vocab(model, logits, rows))


def prefill(model: Model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int):
    """(logits float32 [B, V] after each prompt, :class:`Cache` with room for ``max_new_tokens`` tokens
    fed to :func:`decode_step`). Raises ValueError like :func:`prompt_logits` or for max_new_tokens < 0."""
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {max_new_tokens} must be >= 0")
    tokens, positions, lengths, rows = _padded_batch(model, prompts)
    slots = max(max_new_tokens, 1)
    max_position = _max_position(model, int(tokens.shape[1]), slots)
    logits, k, v = model.fns["prefill"](model.params, tokens, positions, lengths, max_position)
    tail = lambda: jax.device_put(np.zeros((k.shape[0], k.shape[1], slots, *k.shape[3:]), k.dtype),
                                  NamedSharding(model.mesh, TAIL_SPEC))
    step = jax.device_put(np.zeros((), np.int32), NamedSharding(model.mesh, P()))
    cache = Cache(k, v, positions, lengths, tail(), tail(), step)
    return _true_vocab(model, logits, rows), cache


def decode_step(model: Model, cache: Cache, tokens) -> tuple[Any, Cache]:
    """Feed one token per prompt (int [B]); returns (logits float32 [B, V] for the next token, new cache).
    The cache passed in is consumed (donated). Raises ValueError when the cache is full."""
    slots = cache.tail_k.shape[2]
    if int(cache.step) >= slots:
        raise ValueError(f"decode_step: the cache holds {slots} generated tokens; prefill with a larger "
                         f"max_new_tokens")
    b = cache.lengths.shape[0]
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    rows = tokens.shape[0]
    tokens = np.concatenate([tokens, np.repeat(tokens[:1], b - rows)])
    max_position = _max_position(model, int(cache.positions.shape[1]), slots)
    tokens = jax.device_put(tokens, NamedSharding(model.mesh, P(DATA)))
    logits, cache = model.fns["decode"](model.params, cache, tokens, max_position)
    return _true_vocab(model, logits, rows), cache


@jax.jit
def _pick(logits, key, temperature):
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def sample(logits, *, temperature: float, key) -> np.ndarray:
    """Next tokens int32 [B] from logits [B, V]: argmax at temperature 0, else a draw from
    softmax(logits / temperature) with the PRNG ``key``."""
    return np.asarray(_pick(jnp.asarray(logits, jnp.float32), key, jnp.float32(temperature)))


def generate(model: Model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             seed: int = 0, eos_id: int | None = None) -> list[list[int]]:
    """New token ids for each prompt: greedy at ``temperature`` 0, else sampled (reproducible for a
    ``seed``); each list stops after ``eos_id`` (included) or at ``max_new_tokens``. Raises ValueError for
    bad input (empty prompt, ids outside the vocabulary, negative max_new_tokens or temperature)."""
    if not (temperature >= 0) or math.isinf(temperature):
        raise ValueError(f"--temperature {temperature} must be a finite number >= 0")
    logits, cache = prefill(model, prompts, max_new_tokens=max_new_tokens)
    key = jax.random.key(seed)
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for i in range(max_new_tokens):
        tokens = sample(logits, temperature=temperature, key=jax.random.fold_in(key, i))
        for row, token in enumerate(tokens):
            if not done[row]:
                out[row].append(int(token))
                done[row] = eos_id is not None and token == eos_id
        if done.all() or i == max_new_tokens - 1:
            break
        logits, cache = decode_step(model, cache, tokens)
    return out
