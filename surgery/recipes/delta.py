"""``surgery diff``: a task vector saved as a checkpoint of its own, with a manifest of its sources."""
from __future__ import annotations

import json
from pathlib import Path

from ..io.output import copy_sidecars
from ..io.writer import DEFAULT_MAX_SHARD_SIZE
from ..lazy import DELTA_MANIFEST, FT_SIDECARS, TaskVector
from .run import run_plan


def save_delta(tv: TaskVector, output, *, dtype: str | None = None, device: str = "auto",
               max_shard_size=DEFAULT_MAX_SHARD_SIZE, force: bool = False, progress=None) -> Path:
    """Write ``tv`` as safetensors plus ``surgery_delta.json`` naming its sources and their content
    hashes (computed while the tensors stream, not by a second read). The fine-tuned source's config
    and tokenizer are kept under ``ft_files/`` so that a later transfer can take the tokenizer from it."""
    # Stored one precision up by default (bf16/fp16 -> float32, float32 -> float64): the difference
    # of two weights is not, in general, a number of their dtype, and a rounded delta would make
    # every later transfer inexact.
    lazy = tv.lazy.with_dtype(dtype) if dtype else _one_precision_up(tv.lazy)
    plan = lazy.plan(max_shard_size, {"operation": "diff", **tv.sources, "dtype": dtype})
    ckpts = list(lazy.inputs)
    roles = {"ft": tv.sources.get("ft"), "base": tv.sources.get("base")}
    hashed = [i for i, c in enumerate(ckpts) if c.source in roles.values()]

    def manifest(folder: Path) -> None:
        hashes = plan.recipe.get("content_sha256", {})
        record = {"kind": "task_vector", "format": 1, "dtype": dtype,
                  "tied": lazy.tied,
                  **{role: {"source": src, "content_sha256": hashes.get(src)} for role, src in roles.items() if src}}
        (folder / DELTA_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        if lazy.sidecars is not None:
            (folder / FT_SIDECARS).mkdir()
            copy_sidecars(lazy.sidecars, folder / FT_SIDECARS)

    return run_plan(plan, output, ckpts, force=force, copy_config=False, extra_files=manifest,
                    tags=("task-vector",), device=device, progress=progress, hash_inputs=hashed)


WIDER = {"BF16": "F32", "F16": "F32", "F8_E4M3": "F32", "F8_E5M2": "F32", "F32": "F64"}


def _one_precision_up(lazy):
    from dataclasses import replace

    from ..engine.plan import OutputTensor
    from ..io.writer import TensorSpec

    tensors = {n: OutputTensor(TensorSpec(n, WIDER[t.spec.dtype], t.spec.shape), t.expr)
               if t.spec.dtype in WIDER else t for n, t in lazy.tensors.items()}
    return replace(lazy, tensors=tensors)


def build_diff(ft, base, *, dtype: str | None = None):
    """``ft - base`` as a :class:`~surgery.recipes.built.Built` task vector (either may be a recipe step)."""
    from .built import Built, task_vector

    tv = task_vector(ft, base)
    return Built(tv.lazy, {}, delta=tv, dtype=dtype, compute_dtype="F64")


def diff(ft, base, output, *, dtype: str | None = None, device: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE,
         force: bool = False, progress=None) -> Path:
    """Library form of ``surgery diff FT BASE -o OUT``: save ``ft - base``."""
    return build_diff(ft, base, dtype=dtype).save(output, device=device, max_shard_size=max_shard_size, force=force,
                                                 progress=progress)
