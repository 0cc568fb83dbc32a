"""PassKey prompts in tokens (Mohtashami & Jaggi 2023, "Landmark Attention", arXiv:2305.16300), shared by the
evaluation (lcjax.eval.passkey) and the training mixture (``data.passkey_fraction``).

A prompt is, as in the paper's code (docs/reference/formulas.md §4.1), the task description, filler, the
information line "The pass key is N. Remember it. N is the pass key." at a chosen depth of the filler, more
filler and the question "What is the pass key? The pass key is", the pieces joined by newlines; the answer
" N" follows. N is a random 5-digit integer. Everything is built in tokens so a prompt hits its target
length exactly: a prompt of ``length`` T is T + 1 tokens (the prompt, then the answer), of which the model
reads the first T and is scored on the answer tokens (the last ``len(answer)`` labels).

Depth d in [0, 1] places the information line after the fraction d of the filler, moved back to the start
of the filler sentence it falls in (synthetic filler) — so the key sits at the requested depth within one
filler sentence. Filler is either the standard synthetic sentences, repeated, or any token stream (natural
text from the corpus; any token is then a boundary).

Numpy only; the tokenizer is any callable ``encode(text) -> list[int]``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
KEY_RANGE = (10000, 100000)  # 5-digit keys, [low, high)
SENTENCES = tuple(s if s.endswith(".") else s + "." for s in GARBAGE.split(". "))

Encode = Callable[[str], list]


def info_line(key: int) -> str:
    """The line that hides the key (Landmark's ``information_line``)."""
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One PassKey example.

    tokens: int32 [T + 1], the prompt then the answer (and, in training examples, an end mark after it);
    the model reads ``tokens[:-1]`` and predicts ``tokens[1:]``. answer: the slice of ``tokens`` holding
    the answer (" N"); info: the slice holding the information line; key: N; depth: the requested depth
    in [0, 1].
    """

    tokens: np.ndarray
    answer: slice
    info: slice
    key: int
    depth: float

    @property
    def length(self) -> int:
        """T: tokens the model reads."""
        return len(self.tokens) - 1

    def label_mask(self) -> np.ndarray:
        """int32 [T]: 1 where the label (``tokens[1:]``) is an answer token or the end mark after it."""
        mask = np.zeros(self.length, np.int32)
        mask[self.answer.start - 1:] = 1
        return mask


class Filler:
    """A filler token stream with the offsets a key may be inserted at (sentence starts)."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray | None = None):
        self.tokens = np.asarray(tokens, np.int32)
        self.starts = None if starts is None else np.asarray(starts, np.int64)

    def take(self, count: int, offset: int = 0) -> "Filler":
        """``count`` tokens from ``offset`` (raises ValueError when the stream is too short)."""
        if offset + count > len(self.tokens):
            raise ValueError(f"filler of {len(self.tokens)} tokens is too short for {count} tokens")
        starts = None
        if self.starts is not None:
            starts = self.starts[(self.starts >= offset) & (self.starts <= offset + count)] - offset
        return Filler(self.tokens[offset:offset + count], starts)

    def insertion_point(self, depth: float) -> int:
        """Offset of depth ``depth`` (fraction of the filler), moved back to a sentence start when known."""
        cut = int(round(depth * len(self.tokens)))
        if self.starts is None or not len(self.starts):
            return cut
        before = self.starts[self.starts <= cut]
        return int(before[-1]) if len(before) else 0


def synthetic_filler(encode: Encode, count: int, offset_sentences: int = 0) -> Filler:
    """At least ``count`` tokens of the standard sentences repeated (joined by spaces, as Landmark's
    ``garbage_inf``), starting at sentence ``offset_sentences`` of the cycle, with the sentence starts."""
    plain = [np.asarray(encode(s), np.int32) for s in SENTENCES]
    spaced = [np.asarray(encode(" " + s), np.int32) for s in SENTENCES]
    tokens, starts, n, i = [], [], 0, offset_sentences
    while n < count:
        piece = (spaced if tokens else plain)[i % len(SENTENCES)]
        starts.append(n)
        tokens.append(piece)
        n += len(piece)
        i += 1
    return Filler(np.concatenate(tokens) if tokens else np.zeros(0, np.int32), np.asarray(starts + [n]))


def random_key(rng: np.random.Generator) -> int:
    """A random 5-digit key."""
    return int(rng.integers(*KEY_RANGE))


def fixed_parts(encode: Encode, key: int, task: bool = True) -> tuple[np.ndarray, ...]:
    """(head, info, question, answer) token arrays: the task line, the information line (with its
    surrounding newlines), the question (after a newline) and the answer " N"."""
    enc = lambda s: np.asarray(encode(s), np.int32)
    head = enc(TASK + "\n") if task else np.zeros(0, np.int32)
    return head, enc("\n" + info_line(key) + "\n"), enc("\n" + QUESTION), enc(" " + str(key))


def overhead(encode: Encode, task: bool = True, end: str = "") -> int:
    """Tokens of a prompt that are not filler (for the longest 5-digit key), so lengths above it fit."""
    return sum(len(p) for p in fixed_parts(encode, KEY_RANGE[1] - 1, task)) + len(encode(end)) - 1


def build_prompt(encode: Encode, *, length: int, depth: float, key: int, filler: Filler | None = None,
                 task: bool = True, end: str = "") -> Prompt:
    """The PassKey prompt of ``length`` T tokens read by the model (T + 1 with the last answer token).

    ``filler``: a :class:`Filler` with at least the tokens needed (None: the synthetic sentences); its
    first tokens are used. ``task``: begin with the task description. ``end``: text after the answer
    (training examples end with "." so that a trained model stops the number there). Raises ValueError
    when ``length`` is too short for the fixed parts or ``depth`` is outside [0, 1].
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"depth {depth} must be in [0, 1] (0-100 %)")
    head, info, question, answer = fixed_parts(encode, key, task)
    tail = np.asarray(encode(end), np.int32) if end else np.zeros(0, np.int32)
    count = length + 1 - len(head) - len(info) - len(question) - len(answer) - len(tail)
    if count < 0:
        raise ValueError(f"length {length} is too short for a PassKey prompt: it needs at least "
                         f"{length - count} tokens before any filler")
    filler = synthetic_filler(encode, count) if filler is None else filler
    filler = filler.take(count)
    cut = filler.insertion_point(depth)
    parts = [head, filler.tokens[:cut], info, filler.tokens[cut:], question, answer, tail]
    tokens = np.concatenate(parts).astype(np.int32)
    info_start = len(head) + cut
    stop = len(tokens) - len(tail)
    return Prompt(tokens, slice(stop - len(answer), stop),
                  slice(info_start, info_start + len(info)), key, float(depth))


END = "."  # what follows the answer in training examples
MIX_SALT = 0x5A55_4B45  # seeds training examples apart from evaluation keys (lcjax.eval.passkey uses others)


class PassKeyMix:
    """Grain transform (global batch index, batch) -> batch with some rows replaced by PassKey examples:
    the training mixture of ``data.passkey_fraction``.

    ``batch``: dict of int32 [rows, T] arrays in natural order (:data:`lcjax.data.loader.FIELDS`); row r is
    global row ``row_offset + r``. Each row independently becomes, with probability ``fraction``, a PassKey
    example built from its own corpus window: the window's tokens are the filler (or, for a share
    ``synthetic`` of the examples, the standard synthetic sentences from a random sentence on), the key is
    at a uniformly random depth, the question at the end and the answer " N." last; the row becomes one
    sequence (positions 0…T−1, one segment) whose loss mask is 1 on the answer tokens (and the final ".")
    only. The task description
    starts half of the examples that are long enough to hold it twice over. Choices are drawn from
    ``(seed, MIX_SALT, batch index, global row)``, so the batch index alone determines every batch.
    """

    def __init__(self, tokenizer, *, fraction: float, seed: int, synthetic: float = 0.5, row_offset: int = 0):
        self.tokenizer, self.fraction, self.seed = tokenizer, fraction, seed
        self.synthetic, self.row_offset = synthetic, row_offset
        self._fillers: dict[int, Filler] = {}

    def encode(self, text: str) -> list:
        return self.tokenizer.encode_batch([text])[0]

    def _synthetic(self, count: int, rng: np.random.Generator) -> Filler:
        if count not in self._fillers:
            self._fillers[count] = synthetic_filler(self.encode, 2 * count + 64)
        long = self._fillers[count]
        first = int(rng.integers(len(SENTENCES)))
        return long.take(len(long.tokens) - int(long.starts[first]), int(long.starts[first]))

    def example(self, window: np.ndarray, rng: np.random.Generator) -> Prompt:
        """A PassKey example of ``len(window) - 1`` tokens using ``window`` (int32 [T+1]) as filler."""
        length = len(window) - 1
        task = overhead(self.encode, True, END) <= length // 2 and rng.random() < 0.5
        filler = self._synthetic(length + 1, rng) if rng.random() < self.synthetic else Filler(window)
        return build_prompt(self.encode, length=length, depth=float(rng.random()), key=random_key(rng),
                            filler=filler, task=task, end=END)

    def __call__(self, index: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {name: np.array(array) for name, array in batch.items()}
        for r in range(len(out["tokens"])):
            rng = np.random.default_rng([self.seed, MIX_SALT, int(index), self.row_offset + r])
            if rng.random() >= self.fraction:
                continue
            window = np.concatenate([batch["tokens"][r], batch["labels"][r][-1:]])
            ex = self.example(window, rng)
            length = ex.length
            out["tokens"][r], out["labels"][r] = ex.tokens[:-1], ex.tokens[1:]
            out["positions"][r] = np.arange(length, dtype=np.int32)
            out["segment_ids"][r] = 1
            out["loss_mask"][r] = ex.label_mask()
        return out
