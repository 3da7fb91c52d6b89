"""The streaming executor: walk the output tensors in file order, read ahead, compute, write.

Reads run on a small thread pool ahead of compute, bounded by a byte budget; writes run on their
own thread behind it. At any moment memory holds the tensors in that window and nothing else, so
peak memory depends on the largest tensors, not on the model or the shard size.

Arithmetic gives the same results on either path: numpy on the CPU for every tensor whose
operations run there (soups, task arithmetic, transfers, grafting: no torch import at all), torch
for the other tensors of a plan (zero-copy over the same maps) and for CUDA.
"""
from __future__ import annotations

import contextlib
import glob
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import SurgeryError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.writer import Shard, ShardWriter
from ..ops.common import compute_dtype
from . import numpy_compute
from ..io.mapped import MappedFiles
from .buffers import BufferPool
from .plan import Plan, refs
from .stream import DEFAULT_READ_AHEAD_BYTES, job_bytes, stream_inputs

BACKEND_ENV = "SURGERY_BACKEND"  # "torch" or "numpy" forces a path (tests compare them); unset: numpy where it can


@dataclass
class Progress:
    """What a progress callback receives after each output tensor."""

    tensors_done: int
    tensors_total: int
    bytes_done: int  # input bytes read so far
    bytes_total: int
    name: str


ProgressCallback = Callable[[Progress], None]


