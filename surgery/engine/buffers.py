"""A pool of byte buffers reused across tensors on the numpy path.

Layers repeat the same shapes, so after the first layer every read and every output fits a buffer
freed a moment before. Without reuse each tensor costs a fresh mapping whose every page the kernel
zeroes on first touch: on a 300M-parameter soup that zeroing took more CPU than the arithmetic.
The pool keeps the most recently freed buffers up to ``limit`` idle bytes (older ones are let go,
so a few large embedding buffers cannot crowd out the per-layer sizes), and peak memory stays what
the read-ahead window and the writer hold plus that limit.
"""
from __future__ import annotations

import threading

import numpy as np


class BufferPool:
    def __init__(self, limit: int):
        self.limit = limit
        self._idle: list[np.ndarray] = []  # oldest first
        self._idle_bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A flat uint8 buffer of ``nbytes`` (contents undefined)."""
        with self._lock:
            for i in range(len(self._idle) - 1, -1, -1):
                if self._idle[i].nbytes == nbytes:
                    self._idle_bytes -= nbytes
                    return self._idle.pop(i)
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, array: np.ndarray) -> None:
        """Return a buffer obtained from ``take`` (or a view of all of it); the caller must not use it again."""
        if not isinstance(array, np.ndarray):
            return  # a torch result (mixed plans): freed by torch
        base = array
        while isinstance(base.base, np.ndarray):
            base = base.base
        if base.dtype != np.uint8 or base.ndim != 1 or not base.flags.owndata or base.nbytes > self.limit:
            return  # not one of ours, or too big to keep: let it be freed
        with self._lock:
            self._idle.append(base)
            self._idle_bytes += base.nbytes
            while self._idle_bytes > self.limit:
                self._idle_bytes -= self._idle.pop(0).nbytes
