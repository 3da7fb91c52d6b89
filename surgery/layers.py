"""Which residual block a tensor belongs to, from its name and the config, for any architecture.

A block is the first path component pair ``<container>.<index>`` with a known container name
(``layers``, ``layer``, ``h``, ``blocks``, ``block``, ``resblocks``), matched as whole components:
``model.layers.1.mlp`` is block 1 and ``model.layers.10.experts.1.w1`` is block 10. Models with
several stacks (CLIP's text and vision towers) get one numbering per stack, each with its own depth.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PlanError

CONTAINERS = ("layers", "layer", "h", "blocks", "block", "resblocks")
_BLOCK = re.compile(r"(?:^|\.)(" + "|".join(CONTAINERS) + r")\.(\d+)(?=\.|$)")
_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class Block:
    stack: str  # the name up to and including the container, e.g. "model.layers"
    index: int
    depth: int  # blocks in that stack


def block_index(name: str) -> tuple[str, int] | None:
    m = _BLOCK.search(name)
    if m is None:
        return None
    return name[: m.end(1)], int(m.group(2))


def _config_depth(stack: str, config: dict | None) -> int | None:
    if not config:
        return None
    for sub in ("text_config", "vision_config", "encoder", "decoder"):
        key = sub.split("_")[0]
        if isinstance(config.get(sub), dict) and key in stack.split(".")[0]:
            return _config_depth(stack, config[sub])
    for key in _DEPTH_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return None


def blocks(names, config: dict | None = None) -> dict[str, Block]:
    """Map every tensor name inside a residual block to its :class:`Block`.

    Depth comes from the config where it names one for that stack, else from the highest index seen.
    A config depth that the names contradict is an error, not a guess.
    """
    found = {n: b for n in names if (b := block_index(n)) is not None}
    highest: dict[str, int] = {}
    for stack, index in found.values():
        highest[stack] = max(highest.get(stack, -1), index)
    depth = {}
    for stack, top in highest.items():
        configured = _config_depth(stack, config)
        if configured is not None and top >= configured:
            raise PlanError(f"tensor names reach block {top} of {stack} but the config says {configured} layers")
        depth[stack] = configured if configured is not None else top + 1
    return {n: Block(stack, index, depth[stack]) for n, (stack, index) in found.items()}


def lines_lambda(block: Block | None, alpha: float, beta: float) -> float:
    """LiNeS: alpha + beta * l / (L - 1) for block l of L; alpha outside the blocks."""
    if block is None or block.depth <= 1:
        return alpha
    return alpha + beta * block.index / (block.depth - 1)
