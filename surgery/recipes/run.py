"""Run a plan into an output folder: validate the output, stream the tensors, add sidecars and a card."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

from ..card import write_card
from ..engine.executor import ProgressCallback, execute
from ..engine.plan import Plan
from ..errors import PlanError
from ..io.checkpoint import Checkpoint
from ..io.output import OutputFile, OutputFolder, check_output, copy_sidecars, copy_tokenizer
from ..io.writer import write_index

DTYPE_NAMES = {
    "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "f16": "F16", "float16": "F16", "half": "F16",
    "fp32": "F32", "f32": "F32", "float32": "F32", "float": "F32", "fp64": "F64", "f64": "F64", "float64": "F64",
}
CONFIG_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def parse_dtype(dtype: str | None) -> str | None:
    """A user's dtype name (``bf16``, ``float16``...) as a safetensors code, or None for "as the inputs"."""
    if dtype is None:
        return None
    code = DTYPE_NAMES.get(str(dtype).lower().removeprefix("torch."))
    if code is None:
        raise PlanError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32, fp64")
    return code


def sidecar_source(ckpts: list[Checkpoint], config_from) -> Path:
    """Where config and tokenizer come from: an input's index, an input's location, or any folder."""
    if config_from is None:
        return ckpts[0].root
    if isinstance(config_from, int):
        return ckpts[config_from].root
    for c in ckpts:
        if str(config_from) == c.source:
            return c.root
    folder = Path(config_from)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise PlanError(f"--config-from {config_from}: not an input and not a folder")
    return folder


def run_plan(plan: Plan, output, ckpts: list[Checkpoint], *, force: bool = False, config_from=None,
             config_overrides: dict | None = None, tokenizer_from: Path | None = None, copy_config: bool = True,
             extra_files: Callable[[Path], None] | None = None, tags: tuple[str, ...] = (), device: str = "auto",
             progress: ProgressCallback | None = None, hash_inputs: Sequence[int] = (), tap=None) -> Path:
    """Stream ``plan`` into ``output``, which appears only when complete.

    Config and other small files come from ``config_from`` (default: the first input), with
    ``config_overrides`` merged into config.json, then tokenizer files from ``tokenizer_from`` if
    given; ``extra_files(folder)`` may add files before the folder is renamed into place. Inputs
    listed in ``hash_inputs`` get a content hash computed during the same pass (``plan.recipe``
    receives them under ``content_sha256``).
    """
    out = check_output(output, [c.root for c in ckpts], force)
    sidecars = sidecar_source(ckpts, config_from)
    overrides = dict(config_overrides or {})
    dtypes = {t.spec.dtype for t in plan.tensors if t.spec.dtype in CONFIG_DTYPE}
    if len(dtypes) == 1:  # record the weights' dtype, under both names transformers has used
        name = CONFIG_DTYPE[dtypes.pop()]
        config = _config_of(sidecars)
        overrides.setdefault("dtype", name)
        if "torch_dtype" in config:
            overrides.setdefault("torch_dtype", name)
    with OutputFolder(out, force) as tmp:
        digests: dict = {} if hash_inputs else None
        shards = execute(plan, tmp, checkpoints=ckpts, device=device, progress=progress, digests=digests,
                         hash_inputs=hash_inputs, tap=tap)
        if digests is not None:
            plan.recipe["content_sha256"] = {ckpts[i].source: content_hash(digests, i) for i in hash_inputs}
        write_index(tmp, shards)
        tokenizer_dir = Path(tokenizer_from) if tokenizer_from is not None and Path(tokenizer_from).is_dir() else None
        if copy_config:
            copy_sidecars(sidecars, tmp, overrides, skip_tokenizer=tokenizer_dir is not None)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
        if extra_files is not None:
            extra_files(tmp)
        write_card(tmp, plan.recipe, ckpts, list(tags), title=out.name)
    return out


def write_single_file(plan: Plan, output, ckpts: list[Checkpoint], *, force: bool = False, device: str = "auto",
                      progress: ProgressCallback | None = None) -> Path:
    """Stream a one-shard ``plan`` into the file ``output`` (a file format built on safetensors),
    which appears only when complete."""
    import os

    if len(plan.shards()) != 1:
        raise PlanError("a single-file output must fit one shard")
    with OutputFile(output, [c.root for c in ckpts], force) as tmp:
        scratch = tmp.with_name(tmp.name + ".d")
        scratch.mkdir()
        try:
            shard = execute(plan, scratch, checkpoints=ckpts, device=device, progress=progress)[0]
            os.replace(scratch / shard.filename, tmp)
        finally:
            for p in scratch.iterdir():
                p.unlink()
            scratch.rmdir()
    return Path(output)


def checkpoint_content_hash(ckpt: Checkpoint) -> str | None:
    """The content hash of a whole safetensors checkpoint (None for pickled ones), reading each
    tensor once through a map."""
    import hashlib

    from ..io.mapped import MappedFiles

    if ckpt.pickled:
        return None
    files, digests = MappedFiles(), {}
    for name, info in ckpt.tensors.items():
        digests[(0, name)] = hashlib.sha256(files.view(info)).hexdigest()
        files.release(info)
    return content_hash(digests, 0)


def content_hash(digests: dict, input_index: int) -> str:
    """sha256 over one input's (name, sha256 of its bytes) pairs, sorted by name: the same for the
    same weights however they are sharded."""
    h = hashlib.sha256()
    for (i, name), hex_digest in sorted(digests.items()):
        if i == input_index:
            h.update(f"{name}\t{hex_digest}\n".encode())
    return h.hexdigest()


def _config_of(folder: Path) -> dict:
    import json

    path = folder / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}
