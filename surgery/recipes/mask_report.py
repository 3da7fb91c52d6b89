"""Mask reports: density per tensor and per layer, and how far the masks of different tasks overlap.

The grafting paper finds that the regions of different tasks are nearly disjoint and that their
overlap tracks task similarity; ``overlap`` gives intersection over union and the overlap
coefficient (intersection over the smaller mask) for every pair, overall and per layer.
"""
from __future__ import annotations

import math
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np

from ..layers import block_index
from ..masks import Mask


def layer_of(name: str) -> str:
    """``layers.3`` style for tensors inside a numbered block, ``other`` for the rest."""
    found = block_index(name)
    return f"{found[0]}.{found[1]}" if found else "other"


def _layer_order(key: str):
    return (1, 0, key) if key == "other" else (0, int(key.rsplit(".", 1)[1]), key)


def stats(mask: Mask | str | Path) -> dict:
    """Kept entries and density per tensor, per layer and overall (from the header alone)."""
    mask = mask if isinstance(mask, Mask) else Mask.open(mask)
    tensors, layers = {}, defaultdict(lambda: [0, 0])
    for name, t in mask.tensors.items():
        numel = math.prod(t["shape"])
        tensors[name] = {"kept": t["kept"], "numel": numel, "density": t["kept"] / numel if numel else 0.0}
        layers[layer_of(name)][0] += t["kept"]
        layers[layer_of(name)][1] += numel
    return {"mask": str(mask.path), "kept": mask.kept, "total": mask.total,
            "density": mask.kept / mask.total if mask.total else 0.0, "tensors": tensors,
            "layers": {k: {"kept": v[0], "numel": v[1], "density": v[0] / v[1] if v[1] else 0.0}
                       for k, v in sorted(layers.items(), key=lambda kv: _layer_order(kv[0]))}}


def _scores(inter: int, a: int, b: int) -> dict:
    union = a + b - inter
    return {"intersection": inter, "union": union, "kept_a": a, "kept_b": b,
            "iou": inter / union if union else 0.0, "overlap": inter / min(a, b) if min(a, b) else 0.0}


def overlap(masks: Sequence[Mask | str | Path]) -> dict:
    """For every pair of masks: intersection, union, IoU and overlap coefficient, overall and per
    layer. Tensors are compared one at a time, so memory holds two tensors' masks."""
    masks = [m if isinstance(m, Mask) else Mask.open(m) for m in masks]
    pairs = []
    for (i, a), (j, b) in combinations(enumerate(masks), 2):
        per_layer = defaultdict(lambda: [0, 0, 0])
        for name in sorted(set(a.tensors) | set(b.tensors)):
            ka = a.tensors.get(name, {}).get("kept", 0)
            kb = b.tensors.get(name, {}).get("kept", 0)
            if name in a.tensors and name in b.tensors:
                if a.tensors[name]["shape"] != b.tensors[name]["shape"]:
                    raise ValueError(f"{name}: shape {a.tensors[name]['shape']} in {a.path}, "
                                     f"{b.tensors[name]['shape']} in {b.path}")
                inter = int(np.count_nonzero(a.tensor(name) & b.tensor(name))) if ka and kb else 0
            else:
                inter = 0
            acc = per_layer[layer_of(name)]
            acc[0] += inter
            acc[1] += ka
            acc[2] += kb
        total = [sum(v[k] for v in per_layer.values()) for k in range(3)]
        pairs.append({"a": str(a.path), "b": str(b.path), "index": [i, j], **_scores(*total),
                      "layers": {k: _scores(*v) for k, v in sorted(per_layer.items(), key=lambda kv: _layer_order(kv[0]))}})
    return {"masks": [str(m.path) for m in masks], "pairs": pairs}
