"""``surgery verify``: re-check an output against the files that record how it was made.

Without inputs: every shard's sha256 matches the one recorded in ``surgery_recipe.json``, no shard is
missing or unrecorded, every shard's header is consistent with its size, the index names every stored
tensor in the shard that holds it (no missing or extra tensors, the right ``total_size``), and the
config is there. With ``rerun``: the stored plan (``surgery_plan.json``) is run again from the inputs
(at their recorded locations, a Hub input at its recorded commit, or remapped) into a temporary folder
next to the output; the inputs' content hashes (computed in that same pass) must match the recorded
ones, and every shard must come out byte for byte the same.
"""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .card import PLAN_FILE, RECIPE_FILE, file_sha256
from .errors import SurgeryError

INDEX_FILE = "model.safetensors.index.json"


class VerifyError(SurgeryError):
    """The output folder cannot be verified at all (not a surgery output, unreadable records)."""


@dataclass
class VerifyResult:
    folder: Path
    shards: int = 0
    tensors: int = 0
    total_size: int = 0
    rerun: bool = False
    inputs_checked: int = 0
    problems: list[str] = field(default_factory=list)  # one line each, naming the file and tensor

    @property
    def ok(self) -> bool:
        return not self.problems


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise ValueError(f"header length {n} exceeds the file")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end != size:
        raise ValueError(f"file is {size} bytes, its header describes {8 + n + end}")
    return header


def _tensor_bytes(entry: dict) -> int:
    start, end = entry["data_offsets"]
    return end - start


def check_files(folder: Path, record: dict, result: VerifyResult) -> dict[str, dict]:
    """Shard hashes, headers, index and config; returns each readable shard's header."""
    bad = result.problems.append
    recorded = record.get("outputs")
    present = sorted(p.name for p in folder.glob("*.safetensors"))
    if recorded is None:
        bad(f"{folder / RECIPE_FILE}: records no output hashes (written by an older surgery)")
        recorded = {}
    for name in sorted(recorded):
        if name not in present:
            bad(f"{folder / name}: recorded shard is missing")
    for name in present:
        if name not in recorded and record.get("outputs") is not None:
            bad(f"{folder / name}: shard not recorded in {RECIPE_FILE}")
        elif name in recorded:
            got = file_sha256(folder / name)
            if got != recorded[name]:
                bad(f"{folder / name}: sha256 {got} does not match the recorded {recorded[name]}")
    headers = {}
    for name in present:
        try:
            headers[name] = _header(folder / name)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            bad(f"{folder / name}: unreadable safetensors header: {e}")
    result.shards = len(present)
    result.tensors = sum(len(h) for h in headers.values())
    result.total_size = sum(_tensor_bytes(t) for h in headers.values() for t in h.values())
    index_path = folder / INDEX_FILE
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            weight_map = dict(index["weight_map"])
        except (ValueError, KeyError, TypeError) as e:
            bad(f"{index_path}: unreadable index: {e}")
            weight_map = None
        if weight_map is not None:
            for tensor, shard in weight_map.items():
                if shard not in present:
                    bad(f"{index_path}: tensor {tensor!r} is listed in {shard}, which does not exist")
                elif shard in headers and tensor not in headers[shard]:
                    bad(f"{index_path}: tensor {tensor!r} is listed in {shard}, which does not hold it")
            for shard, header in headers.items():
                for tensor in header:
                    if weight_map.get(tensor) != shard:
                        where = weight_map.get(tensor)
                        bad(f"{folder / shard}: tensor {tensor!r} is " +
                            ("not in the index" if where is None else f"listed in {where} by the index"))
            total = (index.get("metadata") or {}).get("total_size")
            if total is not None and total != result.total_size:
                bad(f"{index_path}: total_size {total} does not match the shards' {result.total_size} bytes")
    elif len(present) > 1:
        bad(f"{index_path}: missing, and the folder holds {len(present)} shards")
    elif not present:
        bad(f"{folder}: holds no .safetensors file")
    operation = (record.get("recipe") or {}).get("operation")
    if operation != "diff" and not (folder / "config.json").exists():
        bad(f"{folder / 'config.json'}: missing")
    return headers


def _remap(plan_inputs: list[str], record: dict, remap: dict[str, str]) -> list[str]:
    """Where to find each input now: remapped, a Hub input at its recorded commit, or as recorded."""
    described = record.get("inputs") or []
    out = []
    for i, source in enumerate(plan_inputs):
        if source in remap:
            out.append(remap[source])
            continue
        entry = described[i] if i < len(described) else {}
        if entry.get("hub_id") and entry.get("revision"):
            out.append(f"{entry['hub_id']}@{entry['revision']}")
        else:
            out.append(source)
    return out


