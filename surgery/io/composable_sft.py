"""Reading composable-sft's ``pytorch_diff.bin`` (a pickle: only with --allow-pickle, weights_only).

Layout: ``{"diffs": {name: {"size", "index_steps", "values"}}, "abs": {name: dense tensor}}`` (older
files: ``"body"`` and ``"head"``). ``index_steps`` delta-encodes ascending flat indices whose first
dimension varies fastest (the encoder multiplies coordinates by ``cumprod([1] + size[:-1])``):
indices are its running sum. Their own decoder takes coordinate d modulo the product of the first
d+1 sizes instead of modulo size d, which is only right for tensors of rank 1 and 2; here
coordinates come from ``numpy.unravel_index(order="F")`` and are re-flattened row-major.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CheckpointError

DIFF_FILE = "pytorch_diff.bin"


def find(path) -> Path | None:
    """The pytorch_diff.bin that ``path`` names (the file, or a folder holding it), or None."""
    p = Path(path)
    if p.is_dir() and (p / DIFF_FILE).is_file():
        return p / DIFF_FILE
    if p.is_file() and p.suffix == ".bin":
        return p
    return None


def _load(path: Path) -> dict:
    import torch

    safe = [np.dtype, type(np.dtype(np.int64)), type(np.dtype(np.int32))]
    try:
        from numpy.core.multiarray import scalar  # numpy scalars pickle through this
    except ImportError:  # pragma: no cover
        from numpy._core.multiarray import scalar
    safe.append(scalar)
    try:
        with torch.serialization.safe_globals(safe):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load composable-sft file with weights_only=True: {e}", file=str(path)) from e
    if not isinstance(data, dict):
        raise CheckpointError("not a composable-sft file (not a dict)", file=str(path))
    return data


def read(path) -> tuple[dict[str, tuple[tuple[int, ...], np.ndarray, object]], dict[str, object]]:
    """``(sparse, absolute)``: per name ``(shape, row-major flat int64 indices ascending, values as a
    torch tensor in index order)``, and the dense tensors."""
    import torch

    path = Path(path)
    data = _load(path)
    diffs = data.get("diffs", data.get("body"))
    absolute = data.get("abs", data.get("head")) or {}
    if diffs is None:
        raise CheckpointError("not a composable-sft file (no 'diffs' or 'body')", file=str(path))
    sparse = {}
    for name, enc in diffs.items():
        try:
            size = tuple(int(s) for s in enc["size"])
            steps = np.asarray([int(s) for s in enc["index_steps"]], dtype=np.int64)
            values = torch.as_tensor(enc["values"]).detach().cpu().reshape(-1)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"bad sparse encoding: {e}", file=str(path), tensor=name) from e
        fortran = np.cumsum(steps)
        numel = int(np.prod(size, dtype=np.int64))
        if fortran.size != values.numel() or (fortran.size and (fortran[0] < 0 or fortran[-1] >= numel
                                                             or np.any(steps[1:] <= 0))):
            raise CheckpointError(f"bad sparse encoding: {fortran.size} indices for {values.numel()} values "
                                  f"in a tensor of {numel}", file=str(path), tensor=name)
        flat = np.ravel_multi_index(np.unravel_index(fortran, size, order="F"), size) if size else fortran
        order = np.argsort(flat, kind="stable")
        sparse[name] = (size, flat[order].astype(np.int64), values[torch.from_numpy(order)])
    return sparse, {name: torch.as_tensor(t).detach().cpu() for name, t in absolute.items()}
