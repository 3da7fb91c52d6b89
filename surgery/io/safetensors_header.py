"""Reading and validating a safetensors header with nothing but the standard library.

Format: u64 little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data. Offsets are relative to the end of the header. Keeping this torch-free is what
lets ``surgery inspect`` answer from headers in a fraction of a second.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from ..errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the upstream reader's own cap

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live. Plain data, so plans that carry it stay serialisable."""

    name: str
    file: str  # absolute path of the shard
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Return ``(tensors, metadata)`` of one safetensors file, checking every entry against the file size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError("not a safetensors file: shorter than its 8-byte header length", file=path)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"corrupt or truncated safetensors header (declares {n} header bytes, file has {size})", file=path)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", file=path) from e
    return parse_header(raw, size, path)


def parse_header(raw: bytes, size: int, path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``(tensors, metadata)`` from the JSON header bytes of a safetensors file of ``size`` bytes
    (read here from a file, or over HTTP by a ranged request for a Hub shard), checked as
    :func:`read_header` checks them; ``path`` is where the file is (or will be, once downloaded)."""
    n = len(raw)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt safetensors header: {e}", file=path) from e
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors header: not a JSON object", file=path)
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"corrupt header entry: {e}", file=path, tensor=name) from e
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"unsupported dtype {dtype}", file=path, tensor=name)
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if any(d < 0 for d in shape) or end - begin != expected or begin < 0:
            raise CheckpointError(
                f"header says {end - begin} bytes but shape {list(shape)} of {dtype} needs {expected}", file=path, tensor=name)
        if end > data_size:
            raise CheckpointError(
                f"truncated: tensor ends at byte {end} of the data but the file holds only {data_size}",
                file=path, tensor=name)
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CheckpointError(f"corrupt header: overlaps tensor {prev!r}", file=path, tensor=name)
    # in data order (the JSON key order is arbitrary): reads walk the file forwards, and "file order"
    # (the tie-break of global top-k, the order of outputs) means one thing
    return {name: tensors[name] for _, _, name in spans}, metadata


def format_metadata(meta: dict | None, expected: str, what: str, path: str, hint: str = "") -> tuple[dict, dict]:
    """``(tensors, recipe)`` from the JSON metadata of a file format built on safetensors (masks,
    sparse fine-tunes), after checking its ``format`` field."""
    meta = meta or {}
    if meta.get("format") != expected:
        raise CheckpointError(f"not a surgery {what} file (metadata format is {meta.get('format')!r}){hint}", file=path)
    try:
        return json.loads(meta["tensors"]), json.loads(meta.get("recipe", "{}"))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{what} metadata is unreadable: {e}", file=path) from e
