"""The metrics of "LoRA vs Full Fine-tuning: An Illusion of Equivalence", per matrix of a batch.

* similarity_j = max_i |cos(U0[:, i], Ut[:, j])| for the fine-tune's top-k left singular vectors j,
  i over ALL the base's (thin-SVD) left vectors; j is an intruder at epsilon iff similarity_j < epsilon.
* The effective rank of the update D = W_ft - W_base, Roy & Vetterli (2007): exp(H(p)),
  p_i = s_i / sum(s), H the Shannon entropy in nats; 0 for a zero update.
* The share of ||D||_F^2 inside the base's top-k subspaces: left ||U0k^T D||^2, right ||D V0k||^2 and
  both ||U0k^T D V0k||^2, each over ||D||^2 (None for a zero update).
"""
from __future__ import annotations

import torch

HEAT_COLUMNS = 64  # base vectors kept for the similarity heat map (the top ones)


def similarities(u0: torch.Tensor, ut: torch.Tensor):
    """(b, k) max |cos|, (b, k) argmax index, (b, k, min(r, HEAT_COLUMNS)) |cos| against the top base vectors.

    Both sets of vectors are orthonormal columns, so cosines are plain dot products."""
    cos = (ut.transpose(1, 2) @ u0).abs()  # (b, k, r)
    best, where = cos.max(dim=2)
    return best, where, cos[:, :, :HEAT_COLUMNS]


def intruder_counts(similarity: torch.Tensor, epsilons) -> dict[float, list[int]]:
    """For each epsilon, per matrix, how many of the top-k similarities are below it."""
    return {float(e): (similarity < e).sum(dim=1).tolist() for e in epsilons}


def effective_rank(singular_values: torch.Tensor) -> list[float]:
    """Roy & Vetterli's entropy effective rank of each row of singular values (b, r)."""
    s = singular_values.double()
    total = s.sum(dim=1, keepdim=True)
    p = torch.where(total > 0, s / total.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(s))
    entropy = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(dim=1)
    return [float(torch.exp(h)) if t > 0 else 0.0 for h, t in zip(entropy, total[:, 0])]


def subspace_energy(delta: torch.Tensor, u0k: torch.Tensor, vh0k: torch.Tensor) -> list[dict]:
    """Per matrix: the fractions of the update's squared Frobenius norm in the base's top-k left,
    right and two-sided subspaces (float64)."""
    d = delta.double()
    left = u0k.double().transpose(1, 2) @ d  # (b, k, n)
    total = (d * d).sum(dim=(1, 2))
    e_left = (left * left).sum(dim=(1, 2))
    right = d @ vh0k.double().transpose(1, 2)  # (b, m, k)
    e_right = (right * right).sum(dim=(1, 2))
    both = left @ vh0k.double().transpose(1, 2)
    e_both = (both * both).sum(dim=(1, 2))
    out = []
    for t, l, r, bth in zip(total.tolist(), e_left.tolist(), e_right.tolist(), e_both.tolist()):
        if t > 0:
            out.append({"frobenius_sq": t, "left": l / t, "right": r / t, "both": bth / t})
        else:
            out.append({"frobenius_sq": 0.0, "left": None, "right": None, "both": None})
    return out
