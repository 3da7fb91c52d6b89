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
from .plan import Expr, Ref, refs

_BUCKETS = 1 << 16


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


class _PerTensorHistogram:
    """A dense histogram for the tensor streaming now, kept sparse per tensor once it is done."""

    def __init__(self):
        self.total = np.zeros(_BUCKETS, dtype=np.int64)
        self.sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._current = np.zeros(_BUCKETS, dtype=np.int64)

    def add(self, name: str, start: int, done: bool, keys) -> None:

        if start == 0:
            self._current[:] = 0
        if isinstance(keys, np.ndarray):
            self._current += np.bincount(keys, minlength=_BUCKETS)
        else:
            import torch

            self._current += torch.bincount(keys.cpu(), minlength=_BUCKETS).numpy()
        if done:
            nz = np.flatnonzero(self._current)
            self.sparse[name] = (nz.astype(np.int32), self._current[nz].copy())
            self.total += self._current


def _locate(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """The bucket holding the ``rank``-th largest entry (1-based), and its rank inside that bucket."""
    above = np.cumsum(hist[::-1])  # entries at or above each bucket, from the top
    i = int(np.searchsorted(above, rank))
    return _BUCKETS - 1 - i, rank - (int(above[i - 1]) if i > 0 else 0)


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
    high = [_PerTensorHistogram() for _ in range(n_tasks)]

    def count_high(name, start, numel, values):
        for t, v in enumerate(values):
            high[t].add(name, start, start + _size(v) == numel, magnitude_bits(v) >> 16)

    covered = {(r.input, r.name) for _, exprs in items for e in exprs for r in refs(e)}
    hash_only = [(f"\0hash:{i}:{n}", [Ref(i, n)]) for i in hash_inputs for n in ckpts[i].tensors
                 if (i, n) not in covered]
    selecting = {name for name, _ in items}

    def count_high_or_hash(name, start, numel, values):
        if name in selecting:
            count_high(name, start, numel, values)

    reduce_pass(ckpts, list(items) + hash_only, count_high_or_hash, device, precision, digests, hash_inputs,
                allow_numpy=True)
    located = [_locate(high[t].total, keep[t]) if keep[t] else (0, 0) for t in range(n_tasks)]
    low = [_PerTensorHistogram() for _ in range(n_tasks)]

    def count_low(name, start, numel, values):
        for t, v in enumerate(values):
            bits = magnitude_bits(v)
            low[t].add(name, start, start + _size(v) == numel, bits[(bits >> 16) == located[t][0]] & 0xFFFF)

    reduce_pass(ckpts, items, count_low, device, precision, allow_numpy=True)
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


def _size(v) -> int:
    return v.size if isinstance(v, np.ndarray) else v.numel()


def _numel(ckpts: Sequence[Checkpoint], expr: Expr) -> int:
    from .plan import refs

    info = ckpts[refs(expr)[0].input].resolve(refs(expr)[0].name)
    return int(np.prod(info.shape, dtype=np.int64))
