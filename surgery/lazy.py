"""Lazy models and task vectors: values whose tensors are expressions over checkpoints.

Nothing is read when you build them; arithmetic builds bigger expressions; ``save`` turns the value
into a plan and streams it, so ``(ft_a - base) * 0.5 + (ft_b - base) * 0.5`` applied to a new base
reads each input tensor once, one tensor at a time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .engine.plan import Call, Expr, OutputTensor, Plan, Ref
from .errors import IncompatibleInputsError, PlanError
from .io.checkpoint import EMBEDDING_SUFFIXES, TIED_HEAD_NAMES, Checkpoint, open_checkpoint
from .io.writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec

DELTA_MANIFEST = "surgery_delta.json"
FT_SIDECARS = "ft_files"  # inside a saved delta: the fine-tuned source's config and tokenizer
VOCAB_NAMES = EMBEDDING_SUFFIXES + TIED_HEAD_NAMES + ("embed_out.weight", "output.weight")


def is_vocab_tensor(name: str) -> bool:
    """Embeddings and output heads: the tensors whose rows are tokens."""
    return name.endswith(VOCAB_NAMES)


def remap(expr: Expr, mapping: dict[int, int]) -> Expr:
    if isinstance(expr, Ref):
        return Ref(mapping[expr.input], expr.name)
    return Call(expr.op, tuple(remap(a, mapping) for a in expr.args), expr.params)


def union_inputs(a: tuple[Checkpoint, ...], b: tuple[Checkpoint, ...]) -> tuple[tuple[Checkpoint, ...], dict[int, int]]:
    """Inputs of ``a`` followed by those of ``b`` not already present; and where ``b``'s went."""
    inputs = list(a)
    mapping = {}
    for j, c in enumerate(b):
        for i, x in enumerate(inputs):
            if x is c or (x.root == c.root and x.files == c.files):
                mapping[j] = i
                break
        else:
            mapping[j] = len(inputs)
            inputs.append(c)
    return tuple(inputs), mapping


@dataclass(frozen=True)
class Lazy:
    """Named tensors, each an expression over ``inputs``. Float tensors carry the arithmetic;
    integer and bool tensors are carried along unchanged."""

    inputs: tuple[Checkpoint, ...]
    tensors: dict[str, OutputTensor]
    tied: dict[str, str] = field(default_factory=dict)  # absent head -> embedding that provides it
    sidecars: Path | None = None  # where config and tokenizer come from when saved
    history: tuple[dict, ...] = ()  # how it was made, for the model card

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or name in self.tied

    def get(self, name: str) -> OutputTensor | None:
        t = self.tensors.get(name)
        if t is None and name in self.tied:
            t = self.tensors[self.tied[name]]
        return t

    def map_float(self, fn: Callable[[str, Expr], Expr], step: dict | None = None) -> "Lazy":
        """Replace every float tensor's expression by ``fn(name, expr)``."""
        tensors = {n: OutputTensor(t.spec, fn(n, t.expr)) if _is_float(t) else t for n, t in self.tensors.items()}
        return replace(self, tensors=tensors, history=self.history + ((step,) if step else ()))

    def combine(self, other: "Lazy", fn: Callable[[Expr, Expr], Expr], step: dict) -> "Lazy":
        """Tensor by tensor ``fn(self, other)`` over float tensors; ``self``'s carried tensors kept."""
        inputs, mapping = union_inputs(self.inputs, other.inputs)
        problems = [f"tensor {n!r} is in one operand but not the other" for n in
                    sorted(set(self.tensors) ^ set(other.tensors))]
        tensors = {}
        for n, t in self.tensors.items():
            o = other.tensors.get(n)
            if o is None:
                continue
            if o.spec.shape != t.spec.shape:
                problems.append(f"tensor {n!r} has shape {list(t.spec.shape)} in one operand, {list(o.spec.shape)} in the other")
                continue
            tensors[n] = OutputTensor(t.spec, fn(t.expr, remap(o.expr, mapping))) if _is_float(t) else t
        if problems:
            raise IncompatibleInputsError(problems)
        return replace(self, inputs=inputs, tensors=tensors, history=self.history + (step,))

    def with_dtype(self, dtype: str | None) -> "Lazy":
        if dtype is None:
            return self
        tensors = {n: OutputTensor(TensorSpec(n, dtype, t.spec.shape), t.expr) if _is_float(t) else t
                   for n, t in self.tensors.items()}
        return replace(self, tensors=tensors)

    def plan(self, max_shard_size=DEFAULT_MAX_SHARD_SIZE, recipe: dict | None = None) -> Plan:
        """Task-vector arithmetic runs in float64 (see :mod:`surgery.ops.common`)."""
        return Plan([c.source for c in self.inputs], list(self.tensors.values()), max_shard_size,
                    recipe=recipe or {"history": list(self.history)}, compute_dtype="F64")


