"""TIES merging (Yadav et al., 2023): trim each task vector, elect a sign, take the disjoint mean."""
from __future__ import annotations

import torch

from .common import compute
from .registry import operation


def keep_count(numel: int, density: float) -> int:
    """How many entries top-k keeps: ``max(1, int(density * numel))``, as mergekit counts."""
    return numel if density >= 1 else max(1, int(density * numel))


@operation("trim_topk")
def trim_topk(tensors: list[torch.Tensor], *, density: float) -> torch.Tensor:
    """Zero all but the largest-magnitude ``density`` fraction of this one tensor.

    Keeps every entry whose magnitude is at least the k-th largest (ties at the threshold are kept),
    found with ``kthvalue`` rather than a full sort.
    """
    t = compute(tensors[0])
    if density >= 1 or t.numel() == 0:
        return t
    if density <= 0:
        return torch.zeros_like(t)
    k = keep_count(t.numel(), density)
    mag = t.abs().reshape(-1)
    threshold = torch.kthvalue(mag, t.numel() - k + 1).values
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


@operation("trim_threshold", elementwise=True)
def trim_threshold(tensors: list[torch.Tensor], *, threshold: float) -> torch.Tensor:
    """Zero entries whose magnitude is below a threshold found over the whole model (global top-k).

    Magnitudes are compared in float32, the precision the threshold was ranked in."""
    t = compute(tensors[0])
    return torch.where(t.abs().to(torch.float32) >= threshold, t, torch.zeros_like(t))


@operation("sign_consensus_mean", elementwise=True)
def sign_consensus_mean(tensors: list[torch.Tensor], *, weights: list[float]) -> torch.Tensor:
    """Elect a sign per entry from the weighted sum (ties go to +), then average the weighted
    entries that agree with it, dividing by the weight of the agreeing tasks (the disjoint mean)."""
    total = None
    for w, t in zip(weights, tensors):
        term = compute(t) * w
        total = term if total is None else total.add_(term)
    elected = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    merged = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for w, t in zip(weights, tensors):
        term = compute(t) * w
        agree = torch.sign(term) == elected
        merged.add_(torch.where(agree, term, 0.0))
        divisor.add_(torch.where(agree, w, 0.0))
    divisor[divisor == 0] = 1
    return merged / divisor
