"""TIES merging (Yadav et al., 2023): trim each task vector, elect a sign, take the disjoint mean."""
from __future__ import annotations

from .common import compute, torch
from .registry import operation


def keep_count(numel: int, density: float) -> int:
    """How many entries top-k keeps: ``max(1, int(density * numel))``, as mergekit counts."""
    return numel if density >= 1 else max(1, int(density * numel))


def topk_threshold(magnitudes: torch.Tensor, density: float) -> float:
    """The k-th largest of ``magnitudes`` (float32, flat; reordered in place), ``k = keep_count``.

    Entries at least this large are kept, ties at the threshold included, as the TIES reference code
    does (``mask = |tau| >= kth value``). numpy's introselect partition finds it without a sort."""
    n = magnitudes.numel()
    if density >= 1 or n == 0:
        return 0.0
    k = keep_count(n, density)
    arr = magnitudes.numpy()
    arr.partition(n - k)
    return float(arr[n - k])


@operation("trim_threshold", elementwise=True)
def trim_threshold(tensors: list[torch.Tensor], *, threshold: float) -> torch.Tensor:
    """Zero entries whose magnitude is below a threshold found over the whole model (global top-k).

    Magnitudes are compared in float32, the precision the threshold was ranked in."""
    t = compute(tensors[0])
    return torch.where(t.abs().to(torch.float32) >= threshold, t, torch.zeros_like(t))


@operation("sign_consensus_mean", elementwise=True)
def sign_consensus_mean(tensors: list[torch.Tensor], *, weights: list[float]) -> torch.Tensor:
    """Elect a sign per entry from the weighted sum (ties go to +), then average the weighted
    entries that agree with it, dividing by the weight of the agreeing tasks (the disjoint mean).

    Agreement is ``sign(term) * elected > 0``, kept as a 0/1 float mask so that the whole thing is
    multiply-adds: no boolean tensors or ``where`` per task."""
    terms = [compute(t) * w for w, t in zip(weights, tensors)]
    total = terms[0].clone()
    for term in terms[1:]:
        total.add_(term)
    elected = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    merged = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for w, term in zip(weights, terms):
        agree = torch.sign(term).mul_(elected).clamp_(min=0)
        merged.addcmul_(term, agree)
        divisor.add_(agree, alpha=w)
    divisor[divisor == 0] = 1
    return merged.div_(divisor)
