"""Statistics passes: stream the inputs once, evaluate expressions per tensor, reduce to a few numbers.

Global methods need numbers about the whole model before the writing pass (a top-k threshold over
every entry of a task vector, the L1 norm of a merged vector). Each pass holds only the tensors in
the read-ahead window plus small accumulators, so memory does not depend on model size.
"""
from __future__ import annotations

import contextlib
import struct
from typing import Callable, Sequence

import torch

from ..io.checkpoint import Checkpoint
from ..ops.common import compute_dtype
from .torch_compute import blocks, reader, resolve_device
from .plan import Expr, refs
from .stream import stream_inputs


def reduce_pass(ckpts: Sequence[Checkpoint], items: Sequence[tuple[str, Sequence[Expr]]],
                fn: Callable[[str, int, int, list[torch.Tensor]], None], device="auto", precision: str = "F64") -> None:
    """For each ``(name, exprs)``, call ``fn(name, start, numel, [flat values of each expr])`` on
    successive pieces of the tensor (cache-sized blocks where the expressions are elementwise),
    streaming each input once.

    ``precision`` must be the writing pass's compute dtype, so statistics see the very values the
    output is made of."""
    dev = resolve_device(device)
    jobs = [(name, list(dict.fromkeys(r for e in exprs for r in refs(e)))) for name, exprs in items]
    by_name = dict(items)
    with compute_dtype(precision), contextlib.closing(stream_inputs(ckpts, jobs, reader(dev))) as stream:
        for name, loaded, _ in stream:
            numel = next(iter(loaded.values())).numel()
            for start, values in blocks(by_name[name], loaded, numel, dev):
                fn(name, start, numel, values)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """float32 magnitudes as int32 bit patterns, which order exactly as the values do.

    Global top-k ranks float32 magnitudes (``trim_threshold`` compares the same way): a task vector of
    bf16 or fp32 weights computed in float64 rounds to exactly the float32 difference."""
    return t.detach().abs().to(torch.float32).reshape(-1).view(torch.int32)


def global_topk_thresholds(ckpts: Sequence[Checkpoint], items: Sequence[tuple[str, Sequence[Expr]]],
                           keep: Sequence[int], device="auto") -> list[float]:
    """For each of T expressions per tensor (T task vectors), the exact magnitude of the ``keep[t]``-th
    largest entry over all tensors together, in two streamed passes of 2**16-bucket histograms: the
    first over the high 16 bits of the float32 pattern, the second over the low 16 bits inside the
    one bucket that holds the answer."""
    n_tasks = len(keep)
    high = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(n_tasks)]

    def count_high(_name, _start, _numel, values):
        for t, v in enumerate(values):
            high[t] += torch.bincount((_bits(v) >> 16).cpu(), minlength=1 << 16)

    reduce_pass(ckpts, items, count_high, device)
    bucket, rank = [], []
    for t in range(n_tasks):
        above = torch.flip(high[t], [0]).cumsum(0)  # entries at or above each bucket, from the top
        i = int(torch.searchsorted(above, keep[t]))  # first bucket (from the top) reaching keep
        b = (1 << 16) - 1 - i
        bucket.append(b)
        rank.append(keep[t] - (int(above[i - 1]) if i > 0 else 0))  # rank inside that bucket
    low = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(n_tasks)]

    def count_low(_name, _start, _numel, values):
        for t, v in enumerate(values):
            bits = _bits(v)
            inside = bits[(bits >> 16) == bucket[t]]
            low[t] += torch.bincount((inside & 0xFFFF).cpu(), minlength=1 << 16)

    reduce_pass(ckpts, items, count_low, device)
    thresholds = []
    for t in range(n_tasks):
        above = torch.flip(low[t], [0]).cumsum(0)
        i = int(torch.searchsorted(above, rank[t]))
        pattern = (bucket[t] << 16) | ((1 << 16) - 1 - i)
        thresholds.append(struct.unpack("<f", struct.pack("<I", pattern))[0])
    return thresholds


def tensor_topk_thresholds(ckpts: Sequence[Checkpoint], items: Sequence[tuple[str, Sequence[Expr]]],
                           density: float, device="auto") -> dict[str, list[float]]:
    """Per tensor and per expression (task), the magnitude of the k-th largest entry of that tensor,
    ``k = keep_count(numel, density)``: per-tensor top-k as one streamed pass, so the writing pass
    can trim with an elementwise threshold. One float32 magnitude buffer per task is held while its
    tensor streams through."""
    from ..ops.ties import topk_threshold

    buffers: dict[int, torch.Tensor] = {}
    out: dict[str, list[float]] = {}

    def collect(name, start, numel, values):
        for t, v in enumerate(values):
            if start == 0:
                buffers[t] = torch.empty(numel, dtype=torch.float32)
            buffers[t][start:start + v.numel()] = v.abs()
        if start + values[0].numel() == numel:
            out[name] = [topk_threshold(buffers[t], density) for t in range(len(values))]
            buffers.clear()

    reduce_pass(ckpts, items, collect, device)
    return out


def l1_norms(ckpts: Sequence[Checkpoint], items: Sequence[tuple[str, Sequence[Expr]]], device="auto") -> list[float]:
    """For each of the expressions per tensor, the L1 norm over all tensors (float64 accumulation)."""
    totals: list[float] = []

    def add(_name, _start, _numel, values):
        if not totals:
            totals.extend([0.0] * len(values))
        for i, v in enumerate(values):
            totals[i] += float(v.abs().sum(dtype=torch.float64))

    reduce_pass(ckpts, items, add, device)
    return totals
