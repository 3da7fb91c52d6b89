"""The streaming executor: walk the output tensors in file order, read ahead, compute, write.

Reads run on a small thread pool ahead of compute, bounded by a byte budget; writes run on their
own thread behind it. At any moment memory holds the tensors in that window and nothing else, so
peak memory depends on the largest tensors, not on the model or the shard size.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..errors import SurgeryError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.read import TORCH_DTYPES
from ..io.writer import Shard, ShardWriter
from ..ops.common import compute_dtype
from ..ops.registry import get_operation
from .plan import Call, Expr, Plan, Ref, refs
from .stream import DEFAULT_READ_AHEAD_BYTES, job_bytes, stream_inputs

BLOCK_ELEMENTS = 1 << 16  # 256 KB of float32: a block's temporaries stay in L2 cache


@dataclass
class Progress:
    """What a progress callback receives after each output tensor."""

    tensors_done: int
    tensors_total: int
    bytes_done: int  # input bytes read so far
    bytes_total: int
    name: str


ProgressCallback = Callable[[Progress], None]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SurgeryError(f"device {device} requested but CUDA is not available; use --device cpu or auto")
    return dev


def elementwise(expr: Expr) -> bool:
    """True when every operation in the tree is elementwise (and there is at least one)."""
    return isinstance(expr, Call) and get_operation(expr.op).elementwise and \
        all(isinstance(a, Ref) or elementwise(a) for a in expr.args)


def _blockable(exprs: Sequence[Expr], loaded: dict[Ref, torch.Tensor], numel: int, device: torch.device) -> bool:
    return device.type == "cpu" and numel > BLOCK_ELEMENTS and all(elementwise(e) for e in exprs) and \
        all(t.numel() == numel for t in loaded.values())


def blocks(exprs: Sequence[Expr], loaded: dict[Ref, torch.Tensor], numel: int, device: torch.device
           ) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Evaluate ``exprs`` (same-sized results) as ``(start, [flat values])`` pieces, in order.

    On CPU, elementwise expressions run in cache-sized blocks on one thread: the same operations in
    the same order on each element (so the same bits) without whole-tensor temporaries. Otherwise
    the whole tensor comes as one piece.
    """
    if _blockable(exprs, loaded, numel, device):
        flat = {r: t.reshape(-1) for r, t in loaded.items()}
        with single_threaded():
            for start in range(0, numel, BLOCK_ELEMENTS):
                stop = start + BLOCK_ELEMENTS
                part = {r: t[start:stop] for r, t in flat.items()}
                yield start, [evaluate(e, part).reshape(-1) for e in exprs]
    else:
        yield 0, [evaluate(e, loaded).reshape(-1) for e in exprs]


_COMPUTE_THREADS = max(1, torch.get_num_threads())
_compute_pool: ThreadPoolExecutor | None = None


