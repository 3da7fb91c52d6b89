"""What a fine-tune can be: a checkpoint, a lazy task vector, or anything that gives the fine-tuned
matrix for a tensor name.

Checkpoints are streamed with read-ahead by the analysis itself. Any other object needs one method,
``finetuned_matrix(name, base) -> tensor`` (the fine-tuned weight of ``name``, given the base's as a
float32 tensor on the compute device), and optionally a ``label``: a LoRA adapter fits by returning
``base + scale * B @ A``. A PEFT adapter folder is read through :func:`surgery.lora.lora_task_vector`.
"""
from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from ..errors import PlanError
from ..io.checkpoint import Checkpoint, open_checkpoint


@runtime_checkable
class FineTunedMatrices(Protocol):
    def finetuned_matrix(self, name: str, base): ...


class CheckpointFineTune:
    """A fine-tuned checkpoint; the analysis streams its matrices alongside the base's."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.label = checkpoint.source

    def finetuned_matrix(self, name: str, base):
        return self.checkpoint.read(name, base.device).float()


class TaskVectorFineTune:
    """base + a lazy :class:`surgery.lazy.TaskVector`, one matrix at a time (only that matrix's inputs are read)."""

    def __init__(self, task_vector, label: str | None = None):
        self.task_vector = task_vector
        srcs = task_vector.sources or {}
        self.label = label or (f"base + ({srcs['ft']} - {srcs['base']})" if {"ft", "base"} <= set(srcs) else "task vector")

    def finetuned_matrix(self, name: str, base):
        from ..engine.evaluate import evaluate
        from ..engine.plan import refs
        from ..ops.common import compute_dtype

        lazy = self.task_vector.lazy
        t = lazy.get(name)
        if t is None:
            raise PlanError(f"the task vector {self.label} has no tensor {name!r}")
        loaded = {r: lazy.inputs[r.input].read(r.name, base.device) for r in refs(t.expr)}
        with compute_dtype("F64"):  # as task-vector arithmetic always runs
            delta = evaluate(t.expr, loaded)
        return (base.double() + delta.double().reshape(base.shape)).float()


def as_finetune(x, base: Checkpoint, allow_pickle: bool = False):
    """A path, Hub id or :class:`Checkpoint` -> :class:`CheckpointFineTune` (a PEFT LoRA adapter folder:
    its lazy task vector on ``base``); a TaskVector -> :class:`TaskVectorFineTune`; an object with
    ``finetuned_matrix`` as it is."""
    from ..lazy import TaskVector

    if isinstance(x, (str, os.PathLike)):
        x = open_checkpoint(x, allow_pickle=allow_pickle)
    if isinstance(x, Checkpoint):
        from ..lora import is_adapter, lora_task_vector

        if is_adapter(x):
            return TaskVectorFineTune(lora_task_vector(x, base), label=x.source)
        return CheckpointFineTune(x)
    if isinstance(x, TaskVector):
        return TaskVectorFineTune(x)
    if isinstance(x, FineTunedMatrices):
        return x
    raise PlanError(f"cannot analyse {type(x).__name__} as a fine-tune: give a checkpoint path, a TaskVector, "
                    "or an object with finetuned_matrix(name, base)")


def label_of(ft) -> str:
    return str(getattr(ft, "label", None) or type(ft).__name__)
