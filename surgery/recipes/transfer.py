"""Fine-tuning transfer (Lin et al., 2025): move a fine-tune onto a new base, ``target + scale * (ft - base)``."""
from __future__ import annotations

from pathlib import Path

from ..errors import PlanError
from ..io.writer import DEFAULT_MAX_SHARD_SIZE
from ..lazy import TaskVector


def build_transfer(to, *, diff=None, source_base=None, source_ft=None, scale: float = 1.0,
                   keep_target: bool = False, dtype: str | None = None):
    """The transfer as a lazy :class:`~surgery.recipes.built.Built`; any argument may be a recipe step."""
    from .built import Built, checkpoint_of, is_built, label, layout_of, model_of, task_vector

    to = to if is_built(to) else checkpoint_of(to)
    if (diff is None) == (source_base is None and source_ft is None):
        raise PlanError("give either a saved diff (--diff) or both --source-base and --source-ft")
    if diff is not None:
        tv = diff.value() if is_built(diff) else TaskVector.load(diff)
    else:
        if source_base is None or source_ft is None:
            raise PlanError("--source-base and --source-ft go together")
        tv = task_vector(source_ft, source_base)
    model = tv.apply_to(model_of(to, "to"), scale, keep_target=keep_target)
    recipe = {"operation": "transfer", "scale": scale, "keep_target": keep_target, "dtype": dtype,
              "target": label(to), "diff": label(diff) if diff is not None else None,
              "source_base": label(source_base) if source_base is not None else None,
              "source_ft": label(source_ft) if source_ft is not None else None}
    return Built.model(model, dtype=dtype, recipe=recipe, tags=("merge", "fine-tuning-transfer"), layout=layout_of(to))


def transfer(to, output, *, diff=None, source_base=None, source_ft=None, scale: float = 1.0, keep_target: bool = False,
             dtype: str | None = None, device: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE,
             force: bool = False, progress=None) -> Path:
    """Apply a saved diff (``diff=``), or ``source_ft - source_base`` in one pass, to the base ``to``.

    Arithmetic is in float64 and the result is cast once to the target's dtype (or ``dtype``). Rows
    the fine-tune added to its embeddings and head come over whole; the tokenizer and chat template
    come from the fine-tuned source, the rest of the config from the target.
    """
    built = build_transfer(to, diff=diff, source_base=source_base, source_ft=source_ft, scale=scale,
                           keep_target=keep_target, dtype=dtype)
    return built.save(output, device=device, max_shard_size=max_shard_size, force=force, progress=progress)
