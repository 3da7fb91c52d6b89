"""A per-tensor plan: for every output tensor, an expression over input tensors.

Expressions are trees of :class:`Ref` (a tensor of one input) and :class:`Call` (a registered
operation over sub-expressions), so operations chain in one pass: a soup of transfers is a
``weighted_sum`` of ``add``s of ``sub``s, and each input tensor is still read once. The whole plan is
plain data (JSON round-trips), and any one output shard can be computed from it alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Union

from ..io.writer import DEFAULT_MAX_SHARD_SIZE, Shard, TensorSpec, parse_size, plan_shards
from ..ops.registry import get_operation


@dataclass(frozen=True)
class Ref:
    input: int  # index into Plan.inputs
    name: str  # the tensor's name in that input (tied heads already resolved by the checkpoint)


@dataclass(frozen=True)
class Call:
    op: str
    args: tuple["Expr", ...]
    params: tuple[tuple[str, object], ...] = ()

    @staticmethod
    def of(op: str, args, **params) -> "Call":
        get_operation(op).check(params)
        return Call(op, tuple(args), tuple(sorted((k, _freeze(v)) for k, v in params.items())))

    @property
    def kwargs(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.params}


Expr = Union[Ref, Call]


def refs(expr: Expr) -> list[Ref]:
    """Every input tensor an expression reads, once each, in first-use order."""
    if isinstance(expr, Ref):
        return [expr]
    seen: dict[Ref, None] = {}
    for a in expr.args:
        for r in refs(a):
            seen.setdefault(r, None)
    return list(seen)


@dataclass(frozen=True)
class OutputTensor:
    spec: TensorSpec
    expr: Expr


SCOPE = "at_precision"  # an operation whose argument is computed in the dtype it names


def scoped(expr: Expr, precision: str) -> Expr:
    """``expr`` computed in ``precision`` wherever it is used (a bare reference needs no scope)."""
    return Call.of(SCOPE, [expr], dtype=precision) if isinstance(expr, Call) else expr


def scopes(expr: Expr) -> set[str]:
    """The precisions the ``at_precision`` scopes inside ``expr`` ask for."""
    if not isinstance(expr, Call):
        return set()
    found = {expr.kwargs["dtype"]} if expr.op == SCOPE else set()
    for a in expr.args:
        found |= scopes(a)
    return found


@dataclass
class Plan:
    inputs: list[str]  # checkpoint locations (paths or Hub ids), as opened
    tensors: list[OutputTensor]
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    allow_pickle: bool = False
    recipe: dict = field(default_factory=dict)  # what the user asked for, for the model card
    compute_dtype: str = "F32"  # precision of the arithmetic ("F32" or "F64"); results are cast once
    metadata: dict = field(default_factory=dict)  # strings for every shard's ``__metadata__`` (file formats built on safetensors)

    def __post_init__(self):
        self.max_shard_size = parse_size(self.max_shard_size)
        if self.compute_dtype == "F64" and any("F32" in scopes(t.expr) for t in self.tensors):
            # a float32 scope (a chained step: ops.basic.at_precision) needs float32 leaves: the plan
            # runs in the narrowest precision, and its own float64 arithmetic is scoped as such
            self.compute_dtype = "F32"
            self.tensors = [OutputTensor(t.spec, scoped(t.expr, "F64")) for t in self.tensors]

    def shards(self) -> list[Shard]:
        return plan_shards([t.spec for t in self.tensors], self.max_shard_size, self.metadata)

    def by_name(self) -> dict[str, OutputTensor]:
        return {t.spec.name: t for t in self.tensors}

    # -- plain data --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "max_shard_size": self.max_shard_size, "allow_pickle": self.allow_pickle,
                "recipe": self.recipe, "compute_dtype": self.compute_dtype, "metadata": self.metadata,
                "tensors": [{"name": t.spec.name, "dtype": t.spec.dtype, "shape": list(t.spec.shape),
                             "expr": _expr_to_data(t.expr)} for t in self.tensors]}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        tensors = [OutputTensor(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])), _expr_from_data(t["expr"]))
                   for t in data["tensors"]]
        return cls(list(data["inputs"]), tensors, data["max_shard_size"], data.get("allow_pickle", False),
                   data.get("recipe", {}), data.get("compute_dtype", "F32"), data.get("metadata", {}))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))


def _freeze(v):
    return tuple(v) if isinstance(v, list) else v


def _expr_to_data(e: Expr):
    if isinstance(e, Ref):
        return {"ref": [e.input, e.name]}
    return {"op": e.op, "args": [_expr_to_data(a) for a in e.args], "params": e.kwargs}


def _expr_from_data(d) -> Expr:
    if "ref" in d:
        return Ref(int(d["ref"][0]), d["ref"][1])
    return Call.of(d["op"], [_expr_from_data(a) for a in d["args"]], **d.get("params", {}))
