"""Model card and provenance: every output records the recipe and the inputs that made it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .io.checkpoint import HUB_ID, Checkpoint

RECIPE_FILE = "surgery_recipe.json"


def fingerprint(ckpt: Checkpoint) -> str:
    """A cheap identity for an input: sha256 over its tensors' names, dtypes, shapes and file sizes.

    Hashing every weight byte of a large model would cost a full extra read; this catches a
    different or re-saved checkpoint, which is what a recipe needs to record.
    """
    h = hashlib.sha256()
    for t in ckpt.tensors.values():
        h.update(f"{t.name}|{t.dtype}|{list(t.shape)}|{t.nbytes}\n".encode())
    return h.hexdigest()


def describe_input(ckpt: Checkpoint) -> dict:
    entry = {"source": ckpt.source, "tensors": len(ckpt.tensors), "parameters": ckpt.num_parameters,
             "header_sha256": fingerprint(ckpt)}
    parts = Path(ckpt.root).parts
    if "snapshots" in parts:  # a Hub cache snapshot: its folder name is the commit
        entry["revision"] = parts[parts.index("snapshots") + 1]
    return entry


def write_card(folder: Path, recipe: dict, ckpts: list[Checkpoint], tags: list[str], title: str) -> None:
    from . import __version__

    inputs = [describe_input(c) for c in ckpts]
    record = {"surgery_version": __version__, "recipe": recipe, "inputs": inputs}
    (folder / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    hub_ids = [c.source.partition("@")[0] for c in ckpts if HUB_ID.match(c.source) and not Path(c.source).exists()]
    front = ["---", "library_name: transformers", "tags:"] + [f"- {t}" for t in ["surgery", *tags]]
    if hub_ids:
        front += ["base_model:"] + [f"- {h}" for h in hub_ids] + ["base_model_relation: merge"]
    front.append("---")
    rows = [f"| {i} | `{e['source']}` | {e['parameters']:,} | `{e['header_sha256'][:16]}` |" for i, e in enumerate(inputs)]
    body = [
        f"# {title}",
        "",
        f"Made with surgery {__version__}, operation `{recipe.get('operation', '?')}`, without training.",
        "",
        "## Inputs",
        "",
        "| # | source | parameters | header sha256 |",
        "|---|---|---|---|",
        *rows,
        "",
        "## Recipe",
        "",
        "```json",
        json.dumps(recipe, indent=2),
        "```",
        "",
    ]
    (folder / "README.md").write_text("\n".join(front + [""] + body))
