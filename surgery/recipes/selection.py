"""Choosing which tensors a sparse method works on, and how many entries it keeps."""
from __future__ import annotations

import math
import re
from typing import Sequence

from ..errors import PlanError
from ..io.checkpoint import Checkpoint
from ..io.safetensors_header import FLOAT_DTYPES
from ..layers import block_index


def candidates(base: Checkpoint, ft: Checkpoint, include: Sequence[str] = (), exclude: Sequence[str] = (),
               default_blocks_only: bool = True) -> list[str]:
    """Float tensors of ``ft`` present in ``base`` with the same shape, in ``ft``'s order, chosen by
    regexes (``re.search`` on the name). Without ``include``: those inside numbered residual blocks
    when ``default_blocks_only`` (embeddings, final norm and heads left out, as the grafting paper
    does), else all. ``exclude`` then removes names."""
    inc = [_compile(p, "--include") for p in include]
    exc = [_compile(p, "--exclude") for p in exclude]
    chosen = []
    for name, info in ft.tensors.items():
        other = base.resolve(name)
        if other is None or info.dtype not in FLOAT_DTYPES or other.dtype not in FLOAT_DTYPES or \
                tuple(other.shape) != tuple(info.shape):
            continue
        if inc:
            if not any(p.search(name) for p in inc):
                continue
        elif default_blocks_only and block_index(name) is None:
            continue
        if any(p.search(name) for p in exc):
            continue
        chosen.append(name)
    if not chosen:
        raise PlanError(f"no tensor of {ft.source} is selected (float, same shape in {base.source}, "
                        f"matching include {list(include) or 'inside numbered blocks'} and not exclude {list(exclude)})")
    return chosen


def keep_count(total: int, fraction: float | None = None, k: int | None = None) -> int:
    """Entries to keep out of ``total``: ``k`` itself, or ``round(fraction * total)``."""
    if (fraction is None) == (k is None):
        raise PlanError("give exactly one of a fraction (--sparsity / --density) and --k")
    if k is not None:
        if k < 0 or k > total:
            raise PlanError(f"--k {k} is outside 0..{total} (the selected entries)")
        return int(k)
    if not 0.0 <= fraction <= 1.0:
        raise PlanError(f"fraction {fraction} is outside [0, 1]")
    return min(total, int(round(fraction * total)))


def numel(ckpt: Checkpoint, name: str) -> int:
    return math.prod(ckpt.resolve(name).shape)


def _compile(pattern: str, flag: str):
    try:
        return re.compile(pattern)
    except re.error as e:
        raise PlanError(f"{flag} {pattern!r} is not a valid regular expression: {e}") from None
