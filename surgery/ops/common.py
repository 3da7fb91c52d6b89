"""Helpers shared by operations: the compute precision, and arithmetic that works on either array type.

Elementwise operations written with operators and these helpers run on torch tensors (any device)
and on numpy arrays (the torch-free CPU path) alike, with the same IEEE results.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
from typing import Iterator

import numpy as np

# Set per plan by the executor, as a safetensors dtype code: soups accumulate in float32 (their
# reference is a float32 mean); task-vector arithmetic runs in float64, where
# ``target + s * (ft - base)`` suffers no cancellation and the result is rounded once, to the output dtype.
_COMPUTE_DTYPE: contextvars.ContextVar[str] = contextvars.ContextVar("surgery_compute_dtype", default="F32")
_NUMPY_FLOATS = {"F32": np.float32, "F64": np.float64}


class _LazyModule:
    """A module imported on first attribute access: plans are built, and numpy-only runs executed,
    without paying torch's import time."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


torch = _LazyModule("torch")


def _target(t):
    if isinstance(t, np.ndarray):
        return np.promote_types(t.dtype, _NUMPY_FLOATS[_COMPUTE_DTYPE.get()])
    from ..io.read import TORCH_DTYPES

    return torch.promote_types(t.dtype, TORCH_DTYPES[_COMPUTE_DTYPE.get()])


def compute(t):
    """The tensor in the compute dtype (the plan's, or wider if the input already is); may be ``t``."""
    return t.astype(_target(t), copy=False) if isinstance(t, np.ndarray) else t.to(_target(t))


def fresh(t):
    """A new tensor in the compute dtype, safe to update in place (inputs may be shared)."""
    return t.astype(_target(t), copy=True) if isinstance(t, np.ndarray) else t.to(_target(t), copy=True)


def owned(t) -> bool:
    """True for a numpy array an operation may update in place: the result of another operation
    (each is used once, by its parent in the tree). The numpy path hands inputs over read-only;
    torch tensors are never assumed owned."""
    return isinstance(t, np.ndarray) and t.flags.writeable and t.flags.owndata


def left_to_right_sum(terms: list):
    """terms[0] + terms[1] + ... added left to right, never into an input (into ``terms[0]`` when
    it is an owned intermediate: fewer buffers, the same bits)."""
    if len(terms) == 1:
        return terms[0] if owned(terms[0]) else fresh(terms[0])
    if owned(terms[0]):
        out = terms[0]
        out += terms[1]
    else:
        out = terms[0] + terms[1]
    for t in terms[2:]:
        out += t
    return out


def where(mask, a, b):
    return np.where(mask, a, b) if isinstance(mask, np.ndarray) else torch.where(mask, a, b)


def flat_nonzero(x):
    return np.flatnonzero(x) if isinstance(x, np.ndarray) else x.reshape(-1).nonzero().reshape(-1)


def cat(parts: list, like):
    """Concatenate flat pieces (an empty result takes ``like``'s array type and dtype)."""
    if isinstance(like, np.ndarray):
        return np.concatenate(parts) if parts else np.zeros(0, dtype=like.dtype)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=like.dtype, device=like.device)


def map_ranges(fn, numel: int, block: int, like) -> list:
    """``fn(lo, hi)`` over contiguous block-aligned ranges of ``0..numel``, results in order: on
    numpy arrays one range per core on the engine's threads (numpy's loops release the GIL); torch
    spreads its own kernels over the cores, so there it is one range."""
    if isinstance(like, np.ndarray):
        from ..engine.parallel import map_ranges as spread

        return spread(fn, numel, block)
    return [fn(0, numel)]


def magnitude_bits(t):
    """float32 magnitudes as int32 bit patterns (which order as the magnitudes do), flat."""
    if isinstance(t, np.ndarray):
        return np.abs(t).astype(np.float32, copy=False).reshape(-1).view(np.int32)
    return t.detach().abs().to(torch.float32).reshape(-1).view(torch.int32)


class Linear:
    """An integer combination of an expression's leaves, ``sum_i coeffs[i] * leaf_i``: the value an
    operation's rounding step would have if it were exact (see ``Operation.steps``). Multiplying by
    anything but an integer raises ``ValueError``: such a step is not exact in general."""

    __slots__ = ("coeffs",)

    def __init__(self, coeffs: dict):
        self.coeffs = {k: c for k, c in coeffs.items() if c}

    def __add__(self, other: "Linear") -> "Linear":
        return Linear({k: self.coeffs.get(k, 0) + other.coeffs.get(k, 0) for k in {**self.coeffs, **other.coeffs}})

    def __sub__(self, other: "Linear") -> "Linear":
        return self + other * -1

    def __mul__(self, factor: float) -> "Linear":
        if float(factor) != int(factor):
            raise ValueError(f"not an integer factor: {factor}")
        return Linear({k: c * int(factor) for k, c in self.coeffs.items()})


def partial_sums(terms: list) -> list:
    """The values ``left_to_right_sum`` rounds: terms[0] + terms[1], then + terms[2], ..."""
    out, total = [], terms[0]
    for t in terms[1:]:
        total = total + t
        out.append(total)
    return out or [total]


def current_compute_dtype() -> str:
    return _COMPUTE_DTYPE.get()


@contextlib.contextmanager
def compute_dtype(code: str) -> Iterator[None]:
    """Run operations in ``code`` ("F32" or "F64") precision."""
    if code not in _NUMPY_FLOATS:
        raise ValueError(f"compute dtype must be F32 or F64, not {code!r}")
    token = _COMPUTE_DTYPE.set(code)
    try:
        yield
    finally:
        _COMPUTE_DTYPE.reset(token)
