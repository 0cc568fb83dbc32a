"""PassKey retrieval (Mohtashami & Jaggi 2023) over a grid of prompt lengths and key depths
(docs/evaluation.md).

Prompts come from :mod:`lcjax.data.passkey` (in tokens, so every cell hits its length exactly). Each prompt
runs through the same sharded model as training: one ``shard_map`` over the run's mesh (or another one
given with ``--set mesh.*``), tokens in the layout order, ring attention over ``sequence``, vocabulary-
parallel head over ``model``; the [T, V] logits are never gathered.

Scoring (default, ``mode="teacher"``): teacher-forced greedy decoding of the key in one forward pass — the
prompt followed by the answer " N" is read at once and the example counts as correct when every answer
token is the argmax of the logits at the position before it (exact token match, as LongLoRA scores).
``mode="generate"``: greedy generation of ``max_new_tokens`` tokens after the question with
:mod:`lcjax.generate` (the prompt prefilled through the same sharded model, then decoding with the KV
cache), correct when the first integer of the generated text is the key (Landmark's rule).

Keys are drawn from ``(seed, EVAL_SALT, length, depth index, sample)``, a stream apart from the training
mixture's (``lcjax.data.passkey.MIX_SALT``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from lcjax import config as config_lib
from lcjax.config import Config
from lcjax.data import passkey as pk
from lcjax.ops.layout import permute

EVAL_SALT = 0x45564B59
FILLERS = ("synthetic", "corpus")
MODES = ("teacher", "generate")


@dataclasses.dataclass(frozen=True)
class PassKeySpec:
    """The PassKey grid and how it is scored: the flags of ``lcjax eval passkey``.

    Fields:
      lengths: prompt lengths in tokens (``--lengths``); None: the run's ``data.seq_len``.
      depths: how many evenly spaced key depths from 0 to 100 % (``--depths``, :func:`depths_grid`).
      samples: keys per (length, depth) cell (``--samples``).
      seed: seed of the keys and corpus offsets (``--seed``).
      filler: ``synthetic`` (the standard sentences) or ``corpus`` (held-out text of the run), :data:`FILLERS`.
      mode: ``teacher`` (teacher-forced exact match) or ``generate`` (greedy generation), :data:`MODES`.
      batch_size: prompts per forward pass; None: min(samples·depths, 16) rounded up to a multiple of
        ``mesh.data``.
      max_new_tokens: tokens generated per prompt in ``generate`` mode.
    """

    lengths: tuple[int, ...] | None = None
    depths: int = 11
    samples: int = 20
    seed: int = 0
    filler: str = "synthetic"
    mode: str = "teacher"
    batch_size: int | None = None
    max_new_tokens: int = 10


def resolve_spec(spec: PassKeySpec, cfg: Config) -> PassKeySpec:
    """``spec`` with its defaults that depend on the run filled in (lengths: ``data.seq_len``; batch size:
    :class:`PassKeySpec`'s rule on ``mesh.data``), after checking it. Raises ValueError (one line naming
    the flag) for an unknown filler or mode, a negative seed, samples, max-new-tokens or depths below 1,
    or a batch size that is not a positive multiple of ``mesh.data``."""
    if spec.filler not in FILLERS:
        raise ValueError(f"--filler {spec.filler!r} must be one of {', '.join(FILLERS)}")
    if spec.mode not in MODES:
        raise ValueError(f"--mode {spec.mode!r} must be one of {', '.join(MODES)}")
    if spec.seed < 0:
        raise ValueError(f"--seed {spec.seed} must be >= 0")
    if spec.samples < 1 or spec.max_new_tokens < 1:
        raise ValueError(f"--samples {spec.samples} and --max-new-tokens {spec.max_new_tokens} must be >= 1")
    depths_grid(spec.depths)
    dp = cfg.mesh.data
    batch_size = spec.batch_size
    if batch_size is None:
        batch_size = math.ceil(min(spec.samples * spec.depths, 16) / dp) * dp
    if batch_size < 1 or batch_size % dp:
        raise ValueError(f"--batch-size {batch_size} must be a positive multiple of mesh.data = {dp}")
    lengths = tuple(spec.lengths) if spec.lengths else (cfg.data.seq_len,)
    return dataclasses.replace(spec, lengths=lengths, batch_size=batch_size)


def depths_grid(count: int) -> list[float]:
    """``count`` evenly spaced depths from 0 to 1 (``--depths N``); one depth is 0."""
    if count < 1:
        raise ValueError(f"--depths {count} must be >= 1")
    return [0.0] if count == 1 else [i / (count - 1) for i in range(count)]


def check_lengths(lengths: list[int], cfg: Config, encode) -> None:
    """Raise ValueError unless every length can be laid out on the mesh and holds a whole prompt."""
    if not lengths:
        raise ValueError("--lengths must name at least one length")
    if min(lengths) < 1:
        raise ValueError(f"--lengths {min(lengths)} must be >= 1")
    need = pk.overhead(encode, task=True) + 1
    for length in lengths:
        if length < need:
            raise ValueError(f"--lengths {length}: a PassKey prompt needs at least {need} tokens")
        unit = 2 * cfg.mesh.sequence if cfg.attention.layout == "zigzag" else cfg.mesh.sequence
        if length % unit:
            how = "2 x mesh.sequence" if cfg.attention.layout == "zigzag" else "mesh.sequence"
            raise ValueError(f"--lengths {length} must be divisible by {how} = {unit} "
                             f"for the {cfg.attention.layout} layout")


def make_prompts(encode, length: int, depths: list[float], samples: int, seed: int,
                 corpus: np.ndarray | None = None) -> list[list[pk.Prompt]]:
    """``samples`` prompts of ``length`` tokens per depth (list per depth), keys and corpus offsets seeded.

    ``corpus``: a token stream to take natural-text filler from (random offsets), None for the synthetic
    sentences.
    """
    grid = []
    for d, depth in enumerate(depths):
        row = []
        for s in range(samples):
            rng = np.random.default_rng([seed, EVAL_SALT, length, d, s])
            key = pk.random_key(rng)
            filler = None
            if corpus is not None:
                count = length + 1
                if len(corpus) < count:
                    raise ValueError(f"--filler corpus: the corpus has {len(corpus)} tokens, fewer than {count}")
                offset = int(rng.integers(0, len(corpus) - count + 1))
                filler = pk.Filler(np.asarray(corpus[offset:offset + count]))
            row.append(pk.build_prompt(encode, length=length, depth=depth, key=key, filler=filler))
        grid.append(row)
    return grid


def teacher_batch(prompts: list[pk.Prompt]) -> dict[str, np.ndarray]:
    """int32 [B, T] arrays in natural order: tokens, labels, positions, segment ids, answer mask."""
    tokens = np.stack([p.tokens for p in prompts])
    b, t = tokens.shape[0], tokens.shape[1] - 1
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "segment_ids": np.ones((b, t), np.int32),
            "loss_mask": np.stack([p.label_mask() for p in prompts])}


def first_integer(text: str) -> int | None:
    """The first integer in ``text`` (Landmark's scoring rule), or None."""
    found = re.search(r"\d+", text)
    return int(found.group()) if found else None


class Evaluator:
    """A restored model on a mesh with jitted sharded scoring and argmax functions.

    ``cfg``: the run's config (mesh and attention settings as wanted for the evaluation); ``params``: the
    model's nnx.State placed by :func:`lcjax.eval.model.load_params`.
    """

    def __init__(self, cfg: Config, graphdef, specs, params, mesh, compiled_score=None):
        from lcjax import memcheck
        from lcjax.eval import model as model_lib

        self.cfg, self.params, self.mesh = cfg, params, mesh
        self._score = model_lib.make_answer_misses(graphdef, specs, mesh, cfg)
        if compiled_score is not None:  # compiled for the memory check (check_memory): used for its shape
            self._score = memcheck.reusing(self._score, compiled_score)
        self._argmax = model_lib.make_argmax(graphdef, specs, mesh, cfg)
        self._generator = None  # an lcjax.generate.Model, built on the first generate()

    def _device(self, batch: dict) -> dict:
        import jax
        from jax.sharding import NamedSharding

        from lcjax.sharding import rules

        sharding = NamedSharding(self.mesh, rules.BATCH)
        lay = lambda x: permute(np.asarray(x, np.int32), self.cfg.attention.layout, self.cfg.mesh.sequence)
        return {k: jax.device_put(lay(v), sharding) for k, v in batch.items()}

    def _padded(self, items: list, batch_size: int) -> list:
        return items + [items[-1]] * (batch_size - len(items))

    def teacher(self, prompts: list[pk.Prompt], batch_size: int) -> np.ndarray:
        """bool [len(prompts)]: every answer token is the argmax (one forward pass per ``batch_size``)."""
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            batch = self._device(teacher_batch(self._padded(chunk, batch_size)))
            misses = np.asarray(self._score(self.params, batch))
            out.append(misses[:len(chunk)] == 0)
        return np.concatenate(out)

    def generate(self, prompts: list[pk.Prompt], batch_size: int, max_new_tokens: int) -> np.ndarray:
        """int32 [len(prompts), max_new_tokens]: greedy continuations of the prompts (the answer removed),
        ``batch_size`` prompts at a time, by :func:`lcjax.generate.generate`: one sharded prefill over the
        mesh (ring attention, the run's layout), then decoding with the KV cache."""
        from lcjax import generate as gen

        if self._generator is None:
            self._generator = gen.from_params(self.cfg, self.params, self.mesh)
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = [p.tokens[:p.answer.start] for p in prompts[i:i + batch_size]]
            out += gen.generate(self._generator, chunk, max_new_tokens=max_new_tokens)
        return np.asarray(out, np.int32)


def evaluate(evaluator: Evaluator, tokenizer, spec: PassKeySpec, *, corpus: np.ndarray | None = None,
             log=None) -> list[dict]:
    """The PassKey grid of ``spec`` (its lengths and batch size filled in by :func:`resolve_spec` for the
    evaluator's config): one record per (length, depth) with ``length`` (tokens), ``depth`` (percent),
    ``accuracy`` (fraction of ``spec.samples`` correct, 0-1) and ``samples``. ``corpus``: token stream of
    the ``corpus`` filler (None: the synthetic sentences)."""
    spec = resolve_spec(spec, evaluator.cfg)
    encode = lambda s: tokenizer.encode_batch([s])[0]
    depths, samples = depths_grid(spec.depths), spec.samples
    records = []
    for length in spec.lengths:
        grid = make_prompts(encode, length, depths, samples, spec.seed, corpus)
        flat = [p for row in grid for p in row]
        if spec.mode == "teacher":
            correct = evaluator.teacher(flat, spec.batch_size)
        else:
            ids = evaluator.generate(flat, spec.batch_size, spec.max_new_tokens)
            correct = np.array([first_integer(tokenizer.decode(row)) == p.key for row, p in zip(ids, flat)])
        correct = correct.reshape(len(depths), samples)
        for depth, hits in zip(depths, correct):
            records.append({"length": length, "depth": round(100 * depth, 4),
                            "accuracy": float(np.mean(hits)), "samples": samples})
        if log:
            log(f"lcjax: passkey length {length}: mean accuracy {100 * np.mean(correct):.1f}%")
    return records


def grid_text(records: list[dict]) -> str:
    """The grid as text: one row per depth, one column per length, accuracy in percent."""
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    acc = {(r["length"], r["depth"]): r["accuracy"] for r in records}
    lines = ["depth % \\ length " + "".join(f"{n:>8}" for n in lengths)]
    for d in depths:
        lines.append(f"{d:>16g} " + "".join(f"{100 * acc[(n, d)]:>8.1f}" for n in lengths))
    lines.append(f"{'mean':>16} " + "".join(
        f"{100 * np.mean([acc[(n, d)] for d in depths]):>8.1f}" for n in lengths))
    return "\n".join(lines)


def plot_heatmap(records: list[dict], path: str | Path, title: str = "PassKey retrieval") -> None:
    """Write a length x depth heatmap of accuracy (red 0 % .. green 100 %) as PNG, like the published
    LLaMA / Mistral / LWM figures: x = prompt length (tokens), y = key depth (0 % = start, at the top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    acc = {(r["length"], r["depth"]): r["accuracy"] for r in records}
    grid = np.array([[100 * acc[(n, d)] for n in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(max(5.0, 2.0 + 0.9 * len(lengths)), max(3.5, 1.2 + 0.4 * len(depths))))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth (% of the filler)")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def result_paths(run_dir: str | Path, out: str | Path | None = None, overwrite: bool = False) -> tuple[Path, Path]:
    """Where the results go: ``out`` (a .json path) and the same name with .png, which must not exist
    unless ``overwrite``; without ``out``, ``passkey.json``/``.png`` in ``run_dir`` or, when either exists,
    the first free ``passkey-N.json``/``.png`` (earlier results are never replaced). Raises ValueError
    (one line naming --out) for an existing or unwritable ``out``."""
    from lcjax import rundir

    if out is not None:
        json_path = rundir.check_new_file(Path(out), overwrite=overwrite)
        return json_path, rundir.check_new_file(json_path.with_suffix(".png"), overwrite=overwrite)
    base = Path(run_dir) / "passkey"
    n = 1
    while True:
        stem = base if n == 1 else base.with_name(f"passkey-{n}")
        pair = stem.with_suffix(".json"), stem.with_suffix(".png")
        if not any(p.exists() for p in pair):
            return pair
        n += 1


def write_results(records: list[dict], paths: tuple[Path, Path], title: str, overwrite: bool = False) -> tuple[Path, Path]:
    """Write the records as JSON and the heatmap as PNG to ``paths`` (:func:`result_paths`), each whole
    (never replacing a file unless ``overwrite``); return the paths."""
    import io

    from lcjax import rundir

    json_path, png_path = paths
    png = io.BytesIO()
    plot_heatmap(records, png, title)
    rundir.write_new(png_path, png.getvalue(), overwrite=overwrite)
    rundir.write_new(json_path, (json.dumps(records, indent=1) + "\n").encode(), overwrite=overwrite)
    return json_path, png_path


def check_memory(cfg: Config, spec: PassKeySpec):
    """Refuse (lcjax.memcheck.DoesNotFit, one line) an evaluation whose largest forward pass (the longest
    of ``spec.lengths`` x ``spec.batch_size``, both resolved: :func:`resolve_spec`; in generate mode prefill
    and decode) does not fit the devices, with the host
    memory of that length's prompts; compiled for abstract arrays before anything is loaded
    (``train.check_memory`` false: skipped). Returns the compiled scoring function in teacher mode (for
    :class:`Evaluator` to reuse), else None."""
    if not cfg.train.check_memory:
        return None
    import jax
    from jax.sharding import NamedSharding

    from lcjax import generate as gen
    from lcjax import memcheck
    from lcjax.eval import model as model_lib
    from lcjax.sharding import rules
    from lcjax.sharding.mesh import make_mesh

    length, batch_size, mode, max_new_tokens = max(spec.lengths), spec.batch_size, spec.mode, spec.max_new_tokens
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.sequence, cfg.mesh.model)
    graphdef, specs, abstract = gen.abstract_params(cfg, mesh)
    if mode == "teacher":
        sds = jax.ShapeDtypeStruct((batch_size, length), np.int32, sharding=NamedSharding(mesh, rules.BATCH))
        batch = {k: sds for k in ("tokens", "labels", "positions", "segment_ids", "loss_mask")}
        fn = model_lib.make_answer_misses(graphdef, specs, mesh, cfg)
        compiled = fn.lower(abstract, batch).compile()
        needed = memcheck.compiled_total(compiled)
    else:
        compiled, needed = None, gen.memory_needed(cfg, mesh, graphdef, specs, abstract, batch=batch_size,
                                                   prompt_len=length, max_new_tokens=max_new_tokens)[0]
    host = 2 * spec.samples * spec.depths * (length + 1) * 4  # the prompts of one length (int32), and their batches
    what = f"PassKey at {length:,} tokens x --batch-size {batch_size}" + (
        f" with --max-new-tokens {max_new_tokens:,}" if mode == "generate" else "")
    memcheck.check_fits(needed, mesh.devices.flat, what=what, kind="eval", host_bytes=host)
    return compiled


def run(run_dir: str | Path, spec: PassKeySpec = PassKeySpec(), *, overrides: list[str] = (), step: int | None = None,
        log=print, out: str | Path | None = None, overwrite: bool = False) -> list[dict]:
    """``lcjax eval passkey``: evaluate the newest checkpoint (or ``step``) of ``run_dir`` on the grid of
    ``spec`` (lengths default to the run's ``data.seq_len``) and write the results as JSON and a PNG
    heatmap (:func:`result_paths`: ``out``, else new files in the run dir; nothing is replaced unless
    ``overwrite``). ``overrides``: ``--set`` items applied to the run's config. Raises ValueError (one line,
    nothing written) for unusable input: a changed ``model.*`` key, bad lengths, depths, samples or batch
    size, an existing ``out``, an evaluation that does not fit the devices (:func:`check_memory`), a
    missing or damaged checkpoint."""
    from lcjax.checkpoint import check_step
    from lcjax.data.tokenizer import Tokenizer
    from lcjax.generate import run_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"--run-dir {run_dir}: not an lcjax run dir (no config.yaml)")
    cfg = run_config(run_dir, list(overrides), "evaluation")
    steps = check_step(run_dir, step)
    paths = result_paths(run_dir, out, overwrite)
    spec = resolve_spec(spec, cfg)
    tokenizer = Tokenizer.load(run_dir / "tokenizer", "--run-dir tokenizer")
    check_lengths(list(spec.lengths), cfg, lambda s: tokenizer.encode_batch([s])[0])
    compiled = check_memory(cfg, spec)
    corpus = _corpus(cfg, run_dir) if spec.filler == "corpus" else None

    from lcjax.eval import model as model_lib

    evaluator = Evaluator(cfg, *model_lib.load_params(cfg, run_dir / "checkpoints", step), compiled)
    records = evaluate(evaluator, tokenizer, spec, corpus=corpus, log=log)
    title = (f"PassKey: {cfg.name}, step {step or steps[-1]}\n{spec.mode} scoring, {spec.filler} filler, "
             f"{spec.samples} keys per cell")
    json_path, png_path = write_results(records, paths, title, overwrite)
    log(grid_text(records))
    log(f"lcjax: wrote {json_path} and {png_path}")
    return records


def _corpus(cfg: Config, run_dir: Path) -> np.ndarray:
    """Natural-text filler: the run's held-out split (eval.holdout) tokenized with the run's tokenizer."""
    from lcjax.data.mixture import build_data

    dataset = build_data(cfg.data, tokenizer_kind=str(run_dir / "tokenizer" / "tokenizer.json"),
                         vocab_size=cfg.model.vocab_size)
    try:
        return np.asarray(dataset.split(cfg.eval.holdout)[1].tokens)
    except ValueError:
        return np.asarray(dataset.tokens)
