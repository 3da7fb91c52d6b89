"""The torch path of the executor: any operation, on CPU or CUDA.

On CPU, elementwise expressions run in cache-sized blocks straight into the output buffer, the
blocks shared out over one thread per core, each block single-threaded: the same bits as one thread
would give, without whole-tensor temporaries.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from typing import Iterator, Sequence

import torch

from ..errors import SurgeryError
from ..io.checkpoint import Checkpoint
from ..io.mapped import MappedFiles
from ..io.read import TORCH_DTYPES
from .evaluate import elementwise, evaluate
from .parallel import map_ranges
from .plan import Expr, Ref

BLOCK_ELEMENTS = 1 << 16  # 256 KB of float32: a block's temporaries stay in L2 cache


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SurgeryError(f"device {device} requested but CUDA is not available; use --device cpu or auto")
    return dev


class Reader:
    """``read(checkpoint, name, want_digest) -> (tensor on device, sha256 hex of its bytes or None)``.

    On the CPU, safetensors inputs are zero-copy views into read-only shared maps (see
    :mod:`surgery.io.mapped`): no copy, no fresh pages to zero. The consumer calls ``release`` with
    the tensors' infos once it is done with them. Operations never write into their inputs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.files = MappedFiles() if device.type == "cpu" else None

    def __call__(self, ckpt: Checkpoint, name: str, want_digest: bool):
        info = ckpt.resolve(name)
        if self.files is not None and info.begin >= 0:
            raw = self.files.view(info)
            digest = hashlib.sha256(raw).hexdigest() if want_digest else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "not writable": by design, see above
                flat = torch.from_numpy(raw) if raw.size else torch.empty(0, dtype=torch.uint8)
            return flat.view(TORCH_DTYPES[info.dtype]).reshape(info.shape), digest
        if not want_digest:
            return ckpt.read(name, self.device), None
        t = ckpt.read(name, "cpu")
        digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()
        return t.to(self.device), digest

    def release(self, infos) -> None:
        if self.files is not None:
            for info in infos:
                if info.begin >= 0:
                    self.files.release(info)


def as_tensors(loaded: dict, infos: dict) -> dict:
    """Numpy inputs (flat, in their storage dtype, as the numpy path reads them) as torch tensors of
    their real dtype and shape, without copying."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only maps: operations never write inputs
        for r, a in loaded.items():
            info = infos[r]
            flat = torch.from_numpy(a.reshape(-1).view("uint8")) if a.size else torch.empty(0, dtype=torch.uint8)
            out[r] = flat.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)
    return out


def reader(device: torch.device) -> Reader:
    return Reader(device)


def blockable(exprs: Sequence[Expr], loaded: dict[Ref, torch.Tensor], numel: int, device: torch.device) -> bool:
    return device.type == "cpu" and numel > BLOCK_ELEMENTS and all(elementwise(e) for e in exprs) and \
        all(t.numel() == numel for t in loaded.values())


def blocks(exprs: Sequence[Expr], loaded: dict[Ref, torch.Tensor], numel: int, device: torch.device,
           lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Evaluate ``exprs`` (same-sized results) as ``(start, [flat values])`` pieces over entries
    ``lo..hi``, in order: cache-sized blocks on the calling thread where :func:`blockable`, else
    the whole tensor as one piece (then ``lo..hi`` must be all of it)."""
    hi = numel if hi is None else hi
    if blockable(exprs, loaded, numel, device):
        flat = {r: t.reshape(-1) for r, t in loaded.items()}
        with single_threaded():
            for start in range(lo, hi, BLOCK_ELEMENTS):
                stop = min(start + BLOCK_ELEMENTS, hi)
                part = {r: t[start:stop] for r, t in flat.items()}
                yield start, [evaluate(e, part).reshape(-1) for e in exprs]
    else:
        yield 0, [evaluate(e, loaded).reshape(-1) for e in exprs]


def compute(expr: Expr, loaded: dict[Ref, torch.Tensor], shape: tuple[int, ...], dtype_code: str,
            device: torch.device) -> torch.Tensor:
    """The output tensor in its final dtype (on the device; the writer moves it to the host)."""
    dtype = TORCH_DTYPES[dtype_code]
    numel = math.prod(shape)
    if not blockable([expr], loaded, numel, device):
        return evaluate(expr, loaded).to(dtype).reshape(shape)
    out = torch.empty(numel, dtype=dtype)
    flat = {r: t.reshape(-1) for r, t in loaded.items()}

    def run(lo: int, hi: int) -> None:
        for start in range(lo, hi, BLOCK_ELEMENTS):
            stop = min(start + BLOCK_ELEMENTS, hi)
            out[start:stop] = evaluate(expr, {r: t[start:stop] for r, t in flat.items()})

    with single_threaded():
        map_ranges(run, numel, BLOCK_ELEMENTS)
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
