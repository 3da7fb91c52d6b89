"""Model soups: a weighted sum of same-named tensors."""
from __future__ import annotations

from .common import compute, fresh
from .registry import operation


@operation("weighted_sum", elementwise=True, numpy=True)
def weighted_sum(tensors: list, *, weights: list[float]):
    """sum_i weights[i] * tensors[i], in the plan's compute dtype, one input upcast at a time."""
    if len(weights) != len(tensors):
        raise ValueError(f"{len(weights)} weights for {len(tensors)} tensors")
    out = compute(tensors[0]) * weights[0]
    for w, t in zip(weights[1:], tensors[1:]):
        out += compute(t) * w  # not in place on t: a float32 input may be shared with another expression
    return out


@operation("mean", elementwise=True, numpy=True)
def mean(tensors: list):
    """The uniform soup: the sum divided once by the count (multiplying each input by a rounded 1/n
    first is not as accurate). In float64 for float32 inputs, the mean is then correctly rounded
    (up to the rare double rounding); the soup of identical inputs is that input."""
    out = fresh(tensors[0])
    for t in tensors[1:]:
        out += compute(t)
    out /= len(tensors)
    return out