def compute(expr: Expr, loaded: dict[Ref, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """The output tensor in its final dtype.

    Elementwise expressions on CPU run block by block straight into the output buffer, the blocks
    shared out in contiguous runs over one thread per core (each block single-threaded: the same
    bits as one thread would give).
    """
    global _compute_pool
    numel = math.prod(shape)
    if not _blockable([expr], loaded, numel, device):
        return evaluate(expr, loaded).to(dtype)
    out = torch.empty(numel, dtype=dtype)
    flat = {r: t.reshape(-1) for r, t in loaded.items()}

    def run(lo: int, hi: int) -> None:
        for start in range(lo, hi, BLOCK_ELEMENTS):
            stop = min(start + BLOCK_ELEMENTS, hi)
            out[start:stop] = evaluate(expr, {r: t[start:stop] for r, t in flat.items()})

    n_blocks = -(-numel // BLOCK_ELEMENTS)
    workers = min(_COMPUTE_THREADS, n_blocks)
    per = -(-n_blocks // workers) * BLOCK_ELEMENTS
    if _compute_pool is None:
        _compute_pool = ThreadPoolExecutor(max_workers=_COMPUTE_THREADS, thread_name_prefix="surgery-compute")
    with single_threaded():
        # contextvars (the compute dtype) do not cross into pool threads by themselves
        futures = [_compute_pool.submit(contextvars.copy_context().run, run, lo, min(lo + per, numel))
                   for lo in range(0, numel, per)]
        for f in futures:
            f.result()
    return out.reshape(shape)


@contextlib.contextmanager
def single_threaded():
    """One intra-op thread for block-sized operations: splitting a 256 KB operation across OpenMP
    threads costs more than it saves, and spinning workers starve the read and write threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def return_freed_memory_to_the_os() -> None:
    """Make glibc hand large freed buffers back to the OS instead of keeping them in the heap.

    glibc raises its mmap threshold to the size of the largest buffer freed so far (up to 32 MB),
    after which freed tensors stay in the heap and resident memory creeps up over a run. A fixed
    1 MB threshold keeps block temporaries in the heap (reused) and every tensor buffer mmapped, so
    peak memory stays flat whatever the model size.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def evaluate(expr: Expr, loaded: dict[Ref, torch.Tensor]) -> torch.Tensor:
    if isinstance(expr, Ref):
        return loaded[expr]
    assert isinstance(expr, Call)
    args = [evaluate(a, loaded) for a in expr.args]
    return get_operation(expr.op).fn(args, **expr.kwargs)


def execute(plan: Plan, folder: Path, *, checkpoints: Sequence[Checkpoint] | None = None,
            device: str | torch.device = "auto", shard_indices: Sequence[int] | None = None,
            progress: ProgressCallback | None = None, read_ahead_bytes: int = DEFAULT_READ_AHEAD_BYTES,
            io_threads: int = 2, digests: dict | None = None, hash_inputs: Sequence[int] = ()) -> list[Shard]:
    """Compute the plan's shards (all, or ``shard_indices``) into ``folder``; returns every planned shard.

    Each shard depends only on the plan and the inputs, so shards can run in separate processes.
    """
    ckpts = list(checkpoints) if checkpoints is not None else \
        [open_checkpoint(p, allow_pickle=plan.allow_pickle) for p in plan.inputs]
    dev = resolve_device(device)
    return_freed_memory_to_the_os()
    shards = plan.shards()
    chosen = range(len(shards)) if shard_indices is None else shard_indices
    exprs = plan.by_name()
    order = [(i, spec.name) for i in chosen for spec in shards[i].tensors]
    jobs = [((i, name), refs(exprs[name].expr)) for i, name in order]
    total_bytes = sum(job_bytes(ckpts, needs) for _, needs in jobs)

    writers = {i: None for i in chosen}
    write_q: queue.Queue = queue.Queue(maxsize=1)  # one finished tensor waits while another is written
    write_error: list[BaseException] = []

    def write_loop():
        while (item := write_q.get()) is not None:
            if write_error:
                continue  # drain so the producer never blocks
            i, name, tensor = item
            try:
                if writers[i] is None:
                    writers[i] = ShardWriter(folder, shards[i])
                writers[i].write(name, tensor)
            except BaseException as e:  # surfaced in the main thread
                write_error.append(e)

    writer_thread = threading.Thread(target=write_loop, name="surgery-writer", daemon=True)
    writer_thread.start()
    done_bytes = 0
    try:
        with compute_dtype(TORCH_DTYPES[plan.compute_dtype]), contextlib.closing(stream_inputs(ckpts, jobs, dev, read_ahead_bytes, io_threads,
                                                  digests, hash_inputs)) as stream:
            for count, ((i, name), loaded, nbytes) in enumerate(stream, start=1):
                spec = exprs[name].spec
                result = compute(exprs[name].expr, loaded, spec.shape, TORCH_DTYPES[spec.dtype], dev)
                if result.device.type != "cpu":
                    result = result.cpu()
                del loaded
                done_bytes += nbytes
                if write_error:
                    raise write_error[0]
                write_q.put((i, name, result))
                if progress is not None:
                    progress(Progress(count, len(order), done_bytes, total_bytes, name))
    finally:
        write_q.put(None)
        writer_thread.join()
        for w in writers.values():
            if w is not None:
                w.close()
    if write_error:
        raise write_error[0]
    return shards
