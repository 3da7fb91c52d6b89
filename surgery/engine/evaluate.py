"""Evaluating an expression tree on whatever arrays its leaves were loaded as."""
from __future__ import annotations

from typing import Callable, Mapping

from ..ops.registry import get_operation
from .plan import Call, Expr, Ref


def evaluate(expr: Expr, loaded: Mapping[Ref, object]):
    if isinstance(expr, Ref):
        return loaded[expr]
    assert isinstance(expr, Call)
    args = [evaluate(a, loaded) for a in expr.args]
    return get_operation(expr.op).fn(args, **expr.kwargs)


def compile_expr(expr: Expr) -> Callable[[Mapping[Ref, object]], object]:
    """``evaluate`` with the operations looked up and their parameters built once: for evaluating
    the same tree on thousands of blocks."""
    if isinstance(expr, Ref):
        return lambda loaded: loaded[expr]
    fn, kwargs = get_operation(expr.op).fn, expr.kwargs
    args = [compile_expr(a) for a in expr.args]
    return lambda loaded: fn([a(loaded) for a in args], **kwargs)


def elementwise(expr: Expr) -> bool:
    """True when every operation in the tree is elementwise (and there is at least one)."""
    return isinstance(expr, Call) and get_operation(expr.op).elementwise and \
        all(isinstance(a, Ref) or elementwise(a) for a in expr.args)


def numpy_capable(expr: Expr) -> bool:
    """True when every operation in the tree also runs on numpy arrays (a bare reference does)."""
    return isinstance(expr, Ref) or (get_operation(expr.op).numpy and all(numpy_capable(a) for a in expr.args))
