"""Positioned reads of one tensor's bytes into a buffer the caller owns (no torch needed).

A memory map would keep every page of a shard resident for as long as any tensor from it lives
(safetensors#443); a positioned read costs one copy into the caller's buffer, which is freed when
the caller drops it.
"""
from __future__ import annotations

import os
import sys

from ..errors import CheckpointError
from .safetensors_header import TensorInfo

_CHUNK = 64 << 20  # bound a single syscall; Linux caps one read near 2 GiB anyway


def open_shard(path: str) -> int:
    """``os.open`` a shard for reading, downloading it first if it is a Hub shard opened from its
    remote header alone (see :func:`fetch_shard`)."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if not fetch_shard(path):
            raise
        return os.open(path, os.O_RDONLY)


def fetch_shard(path: str) -> bool:
    """At a shard's first read: if it is a Hub shard opened from its remote header alone, download
    it into the Hugging Face cache now (see :func:`surgery.hub.fetch_pending`); whether it was one."""
    hub = sys.modules.get("surgery.hub")  # not imported: no Hub checkpoint was opened in this process
    return hub is not None and hub.fetch_pending(path)


def pread_into(info: TensorInfo, view: memoryview) -> None:
    """Fill ``view`` (``info.nbytes`` long) with the tensor's bytes."""
    fd = open_shard(info.file)
    try:
        done = 0
        while done < info.nbytes:
            n = os.preadv(fd, [view[done:done + _CHUNK]], info.begin + done)
            if n == 0:
                raise CheckpointError(f"truncated: file ended after {done} of {info.nbytes} bytes",
                                      file=info.file, tensor=info.name)
            done += n
    except OSError as e:
        raise CheckpointError(f"read failed: {e.strerror or e}", file=info.file, tensor=info.name) from e
    finally:
        os.close(fd)

