"""Read-ahead: bring each job's input tensors onto the device, in order, ahead of the consumer.

Shared by every pass over the inputs (the writing pass, and the statistics passes that global
methods need), so all of them overlap I/O with compute under the same memory bound.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Hashable, Iterator, Sequence

from ..io.checkpoint import Checkpoint
from .plan import Ref

DEFAULT_READ_AHEAD_BYTES = 128 << 20  # ample to hide read latency; more only raises peak memory
MAX_JOBS_AHEAD = 32


def job_bytes(ckpts: Sequence[Checkpoint], needs: Sequence[Ref]) -> int:
    return sum(ckpts[r.input].resolve(r.name).nbytes for r in needs)


# read(checkpoint, name, want_digest) -> (array, sha256 hex of its bytes if wanted): torch or numpy
Reader = Callable[[Checkpoint, str, bool], tuple[object, str | None]]


def stream_inputs(ckpts: Sequence[Checkpoint], jobs: Sequence[tuple[Hashable, Sequence[Ref]]], read: Reader,
                  read_ahead_bytes: int = DEFAULT_READ_AHEAD_BYTES, io_threads: int = 2,
                  digests: dict | None = None, hash_inputs: Sequence[int] = ()
                  ) -> Iterator[tuple[Hashable, dict[Ref, object], int]]:
    """Yield ``(key, {ref: tensor}, bytes_read)`` per job, in order.

    Reads for later jobs run on ``io_threads`` threads while the consumer works, as long as the
    bytes held (the consumer's current job included) stay within ``read_ahead_bytes``; a job larger
    than the budget is still read, alone. A job's tensors are released when the consumer asks for
    the next one. A tensor the previous job also needs is taken from it, not read again. For inputs
    in ``hash_inputs``, ``digests[(input, stored name)]`` receives the
    sha256 of each tensor's bytes, computed on the read threads.
    """
    hashed = set(hash_inputs)

    def load(needs: Sequence[Ref], previous=None, shared=frozenset()) -> dict:
        out = {}
        if shared:  # consecutive jobs over the same inputs (an SFT's indices, then its values): read once
            before = previous.result()
            out.update({r: before[r] for r in shared})
        for r in needs:
            if r in out:
                continue
            out[r], digest = read(ckpts[r.input], r.name, r.input in hashed)
            if digest is not None:
                digests[(r.input, ckpts[r.input].resolve(r.name).name)] = digest
        return out

    cost = [job_bytes(ckpts, needs) for _, needs in jobs]
    pending: deque = deque()
    held = 0
    nxt = 0
    last_future, last_needs = None, frozenset()
    with ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="surgery-read") as pool:
        try:
            for current in range(len(jobs)):
                while nxt < len(jobs) and len(pending) < MAX_JOBS_AHEAD and \
                        (not pending or held + cost[nxt] <= read_ahead_bytes):
                    needs = jobs[nxt][1]
                    shared = frozenset(needs) & last_needs
                    last_future = pool.submit(load, needs, last_future, shared)
                    last_needs = frozenset(needs)
                    pending.append(last_future)
                    held += cost[nxt]
                    nxt += 1
                loaded = pending.popleft().result()
                yield jobs[current][0], loaded, cost[current]
                del loaded
                held -= cost[current]
        finally:
            for f in pending:
                f.cancel()
