"""Float64 task arithmetic on bf16 checkpoints, computed in float32 where that gives the same bits.

Transfers and task arithmetic run in float64 so that ``target + (ft - base)`` is rounded once, to
the output dtype. On bf16 inputs that precision is almost never needed: a bf16 value has 8
significant bits, so the difference of two values within a factor 2**15 of each other has at most
24 and float32 holds it exactly. Evaluating such blocks in float32 moves half the bytes; that is
about a third of a transfer's arithmetic on the CPU.

Why the bits are the same. Let every leaf be a bf16 value with biased exponent field E (E = 0 for
zeros and subnormals). Each leaf is an integer multiple of 2**(E' - 134) (E' = max(E, 1)), below
2**(E' - 126) in magnitude. An operation with ``steps`` (``ops.registry.Operation``) is a sequence
of rounding steps whose exact values are integer combinations ``sum_i c_i x_i`` of the leaves. For
a step over leaves whose exponents span ``s`` (max E' - min E' among its leaves with c_i != 0),
the exact value is N * 2**(min E' - 134) with |N| < C * 2**(s + 8), C = sum |c_i|. When
C * 2**(s + 8) <= 2**24 it is a float32 (and so a float64), and both precisions compute that step
exactly. If every step but the last is exact, both evaluations see the same operands at the last
step; float32 rounds its exact value once, and float64 rounds it to 53 bits, then the store rounds
to float32: the same result, because rounding to 53 bits and then to 24 is innocuous for +, - and
* (Figueroa, "When is double rounding innocuous?", 1995: 53 >= 2 * 24 + 2). Both then store the
same float32 value into the output dtype.

Per element, the exponents are checked through the raw bits: magnitudes (``bits & 0x7FFF``) that
differ by at most ``h << 7`` have exponent fields at most ``h`` apart, so each step's leaves are
checked by the largest minus the smallest of their magnitudes (steps over leaves that a larger
step with no wider allowance also covers need no check of their own). The elements that fail (a weight whose magnitude is far from the others', a zero input) are
recomputed in float64 from their own inputs, and so are exact zero results (whose sign depends on
how the sum is grouped) and whole blocks whose float32 result leaves (-2**120, 2**120) or is NaN
(an infinity, an overflow, or where the double-rounding argument's range could matter). Trees in
which a leaf cancels out, or a step multiplies by zero, stay in float64.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from ..ops.common import Linear, compute_dtype, current_compute_dtype
from ..ops.registry import get_operation
from .plan import Call, Expr, Ref, refs

NARROW_ENV = "SURGERY_NARROW"  # "0": always float64 (tests compare the two)
NARROW_OUTPUTS = ("F32", "BF16", "F16")  # stored through float32 on both paths
RANGE = 2.0 ** 120  # results within it are far from float32's overflow threshold
MOSTLY_FLAGGED = 8  # more than 1/8 of a block flagged: recompute the whole block in float64


@dataclass(frozen=True)
class NarrowPlan:
    groups: tuple[tuple[tuple[Ref, ...], int], ...]  # (leaves, h): exponent fields at most h apart
    terms: tuple[tuple[Ref, int], ...]  # the result, sum of c * leaf, in the order float32 adds it up

    def evaluate(self, leaves: Mapping[Ref, np.ndarray]) -> np.ndarray:
        """The result in float32 from float32 leaves, added up term by term (each partial sum is
        exact where the check passes, so only the last addition rounds)."""
        ref, c = self.terms[0]
        value = leaves[ref] * np.float32(c) if c != 1 else leaves[ref].copy()
        for ref, c in self.terms[1:]:
            if c == 1:
                np.add(value, leaves[ref], out=value)
            elif c == -1:
                np.subtract(value, leaves[ref], out=value)
            else:
                np.add(value, leaves[ref] * np.float32(c), out=value)
        return value

    def flagged(self, raw: Mapping[Ref, np.ndarray]) -> np.ndarray | None:
        """Positions where float32 may round a step (uint16 bits in, index array out), or None."""
        if not self.groups:
            return None
        magnitude: dict[Ref, np.ndarray] = {}
        bad = None
        for group, h in self.groups:
            for r in group:
                if r not in magnitude:
                    magnitude[r] = raw[r] & np.uint16(0x7FFF)
            limit = np.uint16(h << 7)
            if len(group) == 2:
                d = magnitude[group[0]] - magnitude[group[1]]  # wraps: the int16 difference
                d += limit  # |difference| <= limit  <=>  d <= 2 * limit, unsigned
                far = d > np.uint16(2 * (h << 7))
            else:
                top = np.maximum(magnitude[group[0]], magnitude[group[1]])
                low = np.minimum(magnitude[group[0]], magnitude[group[1]])
                for r in group[2:]:
                    np.maximum(top, magnitude[r], out=top)
                    np.minimum(low, magnitude[r], out=low)
                top -= low
                far = top > limit
            if bad is None:
                bad = far
            else:
                bad |= far
        return np.flatnonzero(bad) if bad.any() else None


def plan_narrow(expr: Expr, codes: Mapping[Ref, str], out_code: str) -> NarrowPlan | None:
    """How to evaluate ``expr`` in float32 with float64's bits, or None where this does not apply:
    the plan computes in float32 already, a leaf is not bf16, the output is float64, or an
    operation is not a sum of integer multiples."""
    if current_compute_dtype() != "F64" or out_code not in NARROW_OUTPUTS or not isinstance(expr, Call) \
            or os.environ.get(NARROW_ENV, "1") == "0":
        return None
    leaves = refs(expr)
    if not leaves or any(codes[r] != "BF16" for r in leaves):
        return None
    steps: list[Linear] = []
    try:
        result = _trace(expr, steps)
    except (ValueError, OverflowError):
        return None
    if set(result.coeffs) != set(leaves):
        # a leaf that cancels (x - x, (a - b) + b) is never read by the sum, and its infinity or NaN,
        # which float64 would carry into the result, would go unseen
        return None
    terms = _chain(result, steps[:-1])
    partial = [Linear(dict(terms[:i])) for i in range(1, len(terms))]  # what the chain's additions compute
    partial += [Linear({r: c}) for r, c in terms if abs(c) != 1]  # and its products
    groups: dict[frozenset, int] = {}  # the leaves of each step that mixes several, and the span it allows
    for step in steps[:-1] + partial:  # the last step of each may round: both round it the same way
        total = sum(abs(c) for c in step.coeffs.values())
        if total == 0:
            return None  # a step that cancels or multiplies by 0 (0 * inf is NaN, 0 * -x is -0)
        allowed = 16 - math.ceil(math.log2(total))  # C * 2**(s + 8) <= 2**24
        if allowed < 1:
            return None
        if len(step.coeffs) > 1:  # a single leaf spans nothing
            key = frozenset(step.coeffs)
            groups[key] = min(allowed, groups.get(key, allowed))
    # a group inside a larger one that allows no more is checked by the larger one
    kept = [(g, h) for g, h in groups.items()
            if not any(g < other and h_other <= h for other, h_other in groups.items())]
    return NarrowPlan(tuple((tuple(r for r in leaves if r in g), h) for g, h in kept), tuple(terms))


def _chain(result: Linear, inner: list[Linear]) -> list[tuple[Ref, int]]:
    """The result's terms in the order to add them: the leaves the tree's own inner steps use most
    first (so the chain's partial sums stay inside groups already checked), starting with a
    positive one where there is one (no negation)."""
    uses: dict[Ref, int] = {}
    for step in inner:
        for r in step.coeffs:
            uses[r] = uses.get(r, 0) + 1
    order = sorted(result.coeffs, key=lambda r: -uses.get(r, 0))  # stable: ties keep the tree's order
    first = next((r for r in order if result.coeffs[r] > 0), order[0])
    order.remove(first)
    return [(r, result.coeffs[r]) for r in [first, *order]]


def _trace(expr: Expr, steps: list) -> Linear:
    if isinstance(expr, Ref):
        return Linear({expr: 1})
    op = get_operation(expr.op)
    if op.steps is None or not op.numpy or not op.elementwise:
        raise ValueError(f"{expr.op} has no exact float32 form")
    args = [_trace(a, steps) for a in expr.args]
    values = op.steps(*args, **expr.kwargs)
    steps.extend(values)
    return values[-1]


def evaluate_block(plan: NarrowPlan, evaluate: Callable, raw: Mapping[Ref, np.ndarray], leaf: Callable,
                   store: Callable, out: np.ndarray) -> None:
    """One block of the output into ``out``: the plan's sum in float32 over ``leaf(raw array, ref)``,
    and ``evaluate(leaves)`` (the tree, in the plan's float64) where the check does not pass.
    ``store(value, out, finite)`` rounds into the output dtype."""
    with compute_dtype("F32"):
        value = plan.evaluate({r: leaf(a, r) for r, a in raw.items()})
    lo, hi = value.min(), value.max()
    if not (-RANGE < lo and hi < RANGE):  # NaN fails too
        store(evaluate({r: leaf(a, r) for r, a in raw.items()}), out)
        return
    store(value, out, True)
    fix = plan.flagged(raw)
    zeros = value == 0  # an exact zero's sign depends on how the sum was grouped (x + -x is +0, -(x - x) is -0)
    if zeros.any():
        fix = np.union1d(fix, np.flatnonzero(zeros)) if fix is not None else np.flatnonzero(zeros)
    if fix is None:
        return
    if fix.size * MOSTLY_FLAGGED > out.size:
        store(evaluate({r: leaf(a, r) for r, a in raw.items()}), out)
        return
    part = np.empty(fix.size, dtype=out.dtype)
    store(evaluate({r: leaf(a[fix], r) for r, a in raw.items()}), part)
    out[fix] = part