def _is_float(t: OutputTensor) -> bool:
    from .io.safetensors_header import FLOAT_DTYPES

    return t.spec.dtype in FLOAT_DTYPES


def _checkpoint(c) -> Checkpoint:
    return c if isinstance(c, Checkpoint) else open_checkpoint(c)


def from_checkpoint(c) -> Lazy:
    ckpt = _checkpoint(c)
    tensors = {n: OutputTensor(TensorSpec(n, i.dtype, i.shape), Ref(0, n)) for n, i in ckpt.tensors.items()}
    return Lazy((ckpt,), tensors, dict(ckpt.tied), ckpt.root, ({"checkpoint": ckpt.source},))


class LazyModel:
    """A model to be: ``model.save(path)`` streams it into a checkpoint folder."""

    def __init__(self, lazy: Lazy, config_overrides: dict | None = None, tokenizer_from: Path | None = None):
        self.lazy = lazy
        self.config_overrides = dict(config_overrides or {})
        self.tokenizer_from = tokenizer_from

    def save(self, output, *, dtype: str | None = None, device: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE,
             force: bool = False, config_from=None, progress=None, recipe: dict | None = None,
             tags: tuple[str, ...] = ("merge",)) -> Path:
        from .recipes.run import parse_dtype, run_plan

        lazy = self.lazy.with_dtype(parse_dtype(dtype))
        plan = lazy.plan(max_shard_size, recipe)
        return run_plan(plan, output, list(lazy.inputs), force=force,
                        config_from=config_from if config_from is not None else lazy.sidecars,
                        config_overrides=self.config_overrides, tokenizer_from=self.tokenizer_from, tags=tags,
                        device=device, progress=progress)


