"""Sparse fine-tune (SFT) files: a fine-tune's change as index/value pairs, composable by addition.

Format (version 1), one safetensors file, readable with ``safetensors.safe_open``:

* per sparse tensor ``N``: ``N.indices`` (``[k]`` flat row-major indices, ascending: ``I32`` beside
  float32 values, ``I64`` beside float64 values or for tensors of 2**31 entries or more) and
  ``N.values`` (``[k]``, the change ``ft - base`` at those entries, one precision above the model's:
  float32 for bf16/fp16 models, float64 for float32);
* per densely tuned tensor: ``N.delta`` (the whole change, same precision rule);
* per tensor the base lacks (a new classifier head): ``N.absolute`` (the fine-tune's values);
* ``__metadata__``: ``format = "surgery-sft"``, ``version = "1"``, ``base`` (where it was extracted
  from) and ``base_sha256`` (content hash of the base: sha256 over the sorted ``name<TAB>sha256 of
  its bytes`` lines), ``tensors`` (JSON: per model tensor its ``kind`` (sparse, dense, absolute),
  ``shape``, ``dtype`` and ``kept``), ``kept``, ``total``, ``density`` and ``recipe`` (JSON).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .errors import CheckpointError
from .io.checkpoint import Checkpoint, open_checkpoint
from .io.safetensors_header import format_metadata

FORMAT = "surgery-sft"
VALUE_DTYPE = {"BF16": "F32", "F16": "F32", "F32": "F64", "F64": "F64"}
SUFFIX = {"sparse": (".indices", ".values"), "dense": (".delta",), "absolute": (".absolute",)}


@dataclass
class SparseFineTune:
    """An opened SFT file: its checkpoint (for streamed reads of the entries) and its metadata."""

    checkpoint: Checkpoint
    tensors: dict[str, dict]  # model tensor name -> {"kind", "shape", "dtype", "kept"}
    base: str | None
    base_sha256: str | None
    recipe: dict

    @classmethod
    def open(cls, path) -> "SparseFineTune":
        ckpt = open_checkpoint(path)
        meta = _metadata(ckpt)
        tensors, recipe = format_metadata(meta, FORMAT, "SFT", str(path),
                                          "; composable-sft pytorch_diff.bin files are read with --allow-pickle")
        for name, t in tensors.items():
            for suffix in SUFFIX.get(t.get("kind"), ()):
                if ckpt.resolve(name + suffix) is None:
                    raise CheckpointError(f"SFT lists {t['kind']} tensor but has no {name + suffix} entry",
                                          file=str(path), tensor=name)
            if t.get("kind") not in SUFFIX:
                raise CheckpointError(f"unknown SFT tensor kind {t.get('kind')!r}", file=str(path), tensor=name)
        return cls(ckpt, tensors, meta.get("base"), meta.get("base_sha256"), recipe)

    def entries(self, name: str) -> tuple[str, ...]:
        return tuple(name + s for s in SUFFIX[self.tensors[name]["kind"]])


def metadata(tensors: dict[str, dict], *, base: str, base_sha256: str | None, recipe: dict,
             total: int | None = None) -> dict[str, str]:
    """``total``: the entries the selection ran over (default: those of the sparse tensors listed;
    tensors that kept nothing are not listed)."""
    sparse = {n: t for n, t in tensors.items() if t["kind"] == "sparse"}
    kept = sum(t["kept"] for t in sparse.values())
    if total is None:
        total = sum(math.prod(t["shape"]) for t in sparse.values())
    return {"format": FORMAT, "version": "1", "base": base, "base_sha256": base_sha256 or "",
            "tensors": json.dumps(tensors, sort_keys=True), "kept": str(kept), "total": str(total),
            "density": repr(kept / total if total else 0.0), "recipe": json.dumps(recipe, sort_keys=True)}


def _metadata(ckpt: Checkpoint) -> dict:
    from .io.safetensors_header import read_header

    if len(ckpt.files) != 1:
        raise CheckpointError("an SFT is one safetensors file", file=ckpt.source)
    return read_header(ckpt.files[0])[1] or {}
