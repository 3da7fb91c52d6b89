"""Zero-copy mapped reads: the bytes are right, and a released tensor stops counting in resident memory."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from surgery.errors import CheckpointError
from surgery.io.checkpoint import open_checkpoint
from surgery.io.mapped import MappedFiles
from _support import write_st

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def resident_kb(path) -> int:
    """Resident size of this process's mappings of ``path``, from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:  # a mapping's header line: range perms offset dev inode path
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_views_hold_the_file_bytes_and_release_drops_their_pages(tmp_path):
    big = torch.arange(4 << 20, dtype=torch.float32)  # 16 MB
    small = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    path = write_st(tmp_path / "m" / "model.safetensors", {"big": big, "small": small})
    ckpt = open_checkpoint(str(tmp_path / "m"))
    files = MappedFiles()
    view = files.view(ckpt.resolve("big"))
    assert not view.flags.writeable  # operations cannot write into an input
    assert np.array_equal(view.view(np.float32), big.numpy())
    assert files.view(ckpt.resolve("small")).tobytes() == small.view(torch.uint8).numpy().tobytes()
    assert resident_kb(path) >= 15 * 1024  # prefetched and touched: resident
    files.release(ckpt.resolve("big"))
    files.release(ckpt.resolve("small"))
    assert resident_kb(path) <= 64, "released pages still resident"
    assert np.array_equal(view.view(np.float32)[-3:], big.numpy()[-3:])  # still readable: faults back in


def test_a_file_cut_short_after_opening_is_an_error_not_a_crash(tmp_path):
    path = write_st(tmp_path / "m" / "model.safetensors", {"w": torch.ones(1 << 16)})
    ckpt = open_checkpoint(str(tmp_path / "m"))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match=r"truncated.*model.safetensors.*\bw\b|model.safetensors.*truncated"):
        MappedFiles().view(ckpt.resolve("w"))
