"""Model soups: a weighted sum of same-named tensors."""
from __future__ import annotations

from .common import compute, left_to_right_sum, partial_sums
from .registry import operation


def _weighted_sum_steps(*terms, weights):
    scaled = [t if w == 1 else t * w for w, t in zip(weights, terms)]
    return [t for w, t in zip(weights, scaled) if w != 1] + partial_sums(scaled)


@operation("weighted_sum", elementwise=True, numpy=True, steps=_weighted_sum_steps)
def weighted_sum(tensors: list, *, weights: list[float]):
    """sum_i weights[i] * tensors[i], in the plan's compute dtype, added left to right. A weight of
    exactly 1 multiplies nothing (``x * 1.0`` is ``x``), which task arithmetic's unit weights save."""
    if len(weights) != len(tensors):
        raise ValueError(f"{len(weights)} weights for {len(tensors)} tensors")
    return left_to_right_sum([compute(t) if w == 1 else compute(t) * w for w, t in zip(weights, tensors)])


@operation("mean", elementwise=True, numpy=True)
def mean(tensors: list):
    """The uniform soup: the sum divided once by the count (multiplying each input by a rounded 1/n
    first is not as accurate). In float64 for float32 inputs, the mean is then correctly rounded
    (up to the rare double rounding); the soup of identical inputs is that input."""
    out = left_to_right_sum([compute(t) for t in tensors])
    out /= len(tensors)
    return out
