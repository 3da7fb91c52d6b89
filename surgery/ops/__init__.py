"""Per-tensor operations, one module per family, registered in :mod:`surgery.ops.registry`."""
from __future__ import annotations

import importlib

FAMILIES = ("basic", "soup", "task_vectors", "ties", "dare", "sparse", "lora", "low_rank")


def load_all() -> None:
    for family in FAMILIES:
        importlib.import_module(f"{__name__}.{family}")