class TaskVector:
    """A lazy difference between checkpoints: ``TaskVector.between(ft, base)``.

    Supports ``+``, ``-``, unary ``-``, ``* scalar``, ``/ scalar``, ``sum([...])``, ``save`` (a delta
    checkpoint with a manifest) and ``apply_to(base, scale)``. Integer and bool tensors are carried
    from the fine-tuned side, never differenced.
    """

    def __init__(self, lazy: Lazy, sources: dict | None = None):
        self.lazy = lazy
        self.sources = sources or {}

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def between(cls, ft, base) -> "TaskVector":
        """``ft - base``, tensor by tensor. Embedding and head rows that ``ft`` added (a grown
        vocabulary) are differenced against zero rows, so applying the vector brings them in whole."""
        ft_c, base_c = _checkpoint(ft), _checkpoint(base)
        from .lora import is_adapter

        if is_adapter(ft_c):  # a LoRA adapter where a fine-tune is expected: its delta, computed per tensor
            return cls.from_lora(ft_c, base_c)
        problems = []
        tensors = {}
        for name, info in ft_c.tensors.items():
            b = base_c.resolve(name)
            spec = TensorSpec(name, info.dtype, info.shape)
            if b is None:
                problems.append(f"tensor {name!r} is in {ft_c.source} but not in {base_c.source}")
            elif not info.is_float:
                tensors[name] = OutputTensor(spec, Call.of("copy", [Ref(0, name)]))
            elif b.shape == info.shape:
                tensors[name] = OutputTensor(spec, Call.of("sub", [Ref(0, name), Ref(1, b.name)]))
            elif _rows_grow(name, b.shape, info.shape):
                padded = Call.of("pad_rows", [Ref(1, b.name)], rows=info.shape[0])
                tensors[name] = OutputTensor(spec, Call.of("sub", [Ref(0, name), padded]))
            else:
                problems.append(f"tensor {name!r} has shape {list(info.shape)} in {info.file} "
                                f"but {list(b.shape)} in {b.file}")
        for name in base_c.tensors:
            if name not in ft_c:
                problems.append(f"tensor {name!r} is in {base_c.source} but not in {ft_c.source}")
        if problems:
            raise IncompatibleInputsError(problems)
        tied = {}
        for head, embedding in ft_c.tied.items():
            if head in base_c.tensors:  # the fine-tune ties its head, the base stores one: a real delta
                spec = TensorSpec(head, ft_c.tensors[embedding].dtype, ft_c.tensors[embedding].shape)
                if base_c.tensors[head].shape != spec.shape:
                    problems.append(f"tensor {head!r} has shape {list(base_c.tensors[head].shape)} in "
                                    f"{base_c.source} but {list(spec.shape)} (tied) in {ft_c.source}")
                    continue
                tensors[head] = OutputTensor(spec, Call.of("sub", [Ref(0, embedding), Ref(1, head)]))
            elif head in base_c:
                tied[head] = embedding
        if problems:
            raise IncompatibleInputsError(problems)
        lazy = Lazy((ft_c, base_c), tensors, tied, ft_c.root, ({"diff": [ft_c.source, base_c.source]},))
        return cls(lazy, {"ft": ft_c.source, "base": base_c.source})

    @classmethod
    def from_lora(cls, adapter, base) -> "TaskVector":
        """A PEFT LoRA adapter's change to ``base`` (see :mod:`surgery.lora`): zero where it changes nothing."""
        from .lora import lora_task_vector

        return lora_task_vector(adapter, base)

    @classmethod
    def load(cls, folder) -> "TaskVector":
        """A delta saved by :meth:`save` (or ``surgery diff``)."""
        ckpt = _checkpoint(folder)
        manifest_path = Path(ckpt.root) / DELTA_MANIFEST
        if not manifest_path.exists():
            raise PlanError(f"{ckpt.root} is not a saved task vector (no {DELTA_MANIFEST}); make one with surgery diff")
        manifest = json.loads(manifest_path.read_text())
        lazy = from_checkpoint(ckpt)
        sidecars = Path(ckpt.root) / FT_SIDECARS
        lazy = replace(lazy, tied=dict(manifest.get("tied", {})), sidecars=sidecars if sidecars.is_dir() else None,
                       history=({"delta": ckpt.source, **{k: manifest.get(k) for k in ("ft", "base")}},))
        return cls(lazy, manifest)

    # -- algebra -----------------------------------------------------------------------------
    def __add__(self, other: "TaskVector") -> "TaskVector":
        if isinstance(other, (int, float)) and other == 0:  # so sum([...]) works
            return self
        return TaskVector(self.lazy.combine(other.lazy, lambda a, b: Call.of("add", [a, b]), {"op": "add"}))

    __radd__ = __add__

    def __mul__(self, factor: float) -> "TaskVector":
        factor = float(factor)
        return TaskVector(self.lazy.map_float(lambda _n, e: Call.of("scale", [e], factor=factor),
                                              {"op": "scale", "factor": factor}), self.sources)

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> "TaskVector":
        return self * (1.0 / float(divisor))

    def __neg__(self) -> "TaskVector":
        return self * -1.0

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        return TaskVector(self.lazy.combine(other.lazy, lambda a, b: Call.of("sub", [a, b]), {"op": "sub"}))

    def map(self, fn: Callable[[str, Expr], Expr], step: dict) -> "TaskVector":
        """Apply a per-tensor expression transform (masks, per-layer scaling) to every float tensor."""
        return TaskVector(self.lazy.map_float(fn, step), self.sources)

    # -- use ---------------------------------------------------------------------------------
    def apply_to(self, base, scale: float = 1.0, *, keep_target: bool = False) -> LazyModel:
        """``base + scale * self`` as a lazy model laid out like ``base``.

        A tensor in ``base`` that the vector lacks is an error unless ``keep_target`` (then it is
        copied). Embedding and head rows the vector has beyond ``base``'s (a grown vocabulary) are
        added onto zero rows, so new-token rows come from the fine-tuned model.
        """
        from .lora import is_zero_delta

        target = base if isinstance(base, Lazy) else from_checkpoint(base)
        inputs, mapping = union_inputs(target.inputs, self.lazy.inputs)
        problems = []
        tensors = {}
        names = list(target.tensors)
        untied = [h for h in self.lazy.tensors if h not in target.tensors and h in target.tied]
        for name in names + untied:
            t = target.get(name)
            d = self.lazy.get(name)
            if d is None:
                if keep_target:
                    tensors[name] = OutputTensor(TensorSpec(name, t.spec.dtype, t.spec.shape), t.expr)
                else:
                    problems.append(f"tensor {name!r} is in the target {_where(target)} but not in the task vector "
                                    "(pass --keep-target to copy the target's)")
                continue
            if not _is_float(t) or (is_zero_delta(d.expr) and d.spec.shape == t.spec.shape):
                # carried tensors, and those an adapter leaves alone: the target's own, bit for bit
                tensors[name] = OutputTensor(TensorSpec(name, t.spec.dtype, t.spec.shape), t.expr)
                continue
            delta = remap(d.expr, mapping)
            shape = t.spec.shape
            if _rows_grow(name, shape, d.spec.shape):  # the fine-tune added tokens: they arrive whole
                tensors[name] = OutputTensor(TensorSpec(name, t.spec.dtype, d.spec.shape),
                                             Call.of("add_with_new_rows", [t.expr, delta], factor=float(scale)))
                continue
            if scale != 1.0:
                delta = Call.of("scale", [delta], factor=float(scale))
            if _rows_grow(name, d.spec.shape, shape):  # the target added tokens: they stay as they are
                delta = Call.of("pad_rows", [delta], rows=shape[0])
            elif d.spec.shape != shape:
                problems.append(f"tensor {name!r} has shape {list(shape)} in the target {_where(target)} "
                                f"but {list(d.spec.shape)} in the task vector")
                continue
            tensors[name] = OutputTensor(TensorSpec(name, t.spec.dtype, shape), Call.of("add", [t.expr, delta]))
        for name in self.lazy.tensors:
            if name not in target:
                problems.append(f"tensor {name!r} is in the task vector but not in the target {_where(target)}")
        if problems:
            raise IncompatibleInputsError(problems)
        overrides = {"tie_word_embeddings": False} if untied else {}
        grown = {n: t.spec.shape[0] for n, t in tensors.items() if is_vocab_tensor(n) and n in target.tensors
                 and t.spec.shape[0] != target.tensors[n].spec.shape[0]}
        if grown:
            overrides["vocab_size"] = max(grown.values())
        history = target.history + self.lazy.history + ({"apply": {"scale": scale}},)
        # Architecture config from the target; tokenizer and chat template from the fine-tuned source.
        return LazyModel(Lazy(inputs, tensors, {} if untied else dict(target.tied), target.sidecars, history),
                         overrides, tokenizer_from=self.lazy.sidecars)

    def save(self, output, *, dtype: str | None = None, device: str = "auto",
             max_shard_size=DEFAULT_MAX_SHARD_SIZE, force: bool = False, progress=None) -> Path:
        """Write the vector as a checkpoint of its own plus a manifest naming its sources."""
        from .recipes.run import parse_dtype
        from .recipes.delta import save_delta

        return save_delta(self, output, dtype=parse_dtype(dtype), device=device, max_shard_size=max_shard_size,
                          force=force, progress=progress)


