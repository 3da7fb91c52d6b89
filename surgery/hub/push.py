"""Hub push: a complete output folder to a repo in several commits, resumable."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError, PushError
from ..io.checkpoint import HUB_ID
from .messages import _current_token, describe, redact

MAX_FILES_PER_COMMIT = 100
DEFAULT_COMMIT_SIZE = "5GB"



@dataclass
class PushResult:
    repo_id: str
    revision: str  # the branch (or refs/pr/N) the files are on
    url: str
    commits: list[str] = field(default_factory=list)  # commit URLs this call made
    uploaded: list[str] = field(default_factory=list)  # files this call committed
    skipped: list[str] = field(default_factory=list)  # files the remote already had
    pr_url: str | None = None


@dataclass
class _LocalFile:
    rel: str
    path: Path
    size: int
    mtime_ns: int


def check_push(repo_id: str, token: str | None = None) -> str:
    """Check, before any work, that ``repo_id`` is a repo id and that a token is available; the token."""
    if not isinstance(repo_id, str) or "@" in repo_id or not HUB_ID.match(repo_id) or repo_id.startswith((".", "/")):
        raise PushError(f"not a Hub repo id: {repo_id!r} (expected org/name; use --revision for a branch)")
    token = token or _current_token()
    if not token:
        raise PushError(f"pushing to {repo_id} needs a Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    return token


def push(folder, repo_id: str, *, private: bool = False, revision: str | None = None, create_pr: bool = False,
         commit_message: str | None = None, token: str | None = None, commit_size: str | int = DEFAULT_COMMIT_SIZE,
         log: Callable[[str], None] | None = None) -> PushResult:
    """Push a complete checkpoint folder to the Hub repo ``repo_id`` (created if missing, ``private``
    if so asked), on branch ``revision`` (created if missing) or as a new pull request. ``folder``
    may also be one safetensors-based file (a sparse fine-tune, a mask): it goes to the repo's top
    level under its own name.

    Weights go first, in commits of at most ``commit_size`` bytes, then the index, config,
    tokenizer and card in the last commit, so the branch never has an index naming shards it lacks.
    Rerun the same call after an interruption: what the remote already has is skipped.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from ..io.writer import parse_size

    log = log or (lambda _message: None)
    folder = Path(folder).expanduser()
    token = check_push(repo_id, token)
    if create_pr and revision not in (None, "main"):
        raise PushError("--create-pr opens a pull request against the default branch; it does not combine with --revision")
    files = _complete_file(folder) if folder.is_file() else _complete_folder(folder)
    budget = parse_size(commit_size)
    hint = f"surgery push {folder} {repo_id}" + (f" --revision {revision}" if revision else "") + \
        (" --create-pr" if create_pr else "")
    state = _PushState(folder, repo_id, revision, create_pr)
    api = HfApi(token=token)
    target = revision or "main"
    result = PushResult(repo_id, target, "")
    batches: list[list[_LocalFile]] = []
    try:
        result.url = str(api.create_repo(repo_id, private=private, exist_ok=True))
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if create_pr:
            target = state.data.get("pr_revision")  # a rerun goes on in the pull request it opened
            result.pr_url = state.data.get("pr_url")
        remote = _remote_files(api, repo_id, target or "main", [f.rel for f in files])
        if remote is None and create_pr and target is not None:  # that pull request is gone: open another
            target = result.pr_url = None
            remote = _remote_files(api, repo_id, "main", [f.rel for f in files])
        remote = remote or {}
        todo = []
        for f in files:
            if f.rel in remote and _same(f, remote[f.rel], state):
                result.skipped.append(f.rel)
            else:
                todo.append(f)
        batches = _batches(todo, budget)
        if result.skipped:
            log(f"{repo_id}: {len(result.skipped)} file(s) already there, {len(todo)} to push")
        for i, batch in enumerate(batches, 1):
            ops = []
            for f in batch:
                op = CommitOperationAdd(path_in_repo=f.rel, path_or_fileobj=str(f.path))
                op.upload_info.sha256 = bytes.fromhex(state.sha256(f))  # hashed once, across reruns
                ops.append(op)
            message = commit_message or f"Upload {folder.name} with surgery"
            if len(batches) > 1:
                message += f" (part {i} of {len(batches)})"
            info = api.create_commit(repo_id, operations=ops, commit_message=message, revision=target,
                                     create_pr=bool(create_pr and target is None))
            if create_pr and target is None:
                target, result.pr_url = info.pr_revision, info.pr_url
                state.data.update(pr_revision=target, pr_url=info.pr_url)
            state.save()
            result.commits.append(info.commit_url)
            result.uploaded += [f.rel for f in batch]
            log(f"{repo_id}@{target}: committed part {i} of {len(batches)} "
                f"({len(batch)} file(s), {sum(f.size for f in batch):,} bytes)")
    except PushError:
        raise
    except KeyboardInterrupt:
        state.save()  # what was hashed, and the pull request opened, serve the rerun
        raise
    except Exception as e:
        state.save()
        done = f" after {len(result.commits)} of {len(batches)} commits" if batches else ""
        error = PushError(f"push of {folder} to {repo_id} stopped{done}: {describe(e, token)}; "
                          f"the folder is intact: run `{hint}` to resume (what is committed is skipped)")
        if redact(str(e), token) == str(e):
            raise error from e
        raise error from None  # the cause's message would show the token
    state.done()
    result.revision = target or "main"
    return result


