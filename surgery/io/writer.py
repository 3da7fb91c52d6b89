"""Streaming sharded safetensors writer.

The layout of every shard (names, offsets, header) is planned from (name, dtype, shape) before any
weight is computed, so each tensor's bytes go to disk as soon as they exist: peak memory is one
tensor, whatever the shard size. Files carry their final names and ``{"format": "pt"}`` metadata.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OutputError, PlanError
from .safetensors_header import DTYPE_SIZES
from .sink import open_sink

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units, as transformers uses); ``"200MiB"``; or a byte count."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise PlanError(f"cannot parse size {size!r}: use a byte count or a number with KB, MB, GB (or KiB, MiB, GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class Shard:
    filename: str
    tensors: tuple[TensorSpec, ...]  # in the order their bytes are written
    metadata: dict | None = field(default=None, hash=False)  # extra ``__metadata__`` strings (format: pt is always there)

    def header_bytes(self) -> bytes:
        header: dict = {"__metadata__": {"format": "pt", **(self.metadata or {})}}
        offset = 0
        for t in self.tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned
        return len(raw).to_bytes(8, "little") + raw

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[TensorSpec], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                metadata: dict | None = None) -> list[Shard]:
    """Fill shards greedily in tensor order (as transformers does); a tensor larger than the limit gets its own.

    Inside a shard, wider dtypes come first so every tensor starts aligned to its element size.
    """
    limit = parse_size(max_shard_size)
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        ordered = sorted(group, key=lambda t: -DTYPE_SIZES[t.dtype])  # stable: keeps name order within a width
        shards.append(Shard(name, tuple(ordered), metadata or None))
    return shards


def write_index(folder: Path, shards: list[Shard]) -> None:
    if len(shards) == 1:
        return
    index = {"metadata": {"total_size": sum(s.nbytes for s in shards)},
             "weight_map": {t.name: s.filename for s in shards for t in s.tensors}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class ShardWriter:
    """Writes one planned shard; tensors must arrive in the planned order with the planned dtype and shape."""

    def __init__(self, folder: Path, shard: Shard):
        self.shard = shard
        self.path = folder / shard.filename
        self._next = 0
        self._sink = open_sink(self.path)
        header = shard.header_bytes()
        self._sha = hashlib.sha256(header)  # the file's sha256, over bytes on their way to disk
        self._sink.write(np.frombuffer(header, dtype=np.uint8))
        self._closed = False

    def write(self, name: str, tensor) -> None:
        """Append ``tensor``: a torch tensor, or a flat numpy array in the spec's storage dtype
        (bf16 as uint16 bits), as the torch-free path produces."""
        spec = self.shard.tensors[self._next]
        if name != spec.name:
            raise PlanError(f"writer expected tensor {spec.name!r} next in {self.shard.filename}, got {name!r}")
        if isinstance(tensor, np.ndarray):
            data = np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)
            if data.nbytes != spec.nbytes or tensor.size != math.prod(spec.shape):
                raise PlanError(f"tensor {name!r} computed as {tensor.size} {tensor.dtype} values, planned as "
                                f"{spec.dtype}{list(spec.shape)}")
        else:
            from .read import SAFETENSORS_DTYPES

            dtype = SAFETENSORS_DTYPES.get(tensor.dtype)
            if dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise PlanError(f"tensor {name!r} computed as {dtype}{list(tensor.shape)}, planned as "
                                f"{spec.dtype}{list(spec.shape)}")
            data = tensor.detach().contiguous().cpu().reshape(-1).view(torch_uint8()).numpy() if spec.nbytes else None
        if spec.nbytes:
            self._sha.update(data)
            try:
                self._sink.write(data, final=self._next + 1 == len(self.shard.tensors))
            except OSError as e:
                raise OutputError(f"cannot write {self.path} (tensor {name}): {e.strerror or e}") from e
        self._next += 1
        if self._next == len(self.shard.tensors):
            self.close()

    @property
    def done(self) -> bool:
        return self._next == len(self.shard.tensors)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._sink.close()
            except OSError as e:
                raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from e
            if self.done:
                SHARD_SHA256[str(self.path)] = self._sha.hexdigest()


# sha256 of every shard file a ShardWriter completed, by path (``run_plan`` takes its outputs' from here)
SHARD_SHA256: dict[str, str] = {}


def torch_uint8():
    import torch

    return torch.uint8
