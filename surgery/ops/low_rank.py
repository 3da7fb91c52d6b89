"""Low-rank corrections of a weight: ``W + left @ right`` (intruder mitigation writes these)."""
from __future__ import annotations

from .common import compute
from .registry import operation


@operation("add_low_rank")
def add_low_rank(tensors: list):
    """``tensors[0] + tensors[1] @ tensors[2]`` in the compute dtype (float32 or wider): a weight plus
    a correction given by its two factors, left (out x j) and right (j x in)."""
    w, left, right = (compute(t) for t in tensors)
    return w + (left.to(w.dtype) @ right.to(w.dtype)).reshape(w.shape)
