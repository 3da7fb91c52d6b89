"""Helpers shared by operations."""
from __future__ import annotations

import torch


def compute(t: torch.Tensor) -> torch.Tensor:
    """The tensor in the compute dtype: float32, or float64 when the input already is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
