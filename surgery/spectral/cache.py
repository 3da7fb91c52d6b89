"""The base's SVDs on disk, so comparing many fine-tunes against one base decomposes it once.

One small safetensors file per matrix, named by a key over the cache format, the tensor's name,
shape, dtype and the sha256 of its bytes: the same per-tensor digest that
:func:`surgery.recipes.run.checkpoint_content_hash` combines into a checkpoint's content hash, taken
while the matrix is streamed in anyway (the analysis needs the base's weights for the update). A
base that changes gets new keys for exactly the matrices that changed, so a stale entry is never
read; keying per matrix rather than by the whole checkpoint's hash also means no extra pass over
the base before the analysis can start.

Stored in float32: ``U`` (m, r) whole (the intruder test compares against every base left vector),
``S`` (r) whole, and the top rows of ``Vh`` (enough to warm-start the fine-tune's top-k and to
project onto the base's top-k right subspace). An entry with too few ``Vh`` rows for the ``k`` asked
counts as a miss and is replaced.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import torch

FORMAT = "surgery-spectral-svd-1"
STORED_DTYPE = "float32"
MIN_VH_ROWS = 64


def default_cache_dir() -> Path:
    """``$SURGERY_CACHE_DIR/spectral``, else ``$XDG_CACHE_HOME/surgery/spectral``, else ``~/.cache/surgery/spectral``."""
    if os.environ.get("SURGERY_CACHE_DIR"):
        return Path(os.environ["SURGERY_CACHE_DIR"]) / "spectral"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "surgery" / "spectral"


def entry_key(name: str, shape, dtype: str, sha256: str) -> str:
    return hashlib.sha256(f"{FORMAT}\n{name}\n{list(shape)}\n{dtype}\n{sha256}".encode()).hexdigest()


def vh_rows_needed(k: int, rank: int) -> int:
    from .svd import OVERSAMPLE

    return min(rank, k + OVERSAMPLE)


class SVDCache:
    """``get(key, rows)`` -> (U, S, Vh_top) or None; ``put(key, U, S, Vh)``. ``folder=None``: memory only
    (nothing is kept beyond the run)."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder).expanduser() if folder is not None else None
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str, rows: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.folder is None or not self._path(key).exists():
            self.misses += 1
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data = load_file(str(self._path(key)), device=str(device))
        except (SafetensorError, OSError, RuntimeError):  # a damaged entry is recomputed, not trusted
            self.misses += 1
            return None
        if data["vh"].shape[0] < rows:
            self.misses += 1
            return None
        self.hits += 1
        return data["u"], data["s"], data["vh"]

    def put(self, key: str, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, meta: dict) -> None:
        if self.folder is None:
            return
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        tensors = {"u": u.float().contiguous().cpu(), "s": s.float().contiguous().cpu(),
                   "vh": vh.float().contiguous().cpu()}
        save_file(tensors, str(tmp), metadata={"format": FORMAT, **{k: str(v) for k, v in meta.items()}})
        os.replace(tmp, path)  # readers see a whole entry or none
