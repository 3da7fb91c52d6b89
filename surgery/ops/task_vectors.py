"""Task-vector algebra: differences, sums, scaling, and zero-padding rows for vocabulary changes."""
from __future__ import annotations

from .common import compute, left_to_right_sum, partial_sums, torch
from .registry import operation


@operation("sub", elementwise=True, numpy=True, steps=lambda a, b: [a - b])
def sub(tensors: list[torch.Tensor]) -> torch.Tensor:
    """tensors[0] - tensors[1]: a task vector, fine-tuned minus base."""
    return compute(tensors[0]) - compute(tensors[1])


@operation("add", elementwise=True, numpy=True, steps=lambda *terms: partial_sums(list(terms)))
def add(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of all inputs, left to right."""
    return left_to_right_sum([compute(t) for t in tensors])


@operation("scale", elementwise=True, numpy=True, steps=lambda x, *, factor: [x * factor])
def scale(tensors: list[torch.Tensor], *, factor: float) -> torch.Tensor:
    """factor * tensors[0]."""
    return compute(tensors[0]) * factor


@operation("pad_rows")
def pad_rows(tensors: list[torch.Tensor], *, rows: int) -> torch.Tensor:
    """tensors[0] with zero rows appended up to ``rows`` (embeddings and heads of a grown vocabulary)."""
    t = tensors[0]
    if t.shape[0] >= rows:
        return t
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


@operation("add_with_new_rows")
def add_with_new_rows(tensors: list[torch.Tensor], *, factor: float) -> torch.Tensor:
    """``target + factor * delta`` on the target's rows; the delta's further rows as they are.

    For a fine-tune that grew the vocabulary: against a zero-padded base, the delta's new rows are
    the fine-tune's own rows, and they must arrive unscaled (there is nothing of the target's to
    interpolate with)."""
    target, delta = compute(tensors[0]), compute(tensors[1])
    out = delta.clone()
    n = target.shape[0]
    out[:n] = target + delta[:n] * factor
    return out
