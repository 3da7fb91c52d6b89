"""Where a shard's bytes go: straight to the disk where the system allows it, else through the page cache.

A buffered ``write`` copies every byte into a freshly allocated page-cache page, and kernel threads
then write the dirty pages out: on two cores, that CPU came out of the computation's share (about a
third of a second per 600 MB in the process, more in the kernel's writeback threads). With
``O_DIRECT`` the disk reads the bytes from our buffer: the writing thread waits on the device
instead of using a core, and the fsync before the rename finds nothing left to write.

Direct writes need an aligned buffer, offset and length. Tensors arrive at any length, so they are
copied into a page-aligned staging buffer written out whenever it fills; the last, partial block
is padded and the file truncated to its true size. Where ``O_DIRECT`` is missing (macOS, Windows)
or refused (tmpfs, some network filesystems), or ``SURGERY_DIRECT_WRITE=0``, writes go through the
page cache, with writeback started as they go (:mod:`.writeback`).
"""
from __future__ import annotations

import errno
import mmap
import os

import numpy as np

from .writeback import Writeback

DIRECT_ENV = "SURGERY_DIRECT_WRITE"  # "0": always write through the page cache
STAGE_BYTES = 16 << 20  # large requests keep the device busy; small enough to stay out of the way
ALIGN = 4096  # a multiple of every common logical block size (512, 4096)
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def direct_wanted() -> bool:
    return bool(_O_DIRECT) and os.environ.get(DIRECT_ENV, "1").strip() not in ("0", "false", "no", "off")


class BufferedSink:
    """Writes through the page cache, starting writeback every few tens of MB."""

    direct = False

    def __init__(self, fd: int, start: int = 0):
        self.fd = fd
        self.size = 0
        self._writeback = Writeback(fd, start)  # ``start``: bytes already in the file

    def write(self, data: np.ndarray, final: bool = False) -> None:
        _write_all(self.fd, memoryview(data).cast("B"))
        self.size += data.nbytes
        self._writeback.wrote(data.nbytes, final)

    def close(self) -> None:
        os.close(self.fd)


class DirectSink:
    """Writes with ``O_DIRECT`` through a page-aligned staging buffer. If the filesystem refuses a
    direct write after all, the file carries on through the page cache from the same offset."""

    direct = True

    def __init__(self, fd: int):
        self.fd = fd
        self.size = 0  # bytes accepted so far (the file's final length)
        self._stage = mmap.mmap(-1, STAGE_BYTES)  # anonymous maps are page aligned
        self._buffer = np.frombuffer(self._stage, dtype=np.uint8)
        self._fill = 0
        self._fallback: BufferedSink | None = None

    def write(self, data: np.ndarray, final: bool = False) -> None:
        data = data.reshape(-1).view(np.uint8)
        pos = 0
        while pos < data.nbytes:
            if self._fallback is not None:  # nothing is staged after the switch
                self._fallback.write(data[pos:], final)
                break
            n = min(data.nbytes - pos, STAGE_BYTES - self._fill)
            np.copyto(self._buffer[self._fill:self._fill + n], data[pos:pos + n])  # numpy copies without the GIL
            self._fill += n
            pos += n
            if self._fill == STAGE_BYTES:
                self._flush(STAGE_BYTES)
        self.size += data.nbytes

    def _flush(self, length: int) -> None:
        """Write the first ``length`` staged bytes (a multiple of ALIGN) at the file's current end."""
        view = memoryview(self._stage)[:length]
        try:
            written = 0
            while written < length:
                n = os.write(self.fd, view[written:])
                if n <= 0:
                    raise OSError(errno.EIO, "direct write made no progress")
                written += n
                if n % ALIGN and written < length:  # a short write off the alignment: the rest through the page cache
                    raise OSError(errno.EINVAL, "unaligned short direct write")
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._to_page_cache(view[written:])
        finally:
            view.release()
        self._fill = 0

    def _to_page_cache(self, rest: memoryview) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_O_DIRECT)
        _write_all(self.fd, rest)
        self._fallback = BufferedSink(self.fd, start=os.lseek(self.fd, 0, os.SEEK_CUR))

    def close(self) -> None:
        try:
            if self._fallback is None and self._fill:
                padded = -(-self._fill // ALIGN) * ALIGN
                self._buffer[self._fill:padded] = 0
                self._flush(padded)
            os.ftruncate(self.fd, self.size)  # drop the padding of the last block
        finally:
            os.close(self.fd)
            self._buffer = None
            self._stage.close()


def open_sink(path) -> BufferedSink | DirectSink:
    """A new (truncated) file at ``path`` to append bytes to, written directly to disk if possible."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if direct_wanted():
        try:
            return DirectSink(os.open(path, flags | _O_DIRECT, 0o644))
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
    return BufferedSink(os.open(path, flags, 0o644))


def _write_all(fd: int, view: memoryview) -> None:
    """``write`` may write less than asked (large buffers, signals): loop until done."""
    while view:
        n = os.write(fd, view)
        view = view[n:]
