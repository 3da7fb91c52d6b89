"""Run a plan into an output folder: validate the output, stream the tensors, add sidecars and a card."""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..card import PLAN_FILE, write_card
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
             progress: ProgressCallback | None = None, hash_inputs: Sequence[int] = (), tap=None,
             content_hashes: bool | None = None) -> Path:
    """Stream ``plan`` into ``output``, which appears only when complete.

    Config and other small files come from ``config_from`` (default: the first input), with
    ``config_overrides`` merged into config.json, then tokenizer files from ``tokenizer_from`` if
    given; ``extra_files(folder)`` may add files before the folder is renamed into place. Inputs
    listed in ``hash_inputs`` get a content hash computed during the same pass (``plan.recipe``
    receives them under ``content_sha256``). With ``content_hashes`` (default: off unless
    ``SURGERY_CONTENT_HASH=1``, see :func:`hash_inputs_default`) every safetensors input's content
    hash is computed on the read-ahead threads of the same pass and recorded in the card; the plan
    goes to ``surgery_plan.json``.
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
    if content_hashes is None:
        content_hashes = hash_inputs_default()
    hashed = sorted(set(hash_inputs) | ({i for i, c in enumerate(ckpts) if not c.pickled} if content_hashes else set()))
    with OutputFolder(out, force) as tmp:
        digests: dict = {} if hashed else None
        shards = execute(plan, tmp, checkpoints=ckpts, device=device, progress=progress, digests=digests,
                         hash_inputs=hashed, tap=tap)
        if digests is not None:
            complete_digests(ckpts, digests, hashed)
            if hash_inputs:
                plan.recipe["content_sha256"] = {ckpts[i].source: content_hash(digests, i) for i in hash_inputs}
        write_index(tmp, shards)
        tokenizer_dir = Path(tokenizer_from) if tokenizer_from is not None and Path(tokenizer_from).is_dir() else None
        if copy_config:
            copy_sidecars(sidecars, tmp, overrides, skip_tokenizer=tokenizer_dir is not None)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
        if extra_files is not None:
            extra_files(tmp)
        (tmp / PLAN_FILE).write_text(plan.to_json() + "\n")
        write_card(tmp, plan.recipe, ckpts, list(tags), title=out.name,
                   content_hashes={i: content_hash(digests, i) for i in hashed} if digests is not None else None,
                   shards=_shard_hashes(tmp, shards))
    return out


def _shard_hashes(folder: Path, shards) -> dict[str, str]:
    """Each written shard's sha256, as its writer computed it (hashed from the file if not)."""
    from ..card import file_sha256
    from ..io.writer import SHARD_SHA256

    out = {}
    for s in shards:
        path = folder / s.filename
        digest = SHARD_SHA256.pop(str(path), None)
        out[s.filename] = digest if digest is not None else file_sha256(path)
    return out


def hash_inputs_default() -> bool:
    """Whether outputs record their inputs' content hashes: inside ``with content_hashing():`` (the
    CLI's ``--content-hash``), or with ``SURGERY_CONTENT_HASH=1``. Hashing is one sha256 pass over
    every input byte (about 1.2 GB/s a core here): on two cores it made a 3 x 600 MB soup 40% slower,
    so it is asked for, not paid by default. Without it the card records each input's header
    fingerprint (names, dtypes, shapes, sizes), and for Hub inputs their commit and the sha256 the
    Hub publishes for each weight file."""
    import os

    chosen = _CONTENT_HASHING.get()
    if chosen is not None:
        return chosen
    return os.environ.get(CONTENT_HASH_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


CONTENT_HASH_ENV = "SURGERY_CONTENT_HASH"
_CONTENT_HASHING: contextvars.ContextVar[bool | None] = contextvars.ContextVar("surgery_content_hashing", default=None)


@contextlib.contextmanager
def content_hashing(enabled: bool = True) -> Iterator[None]:
    """Outputs written inside record (or, with ``enabled=False``, do not record) every input's
    content hash, whatever ``SURGERY_CONTENT_HASH`` says."""
    token = _CONTENT_HASHING.set(bool(enabled))
    try:
        yield
    finally:
        _CONTENT_HASHING.reset(token)


def complete_digests(ckpts: list[Checkpoint], digests: dict, hashed: Sequence[int]) -> None:
    """Hash the stored tensors of the inputs in ``hashed`` that the plan did not read (a content
    hash covers every tensor), each through a map."""
    from ..io.mapped import MappedFiles

    files = MappedFiles()
    for i in hashed:
        for name, info in ckpts[i].tensors.items():
            if (i, name) not in digests:
                digests[(i, name)] = hashlib.sha256(files.view(info)).hexdigest()
                files.release(info)


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