def gpu_possible() -> bool:
    """False when no GPU driver is present: then ``auto`` means the CPU, decided without importing torch."""
    return bool(glob.glob("/dev/nvidia*") or os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg"))


def _forced() -> str:
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced not in ("", "torch", "numpy"):
        raise SurgeryError(f"{BACKEND_ENV}={forced!r}: use torch or numpy")
    return forced


def _on_cpu(device) -> bool:
    return str(device).startswith("cpu") or (str(device) == "auto" and not gpu_possible())


def numpy_allowed(device) -> bool:
    """Whether work on ``device`` may take the numpy path at all (the CPU, torch not forced)."""
    return _on_cpu(device) and _forced() != "torch"


def choose_backend(plan: Plan, ckpts: Sequence[Checkpoint], device) -> str:
    """``numpy`` (every tensor there), ``mixed`` (numpy where it can, torch for the rest, on the
    CPU) or ``torch``."""
    forced = _forced()
    on_cpu = _on_cpu(device)
    if forced == "numpy":
        if not on_cpu:
            raise SurgeryError(f"{BACKEND_ENV}=numpy runs on the CPU only, not on device {device}")
        if not numpy_compute.usable(plan.tensors, ckpts):
            raise SurgeryError(f"{BACKEND_ENV}=numpy: this plan needs torch operations or dtypes")
        return "numpy"
    if forced == "torch" or not on_cpu:
        return "torch"
    if numpy_compute.usable(plan.tensors, ckpts):
        return "numpy"
    # per tensor: numpy where it can, torch (zero-copy over the same maps) for the rest
    return "mixed" if numpy_compute.mappable(plan.tensors, ckpts) else "torch"


NUMPY_MMAP_THRESHOLD = 4 << 20
TORCH_MMAP_THRESHOLD = 1 << 20


def tune_malloc(mmap_threshold: int = NUMPY_MMAP_THRESHOLD) -> None:
    """Make glibc return tensor-sized buffers to the OS, and keep block-sized ones.

    glibc raises its mmap threshold to the size of the largest buffer freed so far (up to 32 MB),
    after which freed tensors stay in the heap and resident memory creeps up over a run: a fixed
    threshold keeps every large tensor buffer mmapped, so peak memory stays flat whatever the model
    size: 4 MB on the numpy path (its 1 MB compute blocks stay in the heap), 1 MB on the torch path
    (whose blocks are smaller and whose tensors are many more fresh buffers). Fixing it also freezes the trim
    threshold at 128 KB, and then every freed block temporary shrinks the heap and the next one
    faults its pages back in (hundreds of thousands of page faults on a 300M soup): a 64 MB trim
    threshold and top pad keep those pages.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-2, 64 << 20)  # M_TOP_PAD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


@dataclass
class _Backend:
    read: Callable  # read(checkpoint, name, want_digest) -> (array, digest)
    compute: Callable  # compute(output tensor, loaded) -> host array; may recycle the inputs
    written: Callable  # written(array): an output is on disk, its buffer may be reused
    mmap_threshold: int


def _owned(result, loaded: dict):
    """``result``, copied if it is one of the inputs (a plain copy): the inputs' pages are released
    before the writer gets to it."""
    if any(result.data_ptr() == t.data_ptr() for t in loaded.values()):
        return result.clone()
    return result


def _backend(plan: Plan, ckpts: Sequence[Checkpoint], device, read_ahead_bytes: int, tap=None) -> _Backend:
    backend = choose_backend(plan, ckpts, device)
    if backend in ("numpy", "mixed"):
        pool = BufferPool(limit=read_ahead_bytes)  # output buffers, recycled once written
        files = MappedFiles()
        on_numpy = {t.spec.name for t in plan.tensors if backend == "numpy" or numpy_compute.usable([t], ckpts)}
        reuse = numpy_compute.Reuse(pool)

        def compute_numpy(out, loaded):
            infos = {r: ckpts[r.input].resolve(r.name) for r in loaded}
            if out.spec.name in on_numpy:
                result = numpy_compute.compute(out.expr, loaded, {r: i.dtype for r, i in infos.items()},
                                               out.spec.shape, out.spec.dtype, pool, reuse)
            else:
                from . import torch_compute

                loaded = torch_compute.as_tensors(loaded, infos)
                result = _owned(torch_compute.compute(out.expr, loaded, out.spec.shape, out.spec.dtype,
                                                      torch_compute.resolve_device("cpu")), loaded)
            if tap is not None:
                tap(out.spec.name, loaded)
            for info in infos.values():
                files.release(info)
            return result

        return _Backend(numpy_compute.reader(files), compute_numpy, pool.give, NUMPY_MMAP_THRESHOLD)
    from . import torch_compute

    dev = torch_compute.resolve_device(device)
    read = torch_compute.reader(dev)

    def compute_torch(out, loaded):
        result = _owned(torch_compute.compute(out.expr, loaded, out.spec.shape, out.spec.dtype, dev).cpu(), loaded)
        if tap is not None:
            tap(out.spec.name, loaded)
        read.release([ckpts[r.input].resolve(r.name) for r in loaded])
        return result

    return _Backend(read, compute_torch, lambda _tensor: None, TORCH_MMAP_THRESHOLD)


def execute(plan: Plan, folder: Path, *, checkpoints: Sequence[Checkpoint] | None = None,
            device="auto", shard_indices: Sequence[int] | None = None,
            progress: ProgressCallback | None = None, read_ahead_bytes: int = DEFAULT_READ_AHEAD_BYTES,
            io_threads: int = 2, digests: dict | None = None, hash_inputs: Sequence[int] = (),
            tap: Callable[[str, dict], None] | None = None) -> list[Shard]:
    """Compute the plan's shards (all, or ``shard_indices``) into ``folder``; returns every planned shard.

    Each shard depends only on the plan and the inputs, so shards can run in separate processes.
    ``tap(name, {ref: input array})``, if given, sees each output tensor's inputs right after it is
    computed, in writing order, on the calling thread (a side output such as a mask file), as the
    arrays it was computed from (torch tensors for operations that need torch).
    """
    ckpts = list(checkpoints) if checkpoints is not None else \
        [open_checkpoint(p, allow_pickle=plan.allow_pickle) for p in plan.inputs]
    backend = _backend(plan, ckpts, device, read_ahead_bytes, tap)
    tune_malloc(backend.mmap_threshold)
    shards = plan.shards()
    chosen = range(len(shards)) if shard_indices is None else shard_indices
    outputs = plan.by_name()
    order = [(i, spec.name) for i in chosen for spec in shards[i].tensors]
    jobs = [((i, name), refs(outputs[name].expr)) for i, name in order]
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
                backend.written(tensor)
            except BaseException as e:  # surfaced in the main thread
                write_error.append(e)

    writer_thread = threading.Thread(target=write_loop, name="surgery-writer", daemon=True)
    writer_thread.start()
    done_bytes = 0
    try:
        with compute_dtype(plan.compute_dtype), contextlib.closing(
                stream_inputs(ckpts, jobs, backend.read, read_ahead_bytes, io_threads, digests, hash_inputs)) as stream:
            for count, ((i, name), loaded, nbytes) in enumerate(stream, start=1):
                result = backend.compute(outputs[name], loaded)
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
        close_errors = []
        for w in writers.values():  # every file closed, even after one fails (a full disk at its last block)
            if w is not None:
                try:
                    w.close()
                except SurgeryError as e:
                    close_errors.append(e)
    if write_error:
        raise write_error[0]
    if close_errors:
        raise close_errors[0]
    return shards
