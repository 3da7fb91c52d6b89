"""Helpers shared by operations: the compute precision every float operation works in."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

# Set per plan by the executor: soups accumulate in float32 (their reference is a float32 mean);
# task-vector arithmetic runs in float64, where ``target + s * (ft - base)`` suffers no cancellation
# and the result is rounded once, to the output dtype.
_COMPUTE_DTYPE: contextvars.ContextVar[torch.dtype] = contextvars.ContextVar("surgery_compute_dtype",
                                                                             default=torch.float32)


def compute(t: torch.Tensor) -> torch.Tensor:
    """The tensor in the compute dtype (the plan's, or wider if the input already is)."""
    return t.to(torch.promote_types(t.dtype, _COMPUTE_DTYPE.get()))


@contextlib.contextmanager
def compute_dtype(dtype: torch.dtype) -> Iterator[None]:
    token = _COMPUTE_DTYPE.set(dtype)
    try:
        yield
    finally:
        _COMPUTE_DTYPE.reset(token)
