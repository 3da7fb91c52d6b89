"""Model card and provenance: every output records the command, the recipe, the plan and the inputs
that made it, with content hashes of the inputs and of the output shards.

Files written next to the weights:

* ``README.md``: the model card. YAML front matter for the Hub (``library_name: transformers``,
  ``tags`` with ``surgery`` and the method, ``base_model`` and ``base_model_relation``), then the
  command line (as run, paths as given; a library call shows its recipe instead), the inputs (source,
  Hub revision, content hash), the recipe, the output shards' sha256, and for intruder mitigation a
  summary of the intruders removed.
* ``surgery_recipe.json``: the same facts as data (``surgery verify`` reads it).
* ``surgery_plan.json``: the plan itself (:meth:`Plan.to_json`), so the output can be recomputed.

``base_model`` lists only Hub inputs, by repo id without revision (the Hub validates the field as
model ids; a local path or ``org/name@rev`` there would make the card invalid): revisions (the
snapshot commit) and local inputs are in the body and in the recipe file.

``base_model_relation`` follows the Hub's meanings: ``merge`` when the output combines several
models (soups, task arithmetic, TIES, DARE, LiNeS, fine-tuning transfer); ``finetune`` when it is one
fine-tune of its base, changed in weight space (a merged LoRA adapter, a graft, a sparse fine-tune
applied or reverted, intruder mitigation): the weights are a full model trained from the base, not an
adapter to load on top of it; ``adapter`` is for PEFT adapter repos, which surgery never writes. A
task-vector folder (``diff``) is not a loadable model and gets no relation. See :data:`RELATIONS`.

The card is deterministic: the same inputs and command give the same bytes (no timestamps, no
temporary paths, sorted keys).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .io.checkpoint import HUB_ID, Checkpoint

RECIPE_FILE = "surgery_recipe.json"
PLAN_FILE = "surgery_plan.json"
CARD_FILE = "README.md"

# The command line being run, as given (set by the CLI entry point); None for a library call.
COMMAND: list[str] | None = None

RELATIONS = {
    "soup": "merge", "greedy_soup": "merge", "merge": "merge", "lines": "merge", "transfer": "merge",
    "lora_merge": "finetune", "graft": "finetune", "graft_learned": "finetune", "sft_apply": "finetune",
    "sft_revert": "finetune", "reduce_intruders": "finetune", "diff": None,
}


def relation(operation: str | None) -> str | None:
    """The Hub's ``base_model_relation`` for an operation (``merge`` for any not listed)."""
    return RELATIONS.get(operation or "", "merge")


def fingerprint(ckpt: Checkpoint) -> str:
    """A cheap identity for an input: sha256 over its tensors' names, dtypes, shapes and sizes."""
    h = hashlib.sha256()
    for t in ckpt.tensors.values():
        h.update(f"{t.name}|{t.dtype}|{list(t.shape)}|{t.nbytes}\n".encode())
    return h.hexdigest()


def hub_revision(ckpt: Checkpoint) -> str | None:
    """The snapshot commit of a checkpoint opened from the Hub cache, else None."""
    parts = Path(ckpt.root).parts
    if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
        return parts[parts.index("snapshots") + 1]
    return None


def hub_id(ckpt: Checkpoint) -> str | None:
    """``org/name`` for an input opened from the Hub, else None."""
    source = str(ckpt.source)
    if HUB_ID.match(source) and not source.startswith((".", "/")) and not Path(source).exists() \
            and hub_revision(ckpt) is not None:
        return source.partition("@")[0]
    return None


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def hub_file_sha256(ckpt: Checkpoint) -> dict[str, str]:
    """For an input opened from the Hub cache: the sha256 the Hub publishes for each of its weight
    files (their LFS object ids, which name the cache's blobs), by path in the repo, without reading
    a byte. Files not downloaded (a run that never read them) are left out; empty for local inputs."""
    if hub_revision(ckpt) is None or hub_id(ckpt) is None:
        return {}
    snapshot = Path(ckpt.root)
    out = {}
    for file in ckpt.files:
        path = Path(file)
        blob = os.path.basename(os.readlink(path)) if path.is_symlink() else ""
        if _SHA256_HEX.match(blob):
            out[path.relative_to(snapshot).as_posix() if path.is_relative_to(snapshot) else path.name] = blob
    return dict(sorted(out.items()))


def describe_input(ckpt: Checkpoint, content_sha256: str | None = None) -> dict:
    entry = {"source": str(ckpt.source), "tensors": len(ckpt.tensors), "parameters": ckpt.num_parameters,
             "header_sha256": fingerprint(ckpt)}
    repo = hub_id(ckpt)
    if repo is not None:
        entry["hub_id"] = repo
    revision = hub_revision(ckpt)
    if revision is not None:
        entry["revision"] = revision
    if content_sha256 is not None:
        entry["content_sha256"] = content_sha256
    files = hub_file_sha256(ckpt)
    if files:
        entry["hub_file_sha256"] = files
    return entry


