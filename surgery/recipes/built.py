"""The value every recipe builder returns (:class:`Built`: a lazy model or task vector plus what
saving it needs), and the helpers builders use to take either a checkpoint or an earlier step."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.plan import Call, Plan, scoped
from ..errors import PlanError
from ..io.writer import DEFAULT_MAX_SHARD_SIZE

# -- the value every builder returns ------------------------------------------------------------


@dataclass
class Built:
    """A lazy step result: a model (``lazy``) or a task vector (``delta``), and how to save it."""

    lazy: Any  # surgery.lazy.Lazy: the tensors to write
    recipe: dict
    tags: tuple[str, ...] = ()
    overrides: dict = field(default_factory=dict)  # config.json overrides
    tokenizer_from: Path | None = None
    config_from: Any = None  # default: lazy.sidecars, else the first input
    layout: Any = None  # a Checkpoint laid out as this model (names, shapes, dtypes), for soups of steps
    compute_dtype: str = "F64"
    delta: Any = None  # a TaskVector, for diff steps (saved by save_delta)
    dtype: str | None = None  # for deltas: the storage dtype asked for
    info: dict = field(default_factory=dict)  # what was decided on the way (LiNeS lambdas...)
    name: str | None = None  # the recipe step that built it

    @classmethod
    def model(cls, model, *, dtype: str | None, recipe: dict, tags: tuple[str, ...], layout, **kw) -> Built:
        """From a :class:`surgery.lazy.LazyModel`, as ``LazyModel.save`` would write it."""
        from .run import parse_dtype

        return cls(model.lazy.with_dtype(parse_dtype(dtype)), recipe, tags, dict(model.config_overrides),
                   model.tokenizer_from, layout=layout, **kw)

    def value(self):
        """The lazy tensors as a later step sees them: rounded to the dtype they would be saved in."""
        if self.delta is not None:
            from ..lazy import TaskVector
            from .delta import _one_precision_up
            from .run import parse_dtype

            lazy = self.delta.lazy.with_dtype(parse_dtype(self.dtype)) if self.dtype else _one_precision_up(self.delta.lazy)
            return TaskVector(_rounded(lazy, self.compute_dtype), self.delta.sources)
        return _rounded(self.lazy, self.compute_dtype)

    def plan(self, max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> Plan:
        """The model's one plan (plain data): what :meth:`save` streams. A chain whose steps compute
        in different precisions runs in the narrowest, each step's arithmetic scoped to its own
        (see :class:`~surgery.engine.plan.Plan`)."""
        lazy = self.lazy
        return Plan([c.source for c in lazy.inputs], list(lazy.tensors.values()), max_shard_size,
                    recipe=self.recipe or {"history": list(lazy.history)}, compute_dtype=self.compute_dtype)

    def save(self, output, *, device: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE, force: bool = False,
             progress=None) -> Path:
        from .run import parse_dtype, run_plan

        if self.delta is not None:
            from .delta import save_delta

            return save_delta(self.delta, output, dtype=parse_dtype(self.dtype), device=device,
                              max_shard_size=max_shard_size, force=force, progress=progress)
        lazy = self.lazy
        plan = self.plan(max_shard_size)
        return run_plan(plan, output, list(lazy.inputs), force=force,
                        config_from=self.config_from if self.config_from is not None else lazy.sidecars,
                        config_overrides=self.overrides, tokenizer_from=self.tokenizer_from, tags=self.tags,
                        device=device, progress=progress)


def _rounded(lazy, precision: str):
    """Each float tensor as a later step sees it: computed in ``precision`` (the step's own), then
    rounded to the dtype it would be saved in."""
    return lazy.map_float(lambda n, e: Call.of("round_to", [scoped(e, precision)], dtype=lazy.tensors[n].spec.dtype))


# -- helpers the builders share: an argument is a location, a Checkpoint, or a Built -------------


def label(x) -> str:
    """How a builder's recipe record names an argument."""
    if isinstance(x, Built):
        return f"step:{x.name}" if x.name else "step"
    source = getattr(x, "source", None)
    return source if source is not None else str(x)


def is_built(x) -> bool:
    return isinstance(x, Built)


def checkpoint_of(x, allow_pickle: bool = False):
    from ..io.checkpoint import Checkpoint, open_checkpoint

    return x if isinstance(x, Checkpoint) else open_checkpoint(x, allow_pickle=allow_pickle)


def model_of(x, what: str = "model"):
    """A model argument as a target for ``apply_to``: a Checkpoint, or a step's (rounded) lazy value."""
    if isinstance(x, Built):
        if x.delta is not None:
            raise PlanError(f"{what}: step {x.name!r} is a task vector (diff), not a model")
        return x.value()
    return checkpoint_of(x)


def layout_of(x):
    """The checkpoint a model argument is laid out like (its config, block structure, names)."""
    if isinstance(x, Built):
        return x.layout
    return checkpoint_of(x)


def config_of(x) -> dict:
    layout = layout_of(x)
    return (layout.config if layout is not None else None) or {}


def task_vector(ft, base):
    """``ft - base`` lazily; ``ft`` or ``base`` may be steps (the plain case is ``TaskVector.between``)."""
    from ..lazy import TaskVector

    if not is_built(ft) and not is_built(base):
        return TaskVector.between(ft, base)
    ft_v, base_v = model_of(ft, "ft"), model_of(base, "base")
    from ..lazy import Lazy, from_checkpoint

    ft_l = ft_v if isinstance(ft_v, Lazy) else from_checkpoint(ft_v)
    base_l = base_v if isinstance(base_v, Lazy) else from_checkpoint(base_v)
    lazy = ft_l.combine(base_l, lambda a, b: Call.of("sub", [a, b]), {"diff": [label(ft), label(base)]})
    return TaskVector(lazy, {"ft": label(ft), "base": label(base)})
