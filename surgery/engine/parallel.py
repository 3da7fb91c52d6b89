"""Sharing one tensor's blocks out over one thread per core.

Both compute paths and the statistics passes split a tensor into a few contiguous, block-aligned
ranges and run each on a pool thread (numpy and single-threaded torch kernels release the GIL in
their loops). Ranges are contiguous so a range's work stays in order: results come back in range
order, and the caller combines them (into one output buffer, or partial statistics summed).
"""
from __future__ import annotations

import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

THREADS = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
T = TypeVar("T")
_pool: ThreadPoolExecutor | None = None
_PREFIX = "surgery-compute"


def ranges(numel: int, block: int, workers: int = THREADS) -> list[tuple[int, int]]:
    """At most ``workers`` contiguous ranges covering ``0..numel``, each a whole number of blocks
    (but the last); one empty range for an empty tensor."""
    n_blocks = max(1, -(-numel // block))
    per = -(-n_blocks // max(1, min(workers, n_blocks))) * block
    return [(lo, min(lo + per, numel)) for lo in range(0, numel, per)] or [(0, 0)]


def map_ranges(fn: Callable[[int, int], T], numel: int, block: int, workers: int = THREADS) -> list[T]:
    """``[fn(lo, hi) for each range]``, the ranges run on pool threads when there are several.
    contextvars (the compute dtype) are carried into the threads. Called from a pool thread (an
    operation inside a block), it runs the ranges there, in turn: waiting on the pool from inside it
    could leave no thread to do the work."""
    global _pool
    parts = ranges(numel, block, workers)
    if len(parts) == 1 or threading.current_thread().name.startswith(_PREFIX):
        return [fn(lo, hi) for lo, hi in parts]
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix=_PREFIX)
    futures = [_pool.submit(contextvars.copy_context().run, fn, lo, hi) for lo, hi in parts]
    return [f.result() for f in futures]
