"""DARE (Yu et al., 2024): drop each task-vector entry with probability p, rescale the rest by 1/(1-p)."""
from __future__ import annotations

import hashlib

from .common import compute, torch
from .registry import operation


def tensor_seed(seed: int, task: int, name: str) -> int:
    """A seed per (run seed, task, tensor): the same seed gives the same bytes on any device, in any order."""
    digest = hashlib.sha256(f"surgery-dare:{seed}:{task}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@operation("dare_drop")
def dare_drop(tensors: list[torch.Tensor], *, p: float, seed: int) -> torch.Tensor:
    """Keep each entry with probability 1-p and multiply kept entries by exactly 1/(1-p).

    The mask is drawn on the CPU from a generator seeded by ``seed`` alone, so it does not depend on
    the compute device.
    """
    t = compute(tensors[0])
    if p <= 0:
        return t
    if p >= 1:
        return torch.zeros_like(t)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keep = (torch.rand(t.shape, generator=gen) >= p).to(t.device)
    return torch.where(keep, t * (1.0 / (1.0 - p)), torch.zeros_like(t))
