"""The decompositions the spectral analysis needs, batched over matrices of one shape, on any device.

* The base: the full thin SVD in float32 (``torch.linalg.svd(full_matrices=False)``), as the
  reference code computes it; the intruder test compares against every one of its left vectors.
* The fine-tune: only its top-k singular triplets. ``full`` is the thin SVD; ``randomized`` is a
  block subspace iteration warm-started from the base's top right singular vectors (a fine-tune's
  top directions are mostly near the base's, so they start nearly converged) plus random columns
  (which catch new directions). It stops when an a-posteriori bound says every top-k left vector is
  accurate to ``tol`` (see :func:`topk_svd`), and a matrix that does not get there falls back to the
  full SVD, so a reported result is never an unconverged one.
* The update ``W_ft - W_base``: all its singular values (for the effective rank), as square roots of
  the eigenvalues of its float64 Gram matrix on the smaller side: 2-3x cheaper than ``svdvals`` in
  float32 and about as fine: it resolves singular values down to ``sqrt(r * eps64)`` (1e-7 to 1e-6) of
  the largest, as float32 does to ~1e-7; a smaller one counts as zero.

``COUNTS`` counts the decompositions done, per kind: the cache's tests read it to see that a second
analysis against the same base computes no base SVD.
"""
from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass

import torch

COUNTS: Counter = Counter()  # matrices decomposed: base_svd, ft_full, ft_randomized, update_spectrum
OVERSAMPLE = 20  # subspace columns beyond k: the iteration converges at rate (s_{k+p+1} / s_j)^2
WARM_COLUMNS = OVERSAMPLE // 2  # of those (and of the k), how many beyond k start from the base's vectors
DEFAULT_TOL = 0.02  # bound on each top-k left vector's error (sine of its angle to the exact one)
MAX_ITERS = 40
METHODS = ("auto", "full", "randomized")
CHECK_EVERY = 2


def counts() -> dict:
    return dict(COUNTS)


def reset_counts() -> None:
    COUNTS.clear()


