"""Inspect checkpoints: layout from headers alone; with several, where they differ and by how much."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from ..io.checkpoint import Checkpoint
from ..io.checkpoint import open_checkpoints as open_inputs


@dataclass
class ShardSummary:
    file: str
    tensors: int
    bytes: int


@dataclass
class CheckpointSummary:
    source: str
    tensors: int
    parameters: int
    bytes: int
    dtypes: dict[str, int]  # dtype -> parameter count
    shards: list[ShardSummary]
    tied: dict[str, str]


@dataclass
class Comparison:
    only_in: dict[str, list[str]] = field(default_factory=dict)  # tensor -> sources that have it (not all do)
    shape_differs: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)  # tensor -> shape per input
    relative_l2: dict[str, list[float]] = field(default_factory=dict)  # tensor -> ||x_k - x_0|| / ||x_0||, k >= 1


@dataclass
class InspectReport:
    checkpoints: list[CheckpointSummary]
    tensors: list[tuple[str, str, tuple[int, ...]]]  # of the first input: name, dtype, shape
    comparison: Comparison | None = None


def summarize(ckpt: Checkpoint) -> CheckpointSummary:
    dtypes: Counter = Counter()
    per_file: dict[str, list[int]] = {f: [0, 0] for f in ckpt.files}
    for t in ckpt.tensors.values():
        dtypes[t.dtype] += t.numel
        per_file.setdefault(t.file, [0, 0])
        per_file[t.file][0] += 1
        per_file[t.file][1] += t.nbytes
    shards = [ShardSummary(os.path.basename(f), n, b) for f, (n, b) in per_file.items()]
    return CheckpointSummary(ckpt.source, len(ckpt.tensors), ckpt.num_parameters, ckpt.total_bytes,
                             dict(dtypes), shards, dict(ckpt.tied))


def inspect(inputs, *, distances: bool = True, device: str = "cpu", allow_pickle: bool = False,
            progress=None) -> InspectReport:
    """Summarise each checkpoint from its headers. With two or more and ``distances``, stream
    every shared same-shape tensor once per input to get its relative L2 distance to the first."""
    ckpts = open_inputs(inputs, allow_pickle)
    first = ckpts[0]
    report = InspectReport([summarize(c) for c in ckpts],
                           [(t.name, t.dtype, t.shape) for t in first.tensors.values()])
    if len(ckpts) == 1:
        return report
    comparison = Comparison()
    names = list(dict.fromkeys(n for c in ckpts for n in c.tensors))
    shared = []
    for name in names:
        infos = [c.resolve(name) for c in ckpts]
        if any(i is None for i in infos):
            comparison.only_in[name] = [c.source for c, i in zip(ckpts, infos) if i is not None]
        elif len({i.shape for i in infos}) > 1:
            comparison.shape_differs[name] = [i.shape for i in infos]
        else:
            shared.append(name)
    report.comparison = comparison
    if distances:
        comparison.relative_l2 = _relative_l2(ckpts, shared, device, progress)
    return report


def _relative_l2(ckpts: list[Checkpoint], names: list[str], device: str, progress) -> dict[str, list[float]]:
    import torch

    from ..engine.torch_compute import resolve_device

    dev = resolve_device(device)
    out = {}
    for k, name in enumerate(names):
        ref = ckpts[0].read(name, dev).to(torch.float64)
        norm = torch.linalg.vector_norm(ref).item()
        row = []
        for c in ckpts[1:]:
            diff = torch.linalg.vector_norm(c.read(name, dev).to(torch.float64) - ref).item()
            row.append(diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf")))
        out[name] = row
        if progress is not None:
            progress(k + 1, len(names), name)
    return out
