"""Statistics passes: stream the inputs once, evaluate expressions per tensor, reduce to a few numbers.

Global methods need numbers about the whole model before the writing pass (a top-k threshold over
every entry of a task vector, the L1 norm of a merged vector). Each pass holds only the tensors in
the read-ahead window plus small accumulators, so memory does not depend on model size.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Iterator, Sequence

from ..io.checkpoint import Checkpoint
from ..ops.common import compute_dtype
from .parallel import map_ranges
from .plan import Expr, refs
from .stream import stream_inputs


def reduce_pass(ckpts: Sequence[Checkpoint], items: Sequence[tuple[str, Sequence[Expr]]],
                part: Callable[[str, int, Iterator[tuple[int, list]]], object],
                done: Callable[[str, int, list], None], device="auto", precision: str = "F64",
                digests: dict | None = None, hash_inputs: Sequence[int] = (), allow_numpy: bool = False) -> None:
    """Stream the inputs once; per ``(name, exprs)``, reduce the expressions' flat values.

    ``part(name, numel, pieces)`` reduces one contiguous range of a tensor, given as ``(start,
    [flat values of each expr])`` pieces in order, to a partial result; ranges of the same tensor
    run on several threads at once (one per core) where the expressions are elementwise.
    ``done(name, numel, partials)`` then runs on the calling thread, once per tensor, with the
    partials in range order.

    ``precision`` must be the writing pass's compute dtype, so statistics see the very values the
    output is made of. ``digests``/``hash_inputs``: content hashes taken on the way, as in ``execute``.
    With ``allow_numpy`` (``part`` takes numpy arrays as well as torch tensors), numpy-capable
    expressions on the CPU stream through the torch-free path."""
    from .executor import NUMPY_MMAP_THRESHOLD, TORCH_MMAP_THRESHOLD, tune_malloc

    jobs = [(name, list(dict.fromkeys(r for e in exprs for r in refs(e)))) for name, exprs in items]
    by_name = dict(items)
    if allow_numpy and _numpy_usable(ckpts, items, device):
        from . import numpy_compute
        from ..io.mapped import MappedFiles

        tune_malloc(NUMPY_MMAP_THRESHOLD)  # as the writing pass does, for the same reasons
        files = MappedFiles()
        read = numpy_compute.reader(files)
        block = numpy_compute.BLOCK_ELEMENTS

        def partials(name, exprs, loaded, infos, numel):
            codes = {r: i.dtype for r, i in infos.items()}
            return map_ranges(lambda lo, hi: part(name, numel, numpy_compute.blocks(exprs, loaded, codes, lo, hi)),
                              numel, block)

        def release(infos):
            for info in infos:
                files.release(info)
    else:
        from .torch_compute import BLOCK_ELEMENTS, blockable, blocks, reader, resolve_device, single_threaded

        dev = resolve_device(device)
        read = reader(dev)
        release = read.release
        tune_malloc(TORCH_MMAP_THRESHOLD)

        def partials(name, exprs, loaded, infos, numel):
            if not blockable(exprs, loaded, numel, dev):
                return [part(name, numel, blocks(exprs, loaded, numel, dev))]
            with single_threaded():
                return map_ranges(lambda lo, hi: part(name, numel, blocks(exprs, loaded, numel, dev, lo, hi)),
                                  numel, BLOCK_ELEMENTS)

    with compute_dtype(precision), contextlib.closing(
            stream_inputs(ckpts, jobs, read, digests=digests, hash_inputs=hash_inputs)) as stream:
        for name, loaded, _ in stream:
            infos = {r: ckpts[r.input].resolve(r.name) for r in loaded}
            numel = math.prod(next(iter(infos.values())).shape)
            done(name, numel, partials(name, by_name[name], loaded, infos, numel))
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

    out: dict[str, list[float]] = {}
    buffers: dict[str, list] = {}
    lock = threading.Lock()

    def part(name, numel, pieces):
        for start, values in pieces:  # the ranges of a tensor fill disjoint slices of its buffers
            with lock:
                if name not in buffers:
                    buffers[name] = [torch.empty(numel, dtype=torch.float32) for _ in values]
            for buffer, v in zip(buffers[name], values):
                buffer[start:start + v.numel()] = v.abs()

    def done(name, _numel, _partials):
        out[name] = [topk_threshold(b, density) for b in buffers.pop(name)]

    reduce_pass(ckpts, items, part, done, device)
    return out


def l1_norms(ckpts: Sequence[Checkpoint], items: Sequence[tuple[str, Sequence[Expr]]], device="auto") -> list[float]:
    """For each of the expressions per tensor, the L1 norm over all tensors (float64 accumulation)."""
    import torch


    def part(_name, _numel, pieces):
        sums = None
        for _, values in pieces:
            terms = [float(v.abs().sum(dtype=torch.float64)) for v in values]
            sums = terms if sums is None else [a + b for a, b in zip(sums, terms)]
        return sums

    totals: list[float] = []

    def done(_name, _numel, partials):
        for sums in partials:
            if sums is None:
                continue
            if not totals:
                totals.extend([0.0] * len(sums))
            for i, v in enumerate(sums):
                totals[i] += v

    reduce_pass(ckpts, items, part, done, device)
    return totals
