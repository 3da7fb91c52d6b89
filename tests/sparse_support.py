"""Independent references for grafting and sparse fine-tunes: brute-force global top-k in memory.

Nothing here imports ``surgery``. Tensors are read back with ``safetensors``; the selection sorts
every entry of every selected tensor by (float32 magnitude of the float64 difference, descending;
tensor order; flat index), which is the documented tie-breaking rule, and keeps the first k.
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from _support import read_folder


def stored_order(folder: Path) -> list[str]:
    """Tensor names in file order: shards in index order (or the single file), then data offset."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(dict.fromkeys(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    names = []
    for f in files:
        raw = (folder / f).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        names += sorted(header, key=lambda k: header[k]["data_offsets"][0])
    return names


def selected_names(base: dict, ft: dict, order: list[str], include: str | None = None) -> list[str]:
    """Float tensors in both with equal shapes; by default those inside numbered blocks."""
    block = re.compile(r"(?:^|\.)(layers|layer|h|blocks|block|resblocks)\.\d+(?=\.|$)")
    out = []
    for n in order:
        if n not in base or not ft[n].is_floating_point() or base[n].shape != ft[n].shape:
            continue
        if (re.search(include, n) if include else block.search(n)):
            out.append(n)
    return out


def magnitude_bits(base: torch.Tensor, ft: torch.Tensor) -> np.ndarray:
    d = (ft.double() - base.double()).abs().float().reshape(-1)
    return d.numpy().view(np.int32).astype(np.int64)


def brute_force_masks(base: dict, ft: dict, names: list[str], k: int) -> dict[str, np.ndarray]:
    """The k largest magnitudes over all ``names`` together, ties to the earlier tensor, then index."""
    bits = np.concatenate([magnitude_bits(base[n], ft[n]) for n in names])
    order = np.lexsort((np.arange(bits.size), -bits))  # by magnitude descending, then position
    chosen = np.zeros(bits.size, dtype=bool)
    chosen[order[:k]] = True
    masks, at = {}, 0
    for n in names:
        size = base[n].numel()
        masks[n] = chosen[at:at + size].reshape(tuple(base[n].shape))
        at += size
    return masks


def read_mask_file(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A mask file decoded by hand from its documented format."""
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
        tensors = json.loads(meta["tensors"])
        out = {}
        for name, t in tensors.items():
            raw = f.get_tensor(name)
            numel = math.prod(t["shape"])
            if t["encoding"] == "indices":
                m = np.zeros(numel, dtype=bool)
                m[raw] = True
            else:
                m = np.unpackbits(raw, bitorder="little")[:numel].astype(bool)
            out[name] = m.reshape(t["shape"])
    return meta, out


def load(folder) -> dict[str, torch.Tensor]:
    return read_folder(Path(folder))
