"""Sparse surgery: grafting by a global top-k mask, and sparse fine-tunes (SFTs) as index/value pairs.

Selections come from :func:`surgery.engine.topk.global_topk`: a float32 magnitude threshold plus,
per tensor, how many entries exactly at the threshold it keeps (the first ones in flat order).
"""
from __future__ import annotations

from .common import cat, compute, flat_nonzero, magnitude_bits, map_ranges, torch, where
from .registry import operation


OP_BLOCK = 1 << 18  # entries per step inside an operation: temporaries stay small and reused


def _mask(bits, threshold_bits: int | None, quota: int | None):
    """``(flat bool mask, ties used)``: magnitudes above the threshold, plus the first ``quota``
    entries equal to it (every one for ``None``). Written for torch tensors and numpy arrays alike."""
    if threshold_bits is None:
        return bits < 0, 0  # nothing: magnitudes have no sign bit
    if quota is None:
        return bits >= threshold_bits, 0
    mask = bits > threshold_bits
    if not quota:
        return mask, 0
    ties = flat_nonzero(bits == threshold_bits)[:quota]
    mask[ties] = True
    return mask, len(ties)


def selected(tensors, threshold_bits: int | None, quota: int | None, fn) -> list:
    """``[fn(start, stop, base piece, ft piece, delta piece, mask piece)]`` over the flattened
    ``(base, ft)`` pair, ``OP_BLOCK`` entries at a time, in order. ``quota``: how many entries at
    the threshold to keep, the first ones (``None``: all). When no quota couples the pieces (none or
    all ties kept), numpy pieces are shared out over the cores."""
    base, ft = (t.reshape(-1) for t in tensors)

    def piece(start: int, ties_left: int | None):
        b, f = base[start:start + OP_BLOCK], ft[start:start + OP_BLOCK]
        d = compute(f) - compute(b)
        mask, used = _mask(magnitude_bits(d), threshold_bits, ties_left)
        return used, fn(start, start + len(b), b, f, d, mask)

    if not quota:  # 0 or None: each piece on its own
        def run(lo: int, hi: int) -> list:
            return [piece(start, quota)[1] for start in range(lo, hi, OP_BLOCK)]

        return [part for parts in map_ranges(run, len(base), OP_BLOCK, base) for part in parts]
    parts, remaining = [], quota
    for start in range(0, len(base), OP_BLOCK):
        used, part = piece(start, remaining)
        remaining -= used
        parts.append(part)
    return parts


def tie_quota(kept_ties: int, ties: int) -> int | None:
    """The ``quota`` parameter for a tensor keeping ``kept_ties`` of its ``ties`` entries at the
    threshold: ``None`` when it keeps them all (then its pieces are independent)."""
    return None if ties and kept_ties == ties else kept_ties


@operation("graft_threshold", elementwise=True, numpy=True)
def graft_threshold(tensors: list, *, threshold_bits: int | None, ties: bool = False):
    """The graft of a tensor that keeps none or all of its entries at the threshold (every tensor
    but at most one): elementwise, so it runs block by block on either path."""
    base, ft = tensors
    bits = magnitude_bits(compute(ft) - compute(base)).reshape(base.shape)
    if threshold_bits is None:
        mask = bits < 0  # nothing (magnitudes have no sign bit)
    else:
        mask = (bits >= threshold_bits) if ties else (bits > threshold_bits)
    return where(mask, ft, base)


@operation("graft", numpy=True)
def graft(tensors: list, *, threshold_bits: int | None, quota: int | None = 0):
    """theta = base + gamma * (ft - base) for a 0/1 mask gamma: the fine-tuned entry where selected,
    the base entry elsewhere (taken as they are, so sparsity 0 is the base and 1 the fine-tune, bit for bit)."""
    base = tensors[0]
    parts = selected(tensors, threshold_bits, quota, lambda _s, _e, b, f, _d, mask: where(mask, f, b))
    return cat(parts, base).reshape(base.shape)


@operation("sparse_indices", numpy=True)
def sparse_indices(tensors: list, *, threshold_bits: int | None, quota: int | None = 0):
    """Flat (row-major) indices of the selected entries of ft - base, ascending."""
    parts = selected(tensors, threshold_bits, quota, lambda start, _e, _b, _f, _d, mask: flat_nonzero(mask) + start)
    return cat(parts, flat_nonzero(tensors[0].reshape(-1)[:0]))


@operation("sparse_values", numpy=True)
def sparse_values(tensors: list):
    """ft - base at the given flat indices (``tensors = [base, ft, indices]``), in the compute dtype
    (the plan casts). The indices are ``sparse_indices`` of the same pair: the executor computes
    them once for both outputs, and the values are then a gather of one entry in a hundred."""
    base, ft, idx = tensors
    return compute(ft.reshape(-1)[idx]) - compute(base.reshape(-1)[idx])


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


@operation("apply_mask")
def apply_mask(tensors: list, *, encoding: str):
    """where(mask, ft, base) for a mask-file entry (``tensors = [base, ft, entry]``): the grafted
    tensor for a mask that is not a top-k threshold (a learned mask, or one given by the user)."""
    base, ft, entry = tensors
    n = base.numel()
    if encoding == "indices":
        mask = torch.zeros(n, dtype=torch.bool, device=base.device)
        mask[entry.reshape(-1).to(torch.int64).to(base.device)] = True
    else:
        import numpy as np

        bits = np.unpackbits(entry.reshape(-1).cpu().numpy(), count=n, bitorder="little").astype(bool)
        mask = torch.from_numpy(bits).to(base.device)
    return torch.where(mask.reshape(base.shape), ft, base)
