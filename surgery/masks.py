"""Mask files: which entries of which tensors a sparse method selected, as plain safetensors.

Format (version 1), readable with ``safetensors.safe_open``:

* one entry per masked tensor, under the tensor's own name, either
  ``U8 [ceil(numel / 64) * 8]``: the flattened (row-major) mask as bits, little-endian within each
  byte (``numpy.packbits(bitorder="little")``), zero-padded to a multiple of 8 bytes, or
  ``I64 [kept]``: the flat row-major indices of the selected entries, ascending;
* ``__metadata__``: ``format = "surgery-mask"``, ``version = "1"``, ``tensors`` (JSON: per name its
  ``shape``, ``encoding`` (``bits`` or ``indices``) and ``kept``), ``kept``, ``total`` (entries over
  all masked tensors), ``density``, and ``recipe`` (JSON: what made it).

Every entry is a multiple of 8 bytes, so entries can be written in any order and stay aligned.
Tensors a mask does not list are not masked.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .io.safetensors_header import format_metadata, read_header
from .io.writer import TensorSpec

FORMAT = "surgery-mask"


def encoding_for(numel: int, kept: int) -> str:
    """The smaller encoding: indices cost 8 bytes per kept entry, bits one per 8 entries."""
    return "indices" if 8 * kept < bits_bytes(numel) else "bits"


def bits_bytes(numel: int) -> int:
    return -(-numel // 64) * 8


def entry_spec(name: str, numel: int, kept: int) -> TensorSpec:
    if encoding_for(numel, kept) == "indices":
        return TensorSpec(name, "I64", (kept,))
    return TensorSpec(name, "U8", (bits_bytes(numel),))


def encode(mask: np.ndarray, encoding: str) -> np.ndarray:
    """A flat bool mask as the entry's array."""
    flat = np.ascontiguousarray(mask).reshape(-1)
    if encoding == "indices":
        return np.flatnonzero(flat).astype(np.int64)
    packed = np.packbits(flat, bitorder="little")
    return np.concatenate([packed, np.zeros(bits_bytes(flat.size) - packed.size, dtype=np.uint8)])


def metadata(tensors: dict[str, dict], recipe: dict) -> dict[str, str]:
    kept = sum(t["kept"] for t in tensors.values())
    total = sum(math.prod(t["shape"]) for t in tensors.values())
    return {"format": FORMAT, "version": "1", "tensors": json.dumps(tensors, sort_keys=True), "kept": str(kept),
            "total": str(total), "density": repr(kept / total if total else 0.0),
            "recipe": json.dumps(recipe, sort_keys=True)}


@dataclass
class Mask:
    """A mask file, opened by header; ``tensor(name)`` reads one tensor's mask."""

    path: Path
    tensors: dict[str, dict]  # name -> {"shape", "encoding", "kept"}
    recipe: dict
    _entries: dict

    @classmethod
    def open(cls, path) -> "Mask":
        path = Path(path)
        entries, meta = read_header(str(path))
        tensors, recipe = format_metadata(meta, FORMAT, "mask", str(path))
        for name, t in tensors.items():
            info = entries.get(name)
            numel = math.prod(t["shape"])
            want = ("I64", (t["kept"],)) if t["encoding"] == "indices" else ("U8", (bits_bytes(numel),))
            if info is None or (info.dtype, tuple(info.shape)) != want:
                raise CheckpointError(f"mask entry does not match its metadata (expected {want[0]}{list(want[1])})",
                                      file=str(path), tensor=name)
        return cls(path, tensors, recipe, entries)

    @property
    def kept(self) -> int:
        return sum(t["kept"] for t in self.tensors.values())

    @property
    def total(self) -> int:
        return sum(math.prod(t["shape"]) for t in self.tensors.values())

    def tensor(self, name: str) -> np.ndarray:
        """The mask of one tensor, as a bool array of its shape."""
        from .io.pread import pread_into

        t = self.tensors[name]
        info = self._entries[name]
        raw = np.empty(info.nbytes, dtype=np.uint8)
        if info.nbytes:
            pread_into(info, memoryview(raw))
        numel = math.prod(t["shape"])
        if t["encoding"] == "indices":
            idx = raw.view(np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= numel):
                raise CheckpointError("mask indices out of range", file=str(self.path), tensor=name)
            mask = np.zeros(numel, dtype=bool)
            mask[idx] = True
        else:
            mask = np.unpackbits(raw, count=numel, bitorder="little").astype(bool)
        return mask.reshape(t["shape"])
