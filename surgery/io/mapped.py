"""Zero-copy tensor reads for the CPU: views into read-only shared maps of the shard files.

A ``pread`` copies every byte out of the page cache into a fresh buffer whose pages the kernel must
first zero; on a soup of three 300M models those two costs took more CPU than the arithmetic. A view
into a shared map reads the page-cache pages where they are. Pinning is avoided by hand instead:
``prefetch`` faults a tensor's pages in on a read-ahead thread (so compute sees no page faults), and
``release`` drops them from this process (``MADV_DONTNEED``; the page cache keeps them) once the
tensor is consumed, so resident memory holds only the read-ahead window, as with ``pread``.
"""
from __future__ import annotations

import errno
import mmap
import threading

import numpy as np

from ..errors import CheckpointError
from .pread import fetch_shard
from .safetensors_header import TensorInfo

_PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; Python 3.11 lacks the name


class MappedFiles:
    """One read-only map per file, opened on first use and kept for the run."""

    def __init__(self):
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._populate = hasattr(mmap.mmap, "madvise")  # MADV_POPULATE_READ still untried or working

    def _map(self, info: TensorInfo) -> mmap.mmap:
        if info.file not in self._maps:
            fetch_shard(info.file)  # a Hub shard known by its header alone: downloaded outside the lock
        with self._lock:
            m = self._maps.get(info.file)
            if m is None:
                try:
                    with open(info.file, "rb") as f:
                        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"cannot map file: {e}", file=info.file, tensor=info.name) from e
                self._maps[info.file] = m
        if info.begin + info.nbytes > len(m):
            raise CheckpointError(f"truncated: tensor ends at byte {info.begin + info.nbytes}, file has {len(m)}",
                                  file=info.file, tensor=info.name)
        return m

    def view(self, info: TensorInfo, prefetch: bool = True) -> np.ndarray:
        """The tensor's bytes as a flat read-only uint8 array (no copy); ``prefetch`` faults them in now,
        so a read error surfaces here as an exception rather than later as a SIGBUS."""
        if info.nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        m = self._map(info)
        if prefetch and self._populate:
            try:
                self._advise(m, info, MADV_POPULATE_READ)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise CheckpointError(f"read failed: {e.strerror or e}", file=info.file, tensor=info.name) from e
                self._populate = False  # an older kernel: ask for asynchronous read-ahead instead
        if prefetch and not self._populate and hasattr(m, "madvise"):
            self._advise(m, info, mmap.MADV_WILLNEED)
        return np.frombuffer(m, dtype=np.uint8, count=info.nbytes, offset=info.begin)

    def release(self, info: TensorInfo) -> None:
        """Drop the tensor's pages from this process's memory (they stay in the page cache)."""
        m = self._maps.get(info.file)
        if m is not None and info.nbytes and hasattr(m, "madvise"):
            self._advise(m, info, mmap.MADV_DONTNEED)

    @staticmethod
    def _advise(m: mmap.mmap, info: TensorInfo, option: int) -> None:
        start = info.begin - info.begin % _PAGE  # whole pages: a neighbour's share just faults back in
        m.madvise(option, start, info.begin + info.nbytes - start)