def _rows_grow(name: str, smaller: tuple[int, ...], larger: tuple[int, ...]) -> bool:
    return is_vocab_tensor(name) and len(smaller) == len(larger) and smaller[1:] == larger[1:] \
        and smaller[0] < larger[0]


def _where(lazy: Lazy) -> str:
    return ", ".join(c.source for c in lazy.inputs)


@dataclass(frozen=True)
class Stacked:
    """Several task vectors over one set of inputs, lined up tensor by tensor."""

    inputs: tuple[Checkpoint, ...]
    parts: tuple[Lazy, ...]  # each remapped onto ``inputs``

    def float_items(self) -> list[tuple[str, list[Expr]]]:
        first = self.parts[0]
        return [(n, [p.tensors[n].expr for p in self.parts]) for n, t in first.tensors.items() if _is_float(t)]

    def numel(self, name: str) -> int:
        import math

        return math.prod(self.parts[0].tensors[name].spec.shape)

    def reduce(self, fn: Callable[[str, list[Expr]], Expr], step: dict) -> TaskVector:
        """One task vector whose float tensors are ``fn(name, [expr of each part])``."""
        first = self.parts[0]
        tensors = dict(first.tensors)
        for name, exprs in self.float_items():
            tensors[name] = OutputTensor(first.tensors[name].spec, fn(name, exprs))
        history = tuple(h for p in self.parts for h in p.history) + (step,)
        return TaskVector(replace(first, inputs=self.inputs, tensors=tensors, history=history))


def stack(tvs: list[TaskVector]) -> Stacked:
    """Line up task vectors: same names and shapes required, every mismatch reported at once."""
    if not tvs:
        raise PlanError("no task vectors given")
    inputs: tuple[Checkpoint, ...] = ()
    parts = []
    for tv in tvs:
        inputs, mapping = union_inputs(inputs, tv.lazy.inputs)
        parts.append(replace(tv.lazy, tensors={n: OutputTensor(t.spec, remap(t.expr, mapping))
                                               for n, t in tv.lazy.tensors.items()}))
    first = parts[0]
    problems = []
    for k, p in enumerate(parts[1:], start=1):
        for n in sorted(set(first.tensors) ^ set(p.tensors)):
            problems.append(f"tensor {n!r} is in only one of task vectors 0 and {k}")
        for n, t in p.tensors.items():
            if n in first.tensors and first.tensors[n].spec.shape != t.spec.shape:
                problems.append(f"tensor {n!r} has shape {list(first.tensors[n].spec.shape)} in task vector 0 "
                                f"but {list(t.spec.shape)} in task vector {k}")
    if problems:
        raise IncompatibleInputsError(problems)
    return Stacked(inputs, tuple(parts))