def rerun_check(folder: Path, record: dict, result: VerifyResult, remap: dict[str, str], device: str) -> None:
    from .engine.executor import execute
    from .engine.plan import Plan
    from .io.checkpoint import open_checkpoint
    from .io.writer import SHARD_SHA256
    from .recipes.run import complete_digests, content_hash

    bad = result.problems.append
    plan_path = folder / PLAN_FILE
    if not plan_path.exists():
        bad(f"{plan_path}: missing; cannot rerun")
        return
    try:
        plan = Plan.from_json(plan_path.read_text())
    except (ValueError, KeyError, TypeError, SurgeryError) as e:
        bad(f"{plan_path}: unreadable plan: {e}")
        return
    unknown = sorted(set(remap) - set(plan.inputs))
    for old in unknown:
        bad(f"--input {old}=...: {old!r} is not an input of {plan_path} (inputs: {', '.join(plan.inputs)})")
    if unknown:
        return
    locations = _remap(plan.inputs, record, remap)
    ckpts = []
    for recorded, where in zip(plan.inputs, locations):
        try:
            ckpts.append(open_checkpoint(where, allow_pickle=plan.allow_pickle))
        except SurgeryError as e:
            bad(f"input {recorded!r} (at {where}): {str(e).splitlines()[0]}; remap it with --input OLD=NEW")
    if len(ckpts) != len(plan.inputs):
        return
    result.rerun = True
    described = record.get("inputs") or []
    hashed = [i for i, c in enumerate(ckpts) if not c.pickled]
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.verify-", dir=folder.parent))
    try:
        digests: dict = {}
        try:
            shards = execute(plan, scratch, checkpoints=ckpts, device=device, digests=digests, hash_inputs=hashed)
        except SurgeryError as e:
            bad(f"rerun of {plan_path} failed: {str(e).splitlines()[0]}")
            return
        complete_digests(ckpts, digests, hashed)
        for i in hashed:
            want = described[i].get("content_sha256") if i < len(described) else None
            if want is None:
                continue
            result.inputs_checked += 1
            got = content_hash(digests, i)
            if got != want:
                bad(f"input {plan.inputs[i]!r} (at {locations[i]}): content sha256 {got} does not match the recorded {want}")
        for shard in shards:
            mine, again = folder / shard.filename, scratch / shard.filename
            if not mine.exists():
                continue  # reported by the file checks
            again_sha = SHARD_SHA256.pop(str(again), None) or file_sha256(again)
            if file_sha256(mine) != again_sha:
                bad(f"{mine}: rerun gives different bytes{_first_difference(mine, again, shard)}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _first_difference(a: Path, b: Path, shard) -> str:
    """`` (first in tensor 'x')``: where two shard files first differ."""
    block = 1 << 20
    offset = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(block), fb.read(block)
            if x != y:
                n = next((k for k in range(min(len(x), len(y))) if x[k] != y[k]), min(len(x), len(y)))
                at = offset + n
                break
            if not x:
                return ""
            offset += len(x)
    start = len(shard.header_bytes())
    if at < start:
        return " (first in the header)"
    for t in shard.tensors:
        start += t.nbytes
        if at < start:
            return f" (first in tensor {t.name!r})"
    return ""


def verify(output, *, rerun: bool = False, inputs: dict[str, str] | None = None, device: str = "auto") -> VerifyResult:
    """Check ``output`` against its recorded hashes, index and config; with ``rerun``, recompute it
    from its plan and inputs (``inputs`` remaps recorded locations: ``{old: new}``) and compare
    bytes. Returns a :class:`VerifyResult` whose ``problems`` list every mismatch, one line each."""
    folder = Path(output)
    recipe_path = folder / RECIPE_FILE
    if not folder.is_dir():
        raise VerifyError(f"{folder}: not a folder")
    if not recipe_path.exists():
        raise VerifyError(f"{recipe_path}: missing; {folder} was not written by surgery")
    try:
        record = json.loads(recipe_path.read_text())
    except ValueError as e:
        raise VerifyError(f"{recipe_path}: unreadable: {e}") from None
    result = VerifyResult(folder)
    check_files(folder, record, result)
    if rerun or inputs:
        rerun_check(folder, record, result, dict(inputs or {}), device)
    return result
