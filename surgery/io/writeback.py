"""Starting the kernel's writeback of an output while it is being written.

Every output is fsynced before it is renamed into place. Left to itself, the kernel writes a
model's dirty pages out only then, and the fsync of a 600 MB output waited most of a second with
nothing else to do. Asking for writeback of each stretch as soon as it is written (Linux
``sync_file_range`` with ``SYNC_FILE_RANGE_WRITE``: start, do not wait) overlaps the disk with the
compute, and the final fsync finds little left. Elsewhere this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_SYNC_FILE_RANGE_WRITE = 2
MIN_STRETCH = 32 << 20  # bytes: fewer, larger requests; the device queue takes them whole


def _load():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load() if os.name == "posix" else None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to disk; returns at once."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # advisory: a failure changes nothing


class Writeback:
    """Tracks how much of a file has been written and starts writeback every ``MIN_STRETCH`` bytes."""

    def __init__(self, fd: int, start: int = 0):
        self.fd = fd
        self.started = start  # bytes before this offset have had writeback started
        self.written = start

    def wrote(self, nbytes: int, final: bool = False) -> None:
        self.written += nbytes
        if final or self.written - self.started >= MIN_STRETCH:
            start_writeback(self.fd, self.started, self.written - self.started)
            self.started = self.written
