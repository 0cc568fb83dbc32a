"""Tile sizes, warps and pipeline stages of the Pallas (Triton) flash kernels, per GPU, head dim and dtype.

The table lives in ``triton_tiles.json`` next to this file (``scripts/autotune_triton.py --write`` rewrites
it on a GPU). Each entry gives, per pass — ``fwd`` (forward), ``dkv`` (dK/dV), ``dq`` — the list
[block_q, block_k, num_warps, num_stages]. Lookup: the GPU family from the device kind (an H200 falls back
to the H100 entries: same SM, same shared memory), the head dim padded to a power of two (≤ 64 uses the
64 entry), the dtype (float16 uses the bfloat16 entry); with no entry, conservative tiles that fit
100 KiB of shared memory. When the program is not compiled for a GPU (the Pallas interpreter on CPU),
the H100 entries are used, so tests run the same tiles the GPU would.

Explicit ``block_q``/``block_k`` override the table for every pass (rounded down to a power of two in
[16, 128]); then warps follow the rows per warpgroup and stages shrink until an estimate of the shared
memory fits the GPU.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

TABLE_PATH = Path(__file__).with_name("triton_tiles.json")
PASSES = ("fwd", "dkv", "dq")
MIN_TILE, MAX_TILE = 16, 128  # Triton dots need >= 16; larger tiles do not fit shared memory at H = 128
# Opt-in shared memory per block (bytes), from XLA's GPU descriptions (lcjax/plan/gpu_targets/).
SHARED_MEMORY = {"h100": 232448, "h200": 232448, "a100": 166912, "default": 101376}
FAMILY_FALLBACK = {"h200": ("h200", "h100"), "h100": ("h100",), "a100": ("a100",), "default": ()}


class PassConfig(NamedTuple):
    """Launch configuration of one kernel pass."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


def gpu_family(platform: str | None, device_kind: str | None) -> str:
    """"h100", "h200", "a100" or "default" from a device kind such as "NVIDIA H100 80GB HBM3".

    Not a GPU (the Pallas interpreter) → "h100", so interpret-mode runs use the Hopper tiles.
    """
    if platform != "gpu":
        return "h100"
    kind = (device_kind or "").upper()
    if "H200" in kind:
        return "h200"
    if "H100" in kind or "H800" in kind:
        return "h100"
    if "A100" in kind or "A800" in kind:
        return "a100"
    return "default"


@functools.lru_cache(maxsize=None)
def load_table(path: str = str(TABLE_PATH)) -> dict:
    """{(gpu, head_dim, dtype): {pass: PassConfig}} from the JSON table. Raises ValueError for an entry
    without all three passes or with a tile that is not a power of two in [16, 128]."""
    entries = json.loads(Path(path).read_text())["entries"]
    table = {}
    for e in entries:
        cfgs = {}
        for name in PASSES:
            if name not in e:
                raise ValueError(f"{path}: entry {e.get('gpu')}/{e.get('head_dim')}/{e.get('dtype')} lacks {name!r}")
            cfg = PassConfig(*map(int, e[name]))
            for tile in cfg[:2]:
                if tile & (tile - 1) or not MIN_TILE <= tile <= MAX_TILE:
                    raise ValueError(f"{path}: {name} tile {tile} must be a power of two in [16, 128]")
            cfgs[name] = cfg
        table[(e["gpu"], int(e["head_dim"]), e["dtype"])] = cfgs
    return table


def _dtype_key(dtype_name: str) -> str:
    return "float32" if dtype_name == "float32" else "bfloat16"


def _fallback(head_dim: int, dtype_name: str) -> dict:
    """Tiles for a GPU, head dim or dtype without an entry: fit in 100 KiB of shared memory."""
    base = 64 if head_dim * (4 if dtype_name == "float32" else 2) <= 256 else 32
    return {"fwd": PassConfig(base, base, 4, 2), "dkv": PassConfig(base // 2, base, 4, 2),
            "dq": PassConfig(base, base // 2, 4, 2)}


def tuned(family: str, head_dim: int, dtype_name: str, table: dict | None = None) -> dict:
    """{pass: PassConfig} for a GPU family, a padded (power-of-two) head dim and a dtype name."""
    table = load_table() if table is None else table
    hd = max(64, head_dim)
    for fam in FAMILY_FALLBACK.get(family, ()):
        cfgs = table.get((fam, hd, _dtype_key(dtype_name)))
        if cfgs is not None:
            return cfgs
    return _fallback(head_dim, dtype_name)


def _pow2_floor(x: int) -> int:
    return 1 << (int(x).bit_length() - 1)


def _pow2_ceil(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def clamp_tile(tile: int, length: int) -> int:
    """A requested tile as a power of two in [16, 128], no longer than ``length`` rounded up to a power of
    two. Raises ValueError for a tile < 1."""
    if int(tile) < 1:
        raise ValueError(f"block size {tile} must be >= 1")
    tile = min(_pow2_floor(tile), MAX_TILE, max(MIN_TILE, _pow2_ceil(length)))
    return max(tile, MIN_TILE)


def shared_memory_bytes(pass_name: str, block_q: int, block_k: int, head_dim: int, itemsize: int,
                        stages: int) -> int:
    """Rough shared memory of a pass: the resident tiles plus ``stages`` buffers of the streamed ones."""
    resident, streamed = {"fwd": (block_q, 2 * block_k), "dkv": (2 * block_k, 2 * block_q),
                          "dq": (2 * block_q, 2 * block_k)}[pass_name]
    return itemsize * head_dim * (resident + stages * streamed)


def resolve(pass_name: str, tuned_cfg: PassConfig, *, block_q: int | None, block_k: int | None, t_len: int,
            s_len: int, head_dim: int, itemsize: int, family: str) -> PassConfig:
    """The configuration one pass runs with: the tuned one, or the tiles the caller asked for (``None``
    keeps the tuned tile), clamped to the lengths; warps and stages adapted when the tiles changed."""
    bq = clamp_tile(tuned_cfg.block_q if block_q is None else block_q, t_len)
    bk = clamp_tile(tuned_cfg.block_k if block_k is None else block_k, s_len)
    if (bq, bk) == tuned_cfg[:2]:
        return tuned_cfg
    rows = bk if pass_name == "dkv" else bq  # the M of the kernel's matmuls: 64 per warpgroup of 4 warps
    warps = 4 * min(2, max(1, rows // 64))
    stages = tuned_cfg.num_stages
    budget = SHARED_MEMORY.get(family, SHARED_MEMORY["default"])
    while stages > 1 and shared_memory_bytes(pass_name, bq, bk, head_dim, itemsize, stages) > budget:
        stages -= 1
    return PassConfig(bq, bk, warps, stages)
