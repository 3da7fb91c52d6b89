"""Operations that move tensors without arithmetic."""
from __future__ import annotations

import numpy as np

from ..engine.plan import SCOPE
from .registry import operation


@operation("copy", numpy=True)
def copy(tensors: list):
    """The first input unchanged: integer and bool buffers, and tensors an operation leaves alone."""
    return tensors[0]


@operation("round_to", elementwise=True, numpy=True)
def round_to(tensors: list, *, dtype: str):
    """The input rounded to ``dtype`` and back to the compute dtype: what a chained recipe step's
    value is when its result would have been saved in ``dtype`` (so a chain equals saved steps)."""
    from .common import compute

    t = tensors[0]
    if isinstance(t, np.ndarray):  # the torch-free path: round exactly as its writer stores
        from ..engine.numpy_compute import STORAGE, store, widen

        out = np.empty(t.shape, dtype=STORAGE[dtype])
        store(t, dtype, out)
        return compute(widen(out, dtype))
    from ..io.read import TORCH_DTYPES

    return compute(t.to(TORCH_DTYPES[dtype]))


@operation(SCOPE, elementwise=True, numpy=True)
def at_precision(tensors: list, *, dtype: str):
    """The input, its operations computed in ``dtype`` ("F32" or "F64") whatever the plan's compute
    dtype: a recipe step chained into another keeps the precision it has as a command of its own.
    The evaluator opens the scope (``engine.evaluate``); here the value passes through."""
    return tensors[0]
