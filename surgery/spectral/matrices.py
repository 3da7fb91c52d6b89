"""Which matrices the analysis covers, and in which batches they are read."""
from __future__ import annotations

import math
import re
from typing import Sequence

from ..errors import IncompatibleInputsError, PlanError
from ..io.checkpoint import Checkpoint
from ..io.safetensors_header import FLOAT_DTYPES
from ..layers import block_index
from ..lazy import is_vocab_tensor

DEFAULT_BATCH_BYTES = 64 << 20  # float32 bytes of base matrices decomposed together


def select(base: Checkpoint, include: str | Sequence[str] | None = None) -> list[str]:
    """2-D float tensors of ``base``, in file order: those inside numbered blocks that are not
    embeddings, or, with ``include``, those whose name a regex matches (``re.search``)."""
    patterns = [include] if isinstance(include, str) else list(include or ())
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise PlanError(f"--include {p!r} is not a valid regular expression: {e}") from None
    names = []
    for name, info in base.tensors.items():
        if info.dtype not in FLOAT_DTYPES or len(info.shape) != 2 or 0 in info.shape:
            continue
        if compiled:
            if not any(p.search(name) for p in compiled):
                continue
        elif block_index(name) is None or is_vocab_tensor(name):
            continue
        names.append(name)
    if not names:
        raise PlanError(f"no 2-D float matrix of {base.source} is selected "
                        f"(include {patterns or 'matrices inside numbered blocks'})")
    return names


def check_checkpoint(base: Checkpoint, ft: Checkpoint, names: list[str]) -> None:
    """Every selected matrix exists in the fine-tune with the base's shape: all problems at once."""
    problems = []
    for name in names:
        info = ft.resolve(name)
        shape = tuple(base.tensors[name].shape)
        if info is None:
            problems.append(f"matrix {name!r} of {base.source} is not in {ft.source}")
        elif tuple(info.shape) != shape:
            problems.append(f"matrix {name!r} has shape {list(shape)} in {base.source} but {list(info.shape)} in {info.file}")
        elif info.dtype not in FLOAT_DTYPES:
            problems.append(f"matrix {name!r} is {info.dtype} in {info.file}, not a float")
    if problems:
        raise IncompatibleInputsError(problems)


def batches(base: Checkpoint, names: list[str], batch_bytes: int = DEFAULT_BATCH_BYTES) -> list[list[str]]:
    """Names grouped by shape (decomposed together), each group cut to at most ``batch_bytes`` of
    float32 base matrices; groups in the order their first matrix appears."""
    groups: dict[tuple, list[str]] = {}
    for n in names:
        groups.setdefault(tuple(base.tensors[n].shape), []).append(n)
    out = []
    for shape, members in groups.items():
        per = max(1, batch_bytes // (4 * math.prod(shape)))
        out.extend(members[i:i + per] for i in range(0, len(members), per))
    return out
