"""LoRA adapters: the low-rank delta of one weight, and the zero delta of a weight an adapter leaves alone.

Inputs arrive as the executor's path reads them: shaped torch tensors, or flat numpy arrays on the
torch-free CPU path. The delta is computed from the two small factors (the base weight lends only
its shape), in the plan's compute dtype.
"""
from __future__ import annotations

import numpy as np

from .common import compute, torch
from .registry import operation


@operation("lora_delta", numpy=True)
def lora_delta(tensors: list, *, rank: int, scaling: float, transpose: bool = False):
    """``scaling * (B @ A)`` for ``tensors = [W, A, B]`` (A is rank x in, B is out x rank), transposed
    when the base stores the weight as in x out: GPT-2's Conv1D (``fan_in_fan_out``) and embeddings,
    whose factors peft keeps as (rank x vocab) and (dim x rank).

    ``W`` is the base weight the delta belongs to; only its shape is used (flat on the numpy path,
    shaped on torch), so the delta comes out in the same form and size as the weight it is added
    to, and statistics passes size the tensor from it."""
    like, a, b = tensors
    delta = compute(b).reshape(-1, rank) @ compute(a).reshape(rank, -1)
    if transpose:
        delta = delta.T
    return (delta * scaling).reshape(like.shape)


@operation("zeros_like", elementwise=True, numpy=True)
def zeros_like(tensors: list):
    """Zeros shaped like ``tensors[0]``, in the compute dtype: the delta of a tensor an adapter does
    not touch. (Not ``0 * x``: that is NaN where x is infinite.)"""
    t = tensors[0]
    dtype = compute(t.reshape(-1)[:0]).dtype  # the compute dtype without converting the tensor
    if isinstance(t, np.ndarray):
        return np.zeros(t.shape, dtype=dtype)
    return torch.zeros(t.shape, dtype=dtype, device=t.device)
