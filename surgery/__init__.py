"""surgery: weight-space model surgery, streamed tensor by tensor.

The public API is loaded lazily so that ``import surgery`` (and the CLI's ``--help``) stays fast:
torch is imported only by the functions that compute.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "soup": "surgery.recipes.soup",
    "greedy_soup": "surgery.recipes.soup",
    "score_command": "surgery.recipes.soup",
    "GreedySoupResult": "surgery.recipes.soup",
    "inspect": "surgery.recipes.inspect",
    "diff": "surgery.recipes.delta",
    "transfer": "surgery.recipes.transfer",
    "merge": "surgery.recipes.merge",
    "lines": "surgery.recipes.merge",
    "TaskVector": "surgery.lazy",
    "open_adapter": "surgery.lora",
    "lora_task_vector": "surgery.lora",
    "LazyModel": "surgery.lazy",
    "open_checkpoint": "surgery.io.checkpoint",
    "Checkpoint": "surgery.io.checkpoint",
    "Plan": "surgery.engine.plan",
    "execute": "surgery.engine.executor",
    "SurgeryError": "surgery.errors",
    "spectral_report": "surgery.spectral",
    "reduce_intruders": "surgery.spectral",
    "SpectralResult": "surgery.spectral",
    "push": "surgery.hub",
    "PushResult": "surgery.hub",
    "verify": "surgery.verify",
    "content_hashing": "surgery.recipes.run",
    "VerifyResult": "surgery.verify",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")
