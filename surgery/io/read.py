"""Tensor-at-a-time reads as torch tensors: ``pread`` into a fresh (pinned, for CUDA) buffer."""
from __future__ import annotations

import threading

import torch

from ..errors import CheckpointError
from .pread import pread_into
from .safetensors_header import TensorInfo

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def read_tensor(info: TensorInfo, device: str | torch.device = "cpu") -> torch.Tensor:
    if info.begin < 0:  # pickled: begin is -1, only nbytes is meaningful
        return _read_pickled(info).to(device)
    pin = torch.device(device).type == "cuda"
    buf = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin)
    if info.nbytes:
        pread_into(info, memoryview(buf.numpy()))
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
