"""Exact global top-k over a whole model's entries, streamed, in two passes of histograms.

Magnitudes are ranked as float32 bit patterns (which order exactly as non-negative floats do): the
first pass counts the high 16 bits, the second the low 16 bits inside the one bucket that holds the
k-th largest. Per tensor, sparse copies of both histograms are kept (a few thousand non-empty
buckets each), so after the second pass every tensor knows how many of its entries are above the
threshold and how many equal it. Ties at the threshold are then broken deterministically: the
first ones in tensor order, then flat index order. Every tensor's selection can thus be computed
on its own (any output shard alone), and its exact size is known before the writing pass.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..io.checkpoint import Checkpoint
from ..ops.common import magnitude_bits
from .plan import Call, Expr, Ref, refs

_BUCKETS = 1 << 16  # the low 16 bits of a magnitude's pattern
_HIGH_BUCKETS = 1 << 15  # its high 16 bits: the sign bit is clear


@dataclass
class TopK:
    keep: int  # entries selected over all tensors
    threshold_bits: int | None  # float32 pattern of the keep-th largest magnitude; None selects nothing
    quota: dict[str, int] = field(default_factory=dict)  # per tensor: entries equal to the threshold it keeps
    kept: dict[str, int] = field(default_factory=dict)  # per tensor: entries selected
    ties: dict[str, int] = field(default_factory=dict)  # per tensor: entries equal to the threshold

    @property
    def threshold(self) -> float:
        if self.threshold_bits is None:
            return float("inf")
        return struct.unpack("<f", struct.pack("<I", self.threshold_bits))[0]


class _Histograms:
    """One task's histogram over the whole model, and each tensor's own as a sparse copy."""

    def __init__(self, buckets: int):
        self.total = np.zeros(buckets, dtype=np.int64)
        self.sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, name: str, partials: list) -> None:
        counts = np.zeros_like(self.total)
        for p in partials:
            if p is not None:
                counts += p
        nz = np.flatnonzero(counts)
        self.sparse[name] = (nz.astype(np.int32), counts[nz])
        self.total += counts


def _count(keys, buckets: int) -> np.ndarray:
    if isinstance(keys, np.ndarray):
        return np.bincount(keys, minlength=buckets)
    import torch

    return torch.bincount(keys.cpu().to(torch.int64), minlength=buckets).numpy()


def _accumulate(pieces, keys_of, buckets: int, n_tasks: int) -> list | None:
    """Per task, the histogram of ``keys_of(task, values)`` over one range's pieces."""
    counts = None
    for _, values in pieces:
        step = [_count(keys_of(t, v), buckets) for t, v in enumerate(values)]
        if counts is None:
            counts = step
        else:
            for c, x in zip(counts, step):
                c += x
    return counts


def narrow_difference(expr: Expr, ckpts: Sequence[Checkpoint]) -> bool:
    """``a - b`` of two stored floats at most 32 bits wide. Its float32 magnitude computed in float32
    has the very bits that float64 arithmetic rounded to float32 gives: the float64 difference is
    exact unless the exponents differ by more than 29, and then both round to the larger operand."""
    if not (isinstance(expr, Call) and expr.op == "sub" and len(expr.args) == 2
            and all(isinstance(a, Ref) for a in expr.args)):
        return False
    return all(ckpts[a.input].resolve(a.name).dtype in ("F32", "F16", "BF16") for a in expr.args)


def _locate(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """The bucket holding the ``rank``-th largest entry (1-based), and its rank inside that bucket."""
    above = np.cumsum(hist[::-1])  # entries at or above each bucket, from the top
    i = int(np.searchsorted(above, rank))
    return len(hist) - 1 - i, rank - (int(above[i - 1]) if i > 0 else 0)


def global_topk(ckpts: Sequence[Checkpoint], items: Sequence[tuple[str, Sequence[Expr]]], keep: Sequence[int],
                device="auto", precision: str = "F64", digests: dict | None = None,
                hash_inputs: Sequence[int] = ()) -> list[TopK]:
    """For each of T expressions per tensor, the selection of its ``keep[t]`` largest magnitudes
    over all tensors together; two streamed passes. Inputs in ``hash_inputs`` are read whole in the
    first pass and their tensors' sha256 go to ``digests`` (for a content hash of, say, the base)."""
    from .stats import reduce_pass

    n_tasks = len(keep)
    total = sum(_numel(ckpts, exprs[0]) for _, exprs in items)
    keep = [max(0, min(int(k), total)) for k in keep]
    if all(narrow_difference(e, ckpts) for _, exprs in items for e in exprs):
        precision = "F32"  # the same magnitudes, at a fraction of the cost (see narrow_difference)
    high = [_Histograms(_HIGH_BUCKETS) for _ in range(n_tasks)]

    covered = {(r.input, r.name) for _, exprs in items for e in exprs for r in refs(e)}
    hash_only = [(f"\0hash:{i}:{n}", [Ref(i, n)]) for i in hash_inputs for n in ckpts[i].tensors
                 if (i, n) not in covered]
    selecting = {name for name, _ in items}

    def count_high(name, _numel, pieces):
        if name in selecting:  # else a tensor read only to be hashed
            return _accumulate(pieces, lambda _t, v: magnitude_bits(v) >> 16, _HIGH_BUCKETS, n_tasks)

    def done_high(name, _numel, partials):
        if name in selecting:
            for t in range(n_tasks):
                high[t].add(name, [p[t] if p else None for p in partials])

    reduce_pass(ckpts, list(items) + hash_only, count_high, done_high, device, precision, digests, hash_inputs,
                allow_numpy=True)
    located = [_locate(high[t].total, keep[t]) if keep[t] else (0, 0) for t in range(n_tasks)]
    low = [_Histograms(_BUCKETS) for _ in range(n_tasks)]

    def low_keys(t, v):
        bits = magnitude_bits(v)
        return bits[(bits >> 16) == located[t][0]] & 0xFFFF

    def count_low(_name, _numel, pieces):
        return _accumulate(pieces, low_keys, _BUCKETS, n_tasks)

    def done_low(name, _numel, partials):
        for t in range(n_tasks):
            low[t].add(name, [p[t] if p else None for p in partials])

    reduce_pass(ckpts, items, count_low, done_low, device, precision, allow_numpy=True)
    out = []
    for t in range(n_tasks):
        if keep[t] == 0:
            out.append(TopK(0, None, {n: 0 for n, _ in items}, {n: 0 for n, _ in items}, {n: 0 for n, _ in items}))
            continue
        bucket, rank = located[t]
        low_bits, _ = _locate(low[t].total, rank)
        pattern = (bucket << 16) | low_bits
        above, equal = {}, {}
        for name, _ in items:
            hi_idx, hi_cnt = high[t].sparse[name]
            lo_idx, lo_cnt = low[t].sparse[name]
            above[name] = int(hi_cnt[hi_idx > bucket].sum()) + int(lo_cnt[lo_idx > low_bits].sum())
            equal[name] = int(lo_cnt[lo_idx == low_bits].sum())
        need = keep[t] - sum(above.values())
        quota, kept = {}, {}
        for name, _ in items:  # ties: the first ones in tensor order
            quota[name] = min(equal[name], need)
            need -= quota[name]
            kept[name] = above[name] + quota[name]
        out.append(TopK(keep[t], pattern, quota, kept, equal))
    return out


def _numel(ckpts: Sequence[Checkpoint], expr: Expr) -> int:
    from .plan import refs

    info = ckpts[refs(expr)[0].input].resolve(refs(expr)[0].name)
    return int(np.prod(info.shape, dtype=np.int64))
