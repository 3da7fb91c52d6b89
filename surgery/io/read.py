"""Tensor-at-a-time reads: ``pread`` into a fresh buffer, so nothing keeps a shard mapped.

A memory map would keep every page of a shard resident for as long as any tensor from it lives
(safetensors#443); a positioned read costs one copy into a buffer the caller owns, and that buffer
is freed when the tensor is dropped.
"""
from __future__ import annotations

import os
import threading

import torch

from ..errors import CheckpointError
from .safetensors_header import TensorInfo

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
_CHUNK = 64 << 20  # bound a single syscall; Linux caps one read near 2 GiB anyway


def read_tensor(info: TensorInfo, device: str | torch.device = "cpu") -> torch.Tensor:
    if info.begin < 0:  # pickled: begin is -1, only nbytes is meaningful
        return _read_pickled(info).to(device)
    pin = torch.device(device).type == "cuda"
    buf = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin)
    view = memoryview(buf.numpy()) if info.nbytes else memoryview(b"")
    fd = os.open(info.file, os.O_RDONLY)
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
    tensor = buf.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)
    if pin:
        return tensor.to(device, non_blocking=True)
    return tensor


# Pickled checkpoints (only with --allow-pickle). torch.load(mmap=True) maps lazily; one file is
# kept loaded at a time, since shards are walked in order.
_pickle_lock = threading.Lock()
_pickle_cache: dict[str, dict] = {}


def _load_pickle(path: str) -> dict:
    with _pickle_lock:
        if path not in _pickle_cache:
            _pickle_cache.clear()
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"cannot load pickled checkpoint with weights_only=True: {e}", file=path) from e
            if not isinstance(state, dict):
                raise CheckpointError("pickled checkpoint is not a state dict", file=path)
            _pickle_cache[path] = state
        return _pickle_cache[path]


def pickle_tensor_infos(path: str) -> dict[str, TensorInfo]:
    infos = {}
    for name, t in _load_pickle(path).items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"unsupported dtype {t.dtype}", file=path, tensor=name)
        infos[name] = TensorInfo(name, path, SAFETENSORS_DTYPES[t.dtype], tuple(t.shape), -1, t.numel() * t.element_size() - 1)
    return infos


def _read_pickled(info: TensorInfo) -> torch.Tensor:
    return _load_pickle(info.file)[info.name].contiguous().clone()
