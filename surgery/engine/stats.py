"""Statistics passes: stream the inputs once, evaluate expressions per tensor, reduce to a few numbers.

Global methods need numbers about the whole model before the writing pass (a top-k threshold over
every entry of a task vector, the L1 norm of a merged vector). Each pass holds only the tensors in
the read-ahead window plus small accumulators, so memory does not depend on model size.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

from ..io.checkpoint import Checkpoint
from ..ops.common import compute_dtype
from .plan import Expr, refs
from .stream import stream_inputs


def reduce_pass(ckpts: Sequence[Checkpoint], items: Sequence[tuple[str, Sequence[Expr]]],
                fn: Callable[[str, int, int, list], None], device="auto", precision: str = "F64",
                digests: dict | None = None, hash_inputs: Sequence[int] = (), allow_numpy: bool = False) -> None:
    """For each ``(name, exprs)``, call ``fn(name, start, numel, [flat values of each expr])`` on
    successive pieces of the tensor (cache-sized blocks where the expressions are elementwise),
    streaming each input once.

    ``precision`` must be the writing pass's compute dtype, so statistics see the very values the
    output is made of. ``digests``/``hash_inputs``: content hashes taken on the way, as in ``execute``.
    With ``allow_numpy`` (``fn`` takes numpy arrays as well as torch tensors), numpy-capable
    expressions on the CPU stream through the torch-free path."""
    jobs = [(name, list(dict.fromkeys(r for e in exprs for r in refs(e)))) for name, exprs in items]
    by_name = dict(items)
    if allow_numpy and _numpy_usable(ckpts, items, device):
        from . import numpy_compute
        from ..io.mapped import MappedFiles

        files = MappedFiles()
        read = numpy_compute.reader(files)

        def pieces(exprs, loaded, infos):
            return numpy_compute.blocks(exprs, loaded, {r: i.dtype for r, i in infos.items()},
                                        next(iter(loaded.values())).size)

        def release(infos):
            for info in infos:
                files.release(info)
    else:
        from .torch_compute import blocks, reader, resolve_device

        dev = resolve_device(device)
        read = reader(dev)
        release = read.release

        def pieces(exprs, loaded, infos):
            return blocks(exprs, loaded, next(iter(loaded.values())).numel(), dev)

    with compute_dtype(precision), contextlib.closing(
            stream_inputs(ckpts, jobs, read, digests=digests, hash_inputs=hash_inputs)) as stream:
        for name, loaded, _ in stream:
            infos = {r: ckpts[r.input].resolve(r.name) for r in loaded}
            numel = math.prod(next(iter(infos.values())).shape)
            for start, values in pieces(by_name[name], loaded, infos):
                fn(name, start, numel, values)
            release(list(infos.values()))


def _numpy_usable(ckpts, items, device) -> bool:
    """Statistics over numpy-capable expressions of float inputs run torch-free on the CPU."""
    from . import numpy_compute
    from .executor import numpy_allowed

    return numpy_allowed(device) and all(numpy_compute.expr_usable(e, ckpts) for _, exprs in items for e in exprs)


def global_topk_thresholds(ckpts: Sequence[Checkpoint], items: Sequence[tuple[str, Sequence[Expr]]],
                           keep: Sequence[int], device="auto") -> list[float]:
    """For each of T expressions per tensor (T task vectors), the exact magnitude of the ``keep[t]``-th
    largest entry over all tensors together (see :mod:`surgery.engine.topk`)."""
    from .topk import global_topk

    return [sel.threshold for sel in global_topk(ckpts, items, keep, device)]


def tensor_topk_thresholds(ckpts: Sequence[Checkpoint], items: Sequence[tuple[str, Sequence[Expr]]],
                           density: float, device="auto") -> dict[str, list[float]]:
    """Per tensor and per expression (task), the magnitude of the k-th largest entry of that tensor,
    ``k = keep_count(numel, density)``: per-tensor top-k as one streamed pass, so the writing pass
    can trim with an elementwise threshold. One float32 magnitude buffer per task is held while its
    tensor streams through."""
    import torch

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
    import torch

    totals: list[float] = []

    def add(_name, _start, _numel, values):
        if not totals:
            totals.extend([0.0] * len(values))
        for i, v in enumerate(values):
            totals[i] += float(v.abs().sum(dtype=torch.float64))

    reduce_pass(ckpts, items, add, device)
    return totals
