"""PEFT LoRA adapters merged into their base (``surgery lora merge``) or souped with full models
(``surgery soup`` given an adapter), streamed tensor by tensor through the same writer as every other output.

Adapters are also accepted wherever a fine-tune is differenced against a base (``merge --base``,
``transfer --source-ft``, ``diff``): :meth:`surgery.lazy.TaskVector.between` turns them into
:func:`surgery.lora.lora_task_vector`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import PlanError
from ..io.writer import DEFAULT_MAX_SHARD_SIZE
from ..lora import adapted


def build_merge(base, adapter, *, scale: float = 1.0, dtype: str | None = None):
    """The merged adapter as a lazy :class:`~surgery.recipes.built.Built` (``base`` a checkpoint)."""
    from .built import Built, checkpoint_of, is_built, label

    if is_built(base) or is_built(adapter):
        raise PlanError("lora merge takes a base checkpoint and an adapter, not a recipe step; "
                        "use the adapter as a fine-tune (transfer --source-ft, merge models, soup) instead")
    base = checkpoint_of(base)
    model = adapted(adapter, base, scale)
    recipe = {"operation": "lora_merge", "base": label(base), "adapter": str(adapter), "scale": float(scale),
              "dtype": dtype, "history": list(model.lazy.history)}
    return Built.model(model, dtype=dtype, recipe=recipe, tags=("lora", "merged-adapter"), layout=base)


def merge(base, adapter, output, *, scale: float = 1.0, dtype: str | None = None, device: str = "auto",
          max_shard_size=DEFAULT_MAX_SHARD_SIZE, force: bool = False, progress=None) -> Path:
    """``base + scale * delta`` of a LoRA adapter, as peft's ``merge_and_unload`` gives at scale 1
    (computed in float64 and cast once to the base's dtype, or ``dtype``). Tensors the adapter does
    not touch are the base's bytes; config from the base, tokenizer from the adapter if it saved one."""
    return build_merge(base, adapter, scale=scale, dtype=dtype).save(
        output, device=device, max_shard_size=max_shard_size, force=force, progress=progress)


def soup(inputs: Sequence, output, *, base=None, weights: Sequence[float] | None = None, normalize: bool = True,
         dtype: str | None = None, device: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE, config_from=None,
         force: bool = False, allow_pickle: bool = False, progress=None) -> Path:
    """A soup whose inputs may be LoRA adapters (see :func:`surgery.recipes.soup.build_soup`, which
    this is: one code path)."""
    from .soup import soup as run

    return run(inputs, output, base=base, weights=weights, normalize=normalize, dtype=dtype, device=device,
               max_shard_size=max_shard_size, config_from=config_from, force=force, allow_pickle=allow_pickle,
               progress=progress)
