"""A run killed with SIGKILL while it writes leaves no output at the target path."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _support import read_folder

# A soup whose progress callback reports each tensor and then dawdles, so the parent can kill it
# while shards are open; the callback runs after the tensor is handed to the writer.
SCRIPT = r"""
import sys, time
import surgery

def slow(p):
    print("tensor", p.tensors_done, p.tensors_total, flush=True)
    time.sleep(0.25)

out, force, *inputs = sys.argv[1:]
surgery.soup(inputs, out, max_shard_size="100KB", force=force == "force", progress=slow, device="cpu")
print("finished", flush=True)
"""


def _run_and_kill(out: Path, inputs, force: bool, after: int = 4) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(out), "force" if force else "-", *map(str, inputs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 120  # a guard against hanging, not a timing assertion
    try:
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    pytest.fail(f"soup exited early: {proc.wait()} {proc.stderr.read()}")
                lines.append(line.strip())
                if line.startswith("tensor") and int(line.split()[1]) >= after:
                    break
            assert time.monotonic() < deadline, "soup never got going"
        partials = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.surgery-")]
        assert partials, "expected the run to be writing into a hidden sibling"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert "finished" not in lines
    return lines


def test_killed_run_leaves_no_output(llama, tmp_path):
    out = tmp_path / "soup"
    _run_and_kill(out, [llama.base, llama.v1], force=False)
    assert not out.exists()
    # the next run to the same place succeeds and clears what the killed one left
    import surgery

    surgery.soup([llama.base, llama.v1], out, max_shard_size="100KB")
    assert set(read_folder(out)) == set(read_folder(llama.base))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup"]


def test_killed_forced_run_keeps_the_old_output(llama, gpt2, tmp_path):
    """With --force the old output stays in place, whole, until the new one is complete."""
    import shutil

    out = tmp_path / "soup"
    shutil.copytree(gpt2.base, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _run_and_kill(out, [llama.base, llama.v1], force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert set(read_folder(out)) == set(read_folder(gpt2.base))
