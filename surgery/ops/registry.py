"""The one place operations are registered by name.

An operation is a pure function ``fn(tensors, **params) -> tensor`` over the same-named tensors of
its inputs. Parameters are keyword-only and annotated; plans refer to operations by name, so a plan
stays plain data and adding a method means adding one decorated function.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from ..errors import PlanError


@dataclass(frozen=True)
class Operation:
    name: str
    fn: Callable
    params: tuple[str, ...]
    required: tuple[str, ...]
    doc: str
    elementwise: bool  # output element i depends only on input elements i: safe to run block by block
    numpy: bool  # written with operators and ops.common helpers only: runs on numpy arrays as well
    # for operations that add, subtract and multiply by integers: ``steps(*args, **params)`` maps the
    # arguments' values (``ops.common.Linear``, integer combinations of the leaves) to the value of
    # every rounding operation the function performs, in order, its result last; None otherwise
    steps: Callable | None = None

    def check(self, params: dict) -> None:
        unknown = set(params) - set(self.params)
        missing = set(self.required) - set(params)
        if unknown or missing:
            raise PlanError(f"operation {self.name!r}: unknown parameters {sorted(unknown)}, missing {sorted(missing)}; "
                            f"it takes {list(self.params)}")


OPERATIONS: dict[str, Operation] = {}


def operation(name: str, *, elementwise: bool = False, numpy: bool = False, steps: Callable | None = None):
    """Register ``fn`` under ``name``. Its first positional argument is the list of input tensors.

    ``elementwise`` operations take and return same-shaped tensors and may be given any matching
    slices of them; the executor then runs them cache block by cache block, which on CPU is about
    twice as fast as whole-tensor temporaries and gives the same bits. ``numpy`` operations use
    nothing torch-specific, so plans made only of them run on the torch-free CPU path. ``steps``
    (see :class:`Operation`) lets float64 plans of such operations run in float32 where that is
    provably exact (``engine.narrow``).
    """

    def register(fn: Callable) -> Callable:
        if name in OPERATIONS:
            raise PlanError(f"operation {name!r} registered twice")
        sig = inspect.signature(fn)
        kw = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        OPERATIONS[name] = Operation(name, fn, tuple(p.name for p in kw),
                                     tuple(p.name for p in kw if p.default is inspect.Parameter.empty),
                                     inspect.getdoc(fn) or "", elementwise, numpy, steps)
        return fn

    return register


def get_operation(name: str) -> Operation:
    op = OPERATIONS.get(name)
    if op is not None:  # the common case, on every block: no import machinery
        return op
    from . import load_all

    load_all()
    try:
        return OPERATIONS[name]
    except KeyError:
        raise PlanError(f"unknown operation {name!r}; known: {', '.join(sorted(OPERATIONS))}") from None
