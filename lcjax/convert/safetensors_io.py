"""Streaming safetensors I/O with numpy only (no torch): one tensor in memory at a time when reading,
one output shard when writing.

Reading parses the file header (an 8-byte little-endian length, then a JSON table of name → dtype, shape,
byte range) and reads each tensor's bytes straight from the file, so bfloat16 works too (numpy has no
bfloat16; ``ml_dtypes``, which JAX depends on, provides it, whereas ``safe_open(framework="numpy")`` rejects
it). Writing uses ``safetensors.numpy.save_file`` shard by shard, with transformers' ``model.safetensors``
or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` layout.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsFolder:
    """The tensors of a Hugging Face folder (``model.safetensors`` or its sharded form), read lazily.

    ``names``: every tensor name; ``shape(name)``, ``dtype(name)``; ``read(name)`` → numpy array.
    Raises ValueError (one line naming the file) when there are no safetensors or a header is corrupt.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{folder}: no *.safetensors files (pytorch_model.bin is not read: convert it "
                             f"with transformers' save_pretrained(safe_serialization=True))")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for path in files:
            header, start = _header(path)
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (path, info, start)

    @property
    def names(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self._where[name][1]["dtype"]])

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` in its stored dtype (a fresh array, not a view of the file)."""
        path, info, start = self._where[name]
        begin, end = info["data_offsets"]
        dtype = self.dtype(name)
        count = (end - begin) // dtype.itemsize
        with open(path, "rb") as f:
            f.seek(start + begin)
            data = np.fromfile(f, dtype=dtype, count=count)
        if data.size != int(np.prod(info["shape"], dtype=np.int64)):
            raise ValueError(f"{path}: tensor {name} is truncated")
        return data.reshape(info["shape"])


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: not a safetensors file (bad header)") from None
    for name, info in header.items():
        if name != "__metadata__" and info.get("dtype") not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    return header, 8 + size


class ShardWriter:
    """Write tensors into shards of at most ``max_shard_bytes`` (one shard in memory), then the index.

    Use ``add(name, array)`` for each tensor and ``close()`` at the end. A single shard is named
    ``model.safetensors`` (no index), as transformers does.
    """

    def __init__(self, folder: str | Path, max_shard_bytes: int = 5 * 10**9):
        self.folder, self.max_bytes = Path(folder), max_shard_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if self._pending and self._pending_bytes + array.nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = np.ascontiguousarray(array)
        self._pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _flush(self) -> None:
        from safetensors.numpy import save_file

        index = len(self._shards)
        save_file(self._pending, str(self.folder / f"shard-{index}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name the files as transformers does; return the file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.folder / f"shard-{i}.tmp").rename(self.folder / name)
            (self.folder / name).chmod(0o644)  # safetensors creates files readable by the owner only
        if n > 1:
            weight_map = {t: names[i] for i, tensors in enumerate(self._shards) for t in tensors}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names
