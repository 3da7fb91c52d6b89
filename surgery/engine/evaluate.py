"""Evaluating an expression tree on whatever arrays its leaves were loaded as."""
from __future__ import annotations

from typing import Callable, Mapping

from ..ops.common import compute_dtype
from ..ops.registry import get_operation
from .plan import SCOPE, Call, Expr, Ref


def evaluate(expr: Expr, loaded: Mapping[Ref, object], memo: dict | None = None):
    """The tree's value. ``memo`` (sub-expression -> value) holds values computed before from the
    same leaves: a sub-expression found there is not computed again, and new ones are added."""
    if isinstance(expr, Ref):
        return loaded[expr]
    assert isinstance(expr, Call)
    if memo is not None and expr in memo:
        return memo[expr]
    if expr.op == SCOPE:
        with compute_dtype(expr.kwargs["dtype"]):
            return evaluate(expr.args[0], loaded, memo)
    args = [evaluate(a, loaded, memo) for a in expr.args]
    value = get_operation(expr.op).fn(args, **expr.kwargs)
    if memo is not None:
        if hasattr(value, "flags"):
            value.flags.writeable = False  # shared from now on: no operation may update it in place
        memo[expr] = value
    return value


def compile_expr(expr: Expr) -> Callable[[Mapping[Ref, object]], object]:
    """``evaluate`` with the operations looked up and their parameters built once: for evaluating
    the same tree on thousands of blocks."""
    if isinstance(expr, Ref):
        return lambda loaded: loaded[expr]
    if expr.op == SCOPE:
        inner, code = compile_expr(expr.args[0]), expr.kwargs["dtype"]

        def scoped(loaded):
            with compute_dtype(code):
                return inner(loaded)

        return scoped
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
