"""Sparse surgery: grafting by a global top-k mask, and sparse fine-tunes (SFTs) as index/value pairs.

Selections come from :func:`surgery.engine.topk.global_topk`: a float32 magnitude threshold plus,
per tensor, how many entries exactly at the threshold it keeps (the first ones in flat order).
"""
from __future__ import annotations

import numpy as np

from .common import compute, torch
from .registry import operation


def selected(delta, threshold_bits: int | None, quota: int):
    """Flat bool mask: magnitudes above the threshold, plus the first ``quota`` equal to it."""
    bits = delta.detach().abs().to(torch.float32).reshape(-1).view(torch.int32)
    if threshold_bits is None:
        return torch.zeros(bits.numel(), dtype=torch.bool, device=bits.device)
    mask = bits > threshold_bits
    if quota:
        mask[(bits == threshold_bits).nonzero().reshape(-1)[:quota]] = True
    return mask


def _delta(tensors):
    return compute(tensors[1]) - compute(tensors[0])


@operation("graft")
def graft(tensors: list, *, threshold_bits: int | None, quota: int = 0):
    """theta = base + gamma * (ft - base) for a 0/1 mask gamma: the fine-tuned entry where selected,
    the base entry elsewhere (taken as they are, so sparsity 0 is the base and 1 the fine-tune, bit for bit)."""
    base, ft = tensors
    mask = selected(_delta(tensors), threshold_bits, quota).reshape(base.shape)
    return torch.where(mask, ft, base)


@operation("sparse_indices")
def sparse_indices(tensors: list, *, threshold_bits: int | None, quota: int = 0):
    """Flat (row-major) indices of the selected entries of ft - base, ascending."""
    return selected(_delta(tensors), threshold_bits, quota).nonzero().reshape(-1)


@operation("sparse_values")
def sparse_values(tensors: list, *, threshold_bits: int | None, quota: int = 0):
    """ft - base at the selected entries, in index order (in the compute dtype; the plan casts)."""
    delta = _delta(tensors).reshape(-1)
    return delta[selected(delta, threshold_bits, quota)]


@operation("mask_bits")
def mask_bits(tensors: list, *, threshold_bits: int | None, quota: int = 0):
    """The selection as packed bits, little-endian within each byte (numpy ``packbits(bitorder="little")``)."""
    mask = selected(_delta(tensors), threshold_bits, quota).cpu().numpy()
    return torch.from_numpy(np.packbits(mask, bitorder="little"))


@operation("scatter_add")
def scatter_add(tensors: list, *, signs: list[float]):
    """base + sum_j signs[j] * (values_j placed at indices_j); ``tensors`` is
    ``[base, indices_1, values_1, indices_2, values_2, ...]``. Composing sparse fine-tunes is adding them."""
    base = tensors[0]
    out = compute(base).reshape(-1).clone()
    for j, sign in enumerate(signs):
        idx, vals = tensors[1 + 2 * j].reshape(-1).to(torch.int64), compute(tensors[2 + 2 * j]).reshape(-1)
        if idx.numel():
            if idx.min() < 0 or idx.max() >= out.numel():
                raise ValueError(f"sparse indices out of range for a tensor of {out.numel()} entries")
            out.index_add_(0, idx.to(out.device), (vals * sign).to(out.dtype))
    return out.reshape(base.shape)


@operation("add_dense")
def add_dense(tensors: list, *, signs: list[float]):
    """base + sum_j signs[j] * delta_j for dense deltas (fully tuned parts of a sparse fine-tune)."""
    out = compute(tensors[0]).clone()
    for sign, d in zip(signs, tensors[1:]):
        out += compute(d) * sign
    return out