def file_sha256(path: Path, block: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def shard_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every ``.safetensors`` file in ``folder``, by file name."""
    return {p.name: file_sha256(p) for p in sorted(Path(folder).glob("*.safetensors"))}


_PLAIN = re.compile(r"^[A-Za-z][\w./-]*$")  # a YAML plain scalar that reads back as this string


def _yaml_scalar(value: str) -> str:
    plain = _PLAIN.match(value) and value.lower() not in ("yes", "no", "on", "off", "true", "false", "null", "y", "n")
    return value if plain else json.dumps(value)  # a JSON string is a valid YAML scalar


def _yaml_list(key: str, values: list[str]) -> list[str]:
    return [f"{key}:"] + [f"- {_yaml_scalar(v)}" for v in values]


def front_matter(operation: str | None, tags: list[str], hub_ids: list[str]) -> list[str]:
    front = ["---", "library_name: transformers"]
    method = (operation or "").replace("_", "-")
    all_tags = list(dict.fromkeys(["surgery", *([method] if method else []), *tags]))
    front += _yaml_list("tags", all_tags)
    if hub_ids:
        front += _yaml_list("base_model", list(dict.fromkeys(hub_ids)))
        rel = relation(operation)
        if rel is not None:
            front.append(f"base_model_relation: {rel}")
    front.append("---")
    return front


def _hub_files(inputs: list[dict]) -> list[str]:
    listed = [(i, e) for i, e in enumerate(inputs) if e.get("hub_file_sha256")]
    if not listed:
        return []
    rows = ["Weight files of the Hub inputs, with the sha256 the Hub publishes for them (their LFS object ids):", "",
            "| # | file | sha256 |", "|---|---|---|"]
    for i, e in listed:
        rows += [f"| {i} | `{name}` | `{sha}` |" for name, sha in e["hub_file_sha256"].items()]
    return rows + [""]


def _intruder_summary(recipe: dict) -> list[str]:
    corrected = recipe.get("corrected")
    if recipe.get("operation") != "reduce_intruders" or not isinstance(corrected, dict):
        return []
    rows = ["## Intruder dimensions", "",
            f"At the headline epsilon {recipe.get('epsilon')} (top {recipe.get('top_k')} singular vectors), "
            f"scaled by lambda {recipe.get('lambda')}:", "",
            "| fine-tune | epsilon | intruders | matrices corrected |", "|---|---|---|---|",
            f"| `{recipe.get('ft')}` | {recipe.get('epsilon')} | {sum(corrected.values())} | {len(corrected)} |", ""]
    if corrected:
        rows += ["| matrix | intruders |", "|---|---|"] + [f"| `{n}` | {c} |" for n, c in sorted(corrected.items())] + [""]
    return rows


def write_card(folder: Path, recipe: dict, ckpts: list[Checkpoint], tags: list[str], title: str, *,
               content_hashes: dict[int, str] | None = None, shards: dict[str, str] | None = None,
               inputs: list[dict] | None = None) -> dict:
    """Write ``README.md`` and ``surgery_recipe.json`` into ``folder``; returns the record.

    ``content_hashes[i]`` is input ``i``'s content hash (see :func:`surgery.recipes.run.content_hash`);
    ``shards`` the output files' sha256 (default: hashed here from ``folder``); ``inputs`` replaces
    the input descriptions (a greedy soup passes its final candidate's)."""
    from . import __version__

    folder = Path(folder)
    hashes = content_hashes or {}
    if inputs is None:
        inputs = [describe_input(c, hashes.get(i)) for i, c in enumerate(ckpts)]
    if shards is None:
        shards = shard_hashes(folder)
    command = list(COMMAND) if COMMAND is not None else None
    record = {"surgery_version": __version__, "command": command, "recipe": recipe, "inputs": inputs,
              "outputs": dict(sorted(shards.items()))}
    (folder / RECIPE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    hub_ids = [e["hub_id"] for e in inputs if e.get("hub_id")]
    operation = recipe.get("operation")
    front = front_matter(operation, list(tags), hub_ids)

    def cell(v) -> str:
        return f"`{v}`" if v else "-"

    rows = [f"| {i} | `{e['source']}` | {cell(e.get('revision'))} | {e['parameters']:,} | {cell(e.get('content_sha256'))} "
            f"| `{e['header_sha256'][:16]}` |" for i, e in enumerate(inputs)]
    if command is not None:
        import shlex

        how = ["## Command", "", "```bash", shlex.join(command), "```", ""]
    else:
        how = ["## Command", "", f"A library call: `surgery.{operation or '?'}` with the recipe below.", ""]
    body = [
        f"# {title}",
        "",
        f"Made with surgery {__version__}, operation `{operation or '?'}`, without training.",
        "",
        *how,
        "## Inputs",
        "",
        "Content hash: sha256 over the sorted `name<TAB>sha256(tensor bytes)` lines of every stored tensor "
        "(the same however a checkpoint is sharded; recorded when the run asks for it with `--content-hash`). "
        "Header: sha256 over every tensor's name, dtype, shape and size.",
        "",
        "| # | source | revision | parameters | content sha256 | header sha256 |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        *_hub_files(inputs),
        *_intruder_summary(recipe),
        "## Recipe",
        "",
        "```json",
        json.dumps(recipe, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "## Output files",
        "",
        "| file | sha256 |",
        "|---|---|",
        *[f"| `{name}` | `{digest}` |" for name, digest in sorted(shards.items())],
        "",
        f"`surgery verify <this folder>` checks these hashes and the index; `--rerun` recomputes the weights "
        f"from `{PLAN_FILE}`.",
        "",
    ]
    (folder / CARD_FILE).write_text("\n".join(front + [""] + body))
    return record
