"""PEFT LoRA adapters merged into their base (``surgery lora merge``) or souped with full models
(``surgery soup`` given an adapter), streamed tensor by tensor through the same writer as every other output.

Adapters are also accepted wherever a fine-tune is differenced against a base (``merge --base``,
``transfer --source-ft``, ``diff``): :meth:`surgery.lazy.TaskVector.between` turns them into
:func:`surgery.lora.lora_task_vector`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ..engine.plan import Call, Expr, OutputTensor, Ref
from ..io.checkpoint import open_checkpoint
from ..io.writer import DEFAULT_MAX_SHARD_SIZE
from ..lazy import remap, union_inputs
from ..lora import adapted, adapter_base, is_adapter, open_adapter
from .run import run_plan
from .soup import plan_soup, soup_weights


def merge(base, adapter, output, *, scale: float = 1.0, dtype: str | None = None, device: str = "auto",
          max_shard_size=DEFAULT_MAX_SHARD_SIZE, force: bool = False, progress=None) -> Path:
    """``base + scale * delta`` of a LoRA adapter, as peft's ``merge_and_unload`` gives at scale 1
    (computed in float64 and cast once to the base's dtype, or ``dtype``). Tensors the adapter does
    not touch are the base's bytes; config from the base, tokenizer from the adapter if it saved one."""
    model = adapted(adapter, base, scale)
    recipe = {"operation": "lora_merge", "base": str(base), "adapter": str(adapter), "scale": float(scale),
              "dtype": dtype, "history": list(model.lazy.history)}
    return model.save(output, dtype=dtype, device=device, max_shard_size=max_shard_size, force=force,
                      progress=progress, recipe=recipe, tags=("lora", "merged-adapter"))


def soup(inputs: Sequence, output, *, base=None, weights: Sequence[float] | None = None, normalize: bool = True,
         dtype: str | None = None, device: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE, config_from=None,
         force: bool = False, allow_pickle: bool = False, progress=None) -> Path:
    """A soup (see :func:`surgery.recipes.soup.soup`) whose inputs may be LoRA adapters: each one is
    ``base + delta``, lazily, with ``base`` given or else the one its config records. The soup is
    planned over the bases' layouts, exactly as a soup of full models, then each adapter's tensors
    are swapped in as expressions, so every input tensor is still read once."""
    slots, adapters = [], {}
    for i, spec in enumerate(inputs):
        ckpt = open_checkpoint(spec, allow_pickle=allow_pickle)  # an adapter opens as its weights file
        if is_adapter(ckpt):
            ad = open_adapter(ckpt)
            ckpt = adapter_base(ad, base)
            adapters[i] = adapted(ad, ckpt).lazy
        slots.append(ckpt)
    w = soup_weights(len(slots), weights, normalize)
    recipe = {"operation": "soup", "weights": w, "dtype": dtype,
              "adapters": {str(inputs[i]): lazy.inputs[0].source for i, lazy in adapters.items()}}
    plan, overrides = plan_soup(slots, w, dtype, max_shard_size, recipe)
    ckpts, swapped = tuple(slots), {}
    for i, lazy in adapters.items():
        ckpts, mapping = union_inputs(ckpts, lazy.inputs)
        swapped[i] = {n: remap(t.expr, mapping) for n, t in lazy.tensors.items()}

    def swap(expr: Expr) -> Expr:
        if isinstance(expr, Ref):
            return swapped[expr.input][expr.name] if expr.input in swapped else expr
        return Call(expr.op, tuple(swap(a) for a in expr.args), expr.params)

    plan = replace(plan, inputs=[c.source for c in ckpts],
                   tensors=[OutputTensor(t.spec, swap(t.expr)) for t in plan.tensors])
    return run_plan(plan, output, list(ckpts), force=force, config_from=config_from, config_overrides=overrides,
                    tags=("merge", "model-soup", "lora"), device=device, progress=progress)
