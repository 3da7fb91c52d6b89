"""An output folder that appears only when complete.

Everything is written into a hidden sibling folder, which is renamed onto the target at the end.
A crash or kill leaves at most that hidden folder, never a half-written target. With ``force``,
an existing target is moved aside first and deleted only after the new one is in place.
"""
from __future__ import annotations

import glob
import os
import shutil
import uuid
from pathlib import Path

from ..errors import OutputError

SIDECAR_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")
WEIGHT_FILE_MARKERS = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".gguf")


def is_sidecar(name: str) -> bool:
    """Small files that travel with the weights: config, generation config, tokenizer, custom code."""
    return name != "README.md" and not any(m in name for m in WEIGHT_FILE_MARKERS) and name.endswith(SIDECAR_SUFFIXES)


def check_output(output: str | os.PathLike, inputs: list[Path], force: bool) -> Path:
    """Refuse an output that exists (without ``force``) or that would overwrite or contain an input."""
    out = Path(output).expanduser().resolve()
    for root in inputs:
        root = Path(root).resolve()
        if out == root or root.is_relative_to(out):
            raise OutputError(f"output {out} is, or contains, the input {root}; choose another output folder")
    if out.exists() and not force:
        raise OutputError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    return out


class OutputFolder:
    """``with OutputFolder(out, force) as tmp: ...write into tmp...`` then it becomes ``out``."""

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out)
        self.force = force
        self.tmp = self.out.parent / f".{self.out.name}.surgery-{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.out)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        _fsync_folder(self.tmp)
        old = None
        if self.out.exists():
            if not self.force:  # it appeared while we worked
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise OutputError(f"output {self.out} appeared while writing; pass --force to replace it")
            old = self.out.parent / f".{self.out.name}.surgery-{uuid.uuid4().hex[:8]}.old"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


class OutputFile:
    """``with OutputFile(path, inputs, force) as tmp: ...write tmp...`` then it becomes ``path``:
    single-file outputs (masks, sparse fine-tunes) appear only when complete, as folders do."""

    def __init__(self, path, inputs: list[Path], force: bool = False):
        self.out = Path(path).expanduser().resolve()
        for root in inputs:
            root = Path(root).resolve()
            if self.out == root or self.out.is_relative_to(root) and root.is_file():
                raise OutputError(f"output {self.out} is an input; choose another file")
        if self.out.exists() and not force:
            raise OutputError(f"output {self.out} already exists; pass --force to replace it")
        if self.out.is_dir():
            raise OutputError(f"output {self.out} is a folder, not a file")
        self.force = force
        self.tmp = self.out.parent / f".{self.out.name}.surgery-{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.out)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return False
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.out.exists() and not self.force:
            self.tmp.unlink(missing_ok=True)
            raise OutputError(f"output {self.out} appeared while writing; pass --force to replace it")
        os.replace(self.tmp, self.out)
        return False


def remove_stale_partials(out: Path) -> None:
    """Delete partial folders for ``out`` left by runs that were killed (their process is gone)."""
    for p in out.parent.glob(f".{glob.escape(out.name)}.surgery-*.partial"):
        try:
            pid = int(p.name[len(out.name) + 1:].split("-")[1])
        except (IndexError, ValueError):
            continue
        if not _alive(pid):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.json",
                   "chat_template.jinja")


def copy_tokenizer(source: Path, dest: Path) -> list[str]:
    """Copy (over any already there) the tokenizer and chat template files of ``source``."""
    copied = []
    for p in sorted(Path(source).iterdir()):
        if p.is_file() and is_tokenizer_file(p.name):
            shutil.copyfile(p, dest / p.name)
            copied.append(p.name)
    return copied


def is_tokenizer_file(name: str) -> bool:
    return name in TOKENIZER_FILES or name.endswith((".tiktoken", ".jinja"))


def copy_sidecars(source: Path, dest: Path, config_overrides: dict | None = None,
                  skip_tokenizer: bool = False) -> list[str]:
    """Copy config, generation config, tokenizer and other small non-weight files from ``source``.

    ``config_overrides`` are merged into ``config.json`` (for example when the output unties a head
    or changes dtype). A README is never copied: the output gets its own model card. With
    ``skip_tokenizer`` the tokenizer and chat template are left out (they come from elsewhere).
    """
    import json

    copied = []
    for p in sorted(Path(source).iterdir()):
        if not p.is_file() or not is_sidecar(p.name) or (skip_tokenizer and is_tokenizer_file(p.name)):
            continue
        if p.name == "config.json" and config_overrides:
            config = json.loads(p.read_text())
            config.update(config_overrides)
            (dest / p.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(p, dest / p.name)
        copied.append(p.name)
    return copied
