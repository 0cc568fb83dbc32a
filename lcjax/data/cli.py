"""``lcjax data prepare`` and ``lcjax data tokenizer`` (argument parsing lives in lcjax/cli.py).

Both print progress lines and end with one line of ``--set`` overrides that point ``lcjax train`` at what
they built. Bad input raises ValueError (one line) before anything is written.
"""

from __future__ import annotations

import pathlib
import shlex

from lcjax.data.corpus import TFDS_PREFIX, describe_skipped, scan
from lcjax.data.records import RecordDocuments, record_kind
from lcjax.data.tokenizer import TRAIN_SAMPLE_BYTES, read_text, train_bpe, training_sample


def run(args) -> int:
    """Run ``args.data_command`` (``prepare`` or ``tokenizer``); returns the exit code."""
    try:
        return {"prepare": _prepare, "tokenizer": _tokenizer}[args.data_command](args)
    except ValueError as e:  # name the flag the user typed, not the config key it stands for
        message = str(e)
        for key, flag in (("data.source", "--source"), ("data.tokenizer", "--tokenizer"),
                          ("model.vocab_size", "--vocab-size"), ("data.data_dir", "--data-dir"),
                          ("data.text_field", "--text-field")):
            message = message.replace(key, flag, 1) if message.startswith(key) else message
        raise ValueError(message) from None


def _say(line: str) -> None:
    print(f"lcjax: {line}", flush=True)


def _overrides(pairs: list[str]) -> str:
    return " ".join(f"--set {shlex.quote(pair)}" for pair in pairs)


def _prepare(args) -> int:
    from lcjax.data.tfds_dataset import prepare

    summary = prepare(args.source, args.out, name=args.name, tokenizer=args.tokenizer,
                      vocab_size=args.vocab_size, cache_dir=args.cache_dir, text_field=args.text_field, log=_say)
    _say(f"wrote TFDS dataset {summary['name']} ({summary['documents']:,} documents, {summary['tokens']:,} tokens "
         f"with EOS, array_record) to {summary['dir']}")
    print(_overrides(summary["overrides"]))
    return 0


def _tokenizer(args) -> int:
    out = pathlib.Path(args.out).expanduser()
    if (out / "tokenizer.json").exists():
        raise ValueError(f"--out {out} already holds a tokenizer.json")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is not a directory")
    if args.source.startswith(TFDS_PREFIX):
        from lcjax.data.tfds_dataset import TfdsDocuments

        docs = TfdsDocuments(args.source, args.data_dir)
        if docs.has_tokens:
            raise ValueError(f"--source {args.source} holds token ids, not text: nothing to train a BPE on")
        texts, what = docs.sample_texts(TRAIN_SAMPLE_BYTES), f"{len(docs):,} documents"
    elif record_kind(args.source):
        docs = RecordDocuments(args.source, args.text_field)
        texts, what = docs.sample_texts(TRAIN_SAMPLE_BYTES), f"the first records of {len(docs.files):,} files"
    else:
        files, skipped = scan(args.source)
        sample = training_sample(files)
        texts = (read_text(p) for p in sample)
        what = f"{len(sample):,} of {len(files):,} files{describe_skipped(skipped, ' (skipped: ', ')')}"
    tok = train_bpe((t for t in texts), args.vocab_size)
    path = tok.save(out)
    _say(f"trained a byte-level BPE on {what}: {tok.vocab_size:,} ids, EOS {tok.eos_id}; wrote {path}")
    print(_overrides([f"data.tokenizer={path.absolute()}", f"model.vocab_size={tok.vocab_size}"]))
    return 0
