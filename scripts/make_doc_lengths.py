"""Write synthetic heavy-tailed document lengths (one per line) for bench_attention.py --doc-lengths.

    python scripts/make_doc_lengths.py --dist lognormal --tokens 4000000 --seed 0 --out lengths.txt

Distributions (lengths in tokens, at least 1, at most --max-len): ``lognormal`` (median 665, σ 1.8 in log
space), ``pareto`` (Lomax tail index 1.2 above 200: most documents short, a few very long), ``mixture``
(80 % short web-like lognormal median 400, σ 1.0; 20 % long books/code lognormal median 12k, σ 1.2).
Documents are drawn until their total reaches --tokens.
"""

from __future__ import annotations

import argparse

import numpy as np

DISTS = ("lognormal", "pareto", "mixture")


def draw(dist: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` document lengths (float) of distribution ``dist``."""
    if dist == "lognormal":
        return rng.lognormal(6.5, 1.8, n)
    if dist == "pareto":
        return 200 * (1 + rng.pareto(1.2, n))
    long = rng.random(n) < 0.2
    return np.where(long, rng.lognormal(np.log(12000), 1.2, n), rng.lognormal(np.log(400), 1.0, n))


def lengths(dist: str, tokens: int, seed: int, max_len: int) -> np.ndarray:
    """int64 document lengths of ``dist`` summing to at least ``tokens``."""
    rng, out, total = np.random.default_rng(seed), [], 0
    while total < tokens:
        batch = np.clip(draw(dist, rng, 1024), 1, max_len).astype(np.int64)
        out.append(batch)
        total += int(batch.sum())
    flat = np.concatenate(out)
    return flat[:int(np.searchsorted(np.cumsum(flat), tokens)) + 1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dist", choices=DISTS, required=True)
    p.add_argument("--tokens", type=int, default=4_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=1_000_000)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    np.savetxt(args.out, lengths(args.dist, args.tokens, args.seed, args.max_len), fmt="%d")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
