"""Fine-tuning transfer (Lin et al., 2025): move a fine-tune onto a new base, ``target + scale * (ft - base)``."""
from __future__ import annotations

from pathlib import Path

from ..errors import PlanError
from ..io.writer import DEFAULT_MAX_SHARD_SIZE
from ..lazy import TaskVector


def transfer(to, output, *, diff=None, source_base=None, source_ft=None, scale: float = 1.0, keep_target: bool = False,
             dtype: str | None = None, device: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE,
             force: bool = False, progress=None) -> Path:
    """Apply a saved diff (``diff=``), or ``source_ft - source_base`` in one pass, to the base ``to``.

    Arithmetic is in float64 and the result is cast once to the target's dtype (or ``dtype``). Rows
    the fine-tune added to its embeddings and head come over whole; the tokenizer and chat template
    come from the fine-tuned source, the rest of the config from the target.
    """
    if (diff is None) == (source_base is None and source_ft is None):
        raise PlanError("give either a saved diff (--diff) or both --source-base and --source-ft")
    if diff is not None:
        tv = TaskVector.load(diff)
    else:
        if source_base is None or source_ft is None:
            raise PlanError("--source-base and --source-ft go together")
        tv = TaskVector.between(source_ft, source_base)
    model = tv.apply_to(to, scale, keep_target=keep_target)
    recipe = {"operation": "transfer", "scale": scale, "keep_target": keep_target, "dtype": dtype,
              "target": str(to), "diff": str(diff) if diff is not None else None,
              "source_base": str(source_base) if source_base is not None else None,
              "source_ft": str(source_ft) if source_ft is not None else None}
    return model.save(output, dtype=dtype, device=device, max_shard_size=max_shard_size, force=force,
                      progress=progress, recipe=recipe, tags=("merge", "fine-tuning-transfer"))