def _complete_file(path: Path) -> list[_LocalFile]:
    """A single-file output (SFT, mask), refused unless its safetensors header reads and fits the file."""
    from ..io.safetensors_header import read_header

    if path.name.endswith(".partial") and path.name.startswith("."):
        raise PushError(f"{path} is an unfinished output (a surgery run's temporary file); push the finished one")
    try:
        read_header(path)
    except CheckpointError as e:
        raise PushError(f"{path} is not a complete safetensors file, refusing to push it: {e}") from None
    st = path.stat()
    return [_LocalFile(path.name, path, st.st_size, st.st_mtime_ns)]


def _complete_folder(folder: Path) -> list[_LocalFile]:
    """The files of a finished checkpoint folder, weights first and index and card last; refuses a
    folder that is not one (missing shard, truncated file, an unfinished output)."""
    from ..io.checkpoint import open_checkpoint

    if not folder.is_dir():
        raise PushError(f"nothing to push: {folder} is not a folder or a file")
    if folder.name.endswith((".partial", ".old")) and folder.name.startswith("."):
        raise PushError(f"{folder} is an unfinished output (a surgery run's temporary folder); push the finished one")
    try:
        open_checkpoint(folder)  # every header read and checked against its file's size; the index complete
    except CheckpointError as e:
        raise PushError(f"{folder} is not a complete checkpoint, refusing to push it: {e}") from None
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or any(part in (".git", ".cache") for part in rel.split("/")):
            continue
        st = p.stat()
        files.append(_LocalFile(rel, p, st.st_size, st.st_mtime_ns))

    def order(f: _LocalFile):
        last = f.rel.endswith(".index.json") or f.rel == "README.md"
        return (0 if f.rel.endswith(".safetensors") else 2 if last else 1, f.rel)

    return sorted(files, key=order)


def _batches(files: list[_LocalFile], budget: int) -> list[list[_LocalFile]]:
    """The commits: weights in consecutive groups of at most ``budget`` bytes (a larger file alone),
    then every other file (index, config, tokenizer, card) together; MAX_FILES_PER_COMMIT at most."""
    out: list[list[_LocalFile]] = []
    size = 0
    weights = [f for f in files if f.rel.endswith(".safetensors")]
    for f in weights:
        if not out or len(out[-1]) >= MAX_FILES_PER_COMMIT or size + f.size > budget:
            out.append([])
            size = 0
        out[-1].append(f)
        size += f.size
    rest = [f for f in files if not f.rel.endswith(".safetensors")]
    out += [rest[i:i + MAX_FILES_PER_COMMIT] for i in range(0, len(rest), MAX_FILES_PER_COMMIT)]
    return out


def _remote_files(api, repo_id: str, revision: str, paths: list[str]) -> dict | None:
    """``{path: RepoFile}`` of those of ``paths`` that ``revision`` has (the paths-info answer);
    None if there is no such revision."""
    from huggingface_hub import errors as hf

    found = {}
    for i in range(0, len(paths), 100):
        try:
            infos = api.get_paths_info(repo_id, paths[i:i + 100], revision=revision)
        except hf.RevisionNotFoundError:
            return None
        found.update({x.path: x for x in infos if hasattr(x, "blob_id")})
    return found


def _same(f: _LocalFile, remote, state: "_PushState") -> bool:
    """Whether the remote file has ``f``'s content: by sha256 for an LFS file, by git blob id otherwise."""
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return lfs.size == f.size and lfs.sha256 == state.sha256(f)
    if getattr(remote, "size", None) not in (None, f.size):
        return False
    h = hashlib.sha1(f"blob {f.size}\0".encode())
    with open(f.path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            h.update(chunk)
    return remote.blob_id == h.hexdigest()


class _PushState:
    """What a push of one folder to one repo and revision has learnt: each file's sha256 (keyed by
    size and mtime, so a changed file is hashed again) and the pull request it opened."""

    def __init__(self, folder: Path, repo_id: str, revision: str | None, create_pr: bool):
        key = json.dumps([str(folder.resolve()), repo_id, revision, create_pr])
        self.path = _state_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
        self.data = {"folder": str(folder.resolve()), "repo_id": repo_id, "revision": revision,
                     "create_pr": create_pr, "hashes": {}}
        try:
            saved = json.loads(self.path.read_text())
            if saved.get("folder") == self.data["folder"] and saved.get("repo_id") == repo_id:
                self.data.update(saved)
        except (OSError, ValueError):
            pass

    def sha256(self, f: _LocalFile) -> str:
        known = self.data["hashes"].get(f.rel)
        if known and known[0] == f.size and known[1] == f.mtime_ns:
            return known[2]
        h = hashlib.sha256()
        with open(f.path, "rb") as fh:
            for chunk in iter(lambda: fh.read(8 << 20), b""):
                h.update(chunk)
        self.data["hashes"][f.rel] = [f.size, f.mtime_ns, h.hexdigest()]
        return h.hexdigest()

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)
        except OSError:  # progress is an optimisation: the remote's answers decide what is skipped
            pass

    def done(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass


def _state_dir() -> Path:
    """``$SURGERY_CACHE_DIR/push``, else ``$XDG_CACHE_HOME/surgery/push``, else ``~/.cache/surgery/push``."""
    if os.environ.get("SURGERY_CACHE_DIR"):
        return Path(os.environ["SURGERY_CACHE_DIR"]) / "push"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "surgery" / "push"