@dataclass
class TopK:
    """Top-k singular triplets of a batch: ``u`` (b, m, k), ``s`` (b, k), ``vh`` (b, k, n), and per matrix
    how they were found: ``method`` ("full" or "randomized"), ``iterations``, ``error_bound``."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    method: list[str]
    iterations: list[int]
    error_bound: list[float | None]


def full_svd(a: torch.Tensor, kind: str = "base_svd"):
    """Thin SVD of a batch (b, m, n) in float32: U (b, m, r), S (b, r), Vh (b, r, n), r = min(m, n)."""
    COUNTS[kind] += a.shape[0]
    return torch.linalg.svd(a.float(), full_matrices=False)


def randomized_pays(shape: tuple[int, int], k: int) -> bool:
    """Subspace iteration beats the full SVD only when the subspace is a small part of the matrix."""
    return min(shape) >= 4 * (k + OVERSAMPLE)


def topk_svd(a: torch.Tensor, k: int, method: str = "auto", warm: torch.Tensor | None = None,
             tol: float = DEFAULT_TOL, seed: str = "") -> TopK:
    """Top-k singular triplets of each matrix of the batch ``a`` (b, m, n).

    ``method``: ``full``, ``randomized`` or ``auto`` (randomized where :func:`randomized_pays`).
    ``warm`` (b, >=k, n): rows that start the iteration (the base's top right singular vectors).

    The bound: after Rayleigh-Ritz, ``A^T u_j = s_j v_j`` holds exactly, and the residual
    ``r_j = ||A v_j - s_j u_j||`` over the gap ``g_j`` between ``s_j`` and its nearest other Ritz value
    bounds the sine of the angle between ``u_j`` and the exact singular vector (Wedin's theorem, with the
    Ritz values standing in for the exact ones), hence also how far each similarity ``|cos|`` can be off.
    """
    if method not in METHODS:
        from ..errors import PlanError

        raise PlanError(f"unknown fine-tune SVD method {method!r}; use {', '.join(METHODS)}")
    a = a.float()
    b, m, n = a.shape
    r = min(m, n)
    k = min(k, r)
    q = min(r, k + OVERSAMPLE)
    if method == "full" or q >= r or (method == "auto" and not randomized_pays((m, n), k)):
        return _full_topk(a, k)
    u, s, vh, iters, bound = _subspace_iteration(a, k, q, warm, tol, seed)
    COUNTS["ft_randomized"] += b
    out = TopK(u, s, vh, ["randomized"] * b, iters, bound)
    failed = [i for i, e in enumerate(bound) if not e <= tol]
    if failed:  # never report an unconverged result: those matrices get the exact decomposition
        exact = _full_topk(a[failed], k)
        for j, i in enumerate(failed):
            out.u[i], out.s[i], out.vh[i] = exact.u[j], exact.s[j], exact.vh[j]
            out.method[i] = f"full (randomized bound {bound[i]:.3g} > {tol} after {iters[i]} iterations)"
            out.error_bound[i] = None
    return out


def _full_topk(a: torch.Tensor, k: int) -> TopK:
    u, s, vh = full_svd(a, "ft_full")
    b = a.shape[0]
    return TopK(u[:, :, :k].contiguous(), s[:, :k].contiguous(), vh[:, :k].contiguous(), ["full"] * b, [0] * b,
                [None] * b)


def _subspace_iteration(a, k, q, warm, tol, seed):
    """Per matrix: iterate until its own bound is met (converged matrices leave the batch) or MAX_ITERS."""
    b, m, n = a.shape
    gen = torch.Generator(device=a.device).manual_seed(zlib.crc32(seed.encode()))
    x = torch.randn(b, n, q, generator=gen, device=a.device, dtype=a.dtype)
    if warm is not None:
        w = min(warm.shape[1], k + WARM_COLUMNS, q)
        x[:, :, :w] = warm[:, :w].transpose(1, 2).to(a.dtype)
    u = torch.empty(b, m, k, device=a.device, dtype=a.dtype)
    s = torch.empty(b, k, device=a.device, dtype=a.dtype)
    vh = torch.empty(b, k, n, device=a.device, dtype=a.dtype)
    iters, bounds = [0] * b, [float("inf")] * b
    active = list(range(b))
    sub = a
    qm = torch.linalg.qr(sub @ x).Q
    done_iters = 0
    while True:
        u_a, s_a, vh_a, bound = _rayleigh_ritz(sub, qm, k)
        idx = torch.tensor(active, device=a.device)
        u[idx], s[idx], vh[idx] = u_a, s_a, vh_a
        keep = []
        for j, (i, e) in enumerate(zip(active, bound.tolist())):
            bounds[i], iters[i] = e, done_iters
            if not bounds[i] <= tol:
                keep.append(j)
        if not keep or done_iters >= MAX_ITERS:
            return u, s, vh, iters, bounds
        if len(keep) < len(active):  # only the unconverged ones go on
            active = [active[j] for j in keep]
            sub, qm = a[active], qm[keep]
        at = sub.transpose(1, 2)
        for _ in range(CHECK_EVERY):
            qm = torch.linalg.qr(sub @ torch.linalg.qr(at @ qm).Q).Q
        done_iters += CHECK_EVERY


def _rayleigh_ritz(a, qm, k):
    """Best top-k triplets within span(qm), and each matrix's largest bound ``r_j / g_j`` over j < k."""
    small = qm.transpose(1, 2) @ a  # (b, q, n)
    ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = qm @ ub
    u, s, vh = u[:, :, :k], s[:, :k + 1], vh[:, :k]
    residual = torch.linalg.vector_norm(a @ vh.transpose(1, 2) - u * s[:, None, :k], dim=1)  # (b, k)
    below = s[:, :k] - s[:, 1:k + 1]
    above = torch.cat([torch.full_like(s[:, :1], float("inf")), s[:, :k - 1] - s[:, 1:k]], dim=1)
    gap = torch.minimum(below, above)
    bound = torch.where(residual == 0, torch.zeros_like(residual), residual / gap).amax(dim=1)
    return u.contiguous(), s[:, :k].contiguous(), vh.contiguous(), torch.nan_to_num(bound, nan=float("inf"))


def update_singular_values(delta: torch.Tensor) -> torch.Tensor:
    """All singular values of each update (b, m, n), descending, float64: ``sqrt(eig(D D^T))`` on the
    smaller side. Eigenvalues below ``r * eps64 * largest`` are below what float64 resolves (rounding
    noise, e.g. of an exactly low-rank update) and are set to zero."""
    COUNTS["update_spectrum"] += delta.shape[0]
    d = delta.double()
    gram = d @ d.transpose(1, 2) if d.shape[1] <= d.shape[2] else d.transpose(1, 2) @ d
    ev = torch.linalg.eigvalsh(gram).flip(-1)
    floor = ev[:, :1].clamp(min=0) * (gram.shape[-1] * torch.finfo(torch.float64).eps)
    ev = torch.where(ev > floor, ev, torch.zeros_like(ev))
    return ev.sqrt()
