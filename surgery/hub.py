"""Hugging Face Hub pull and push, through ``huggingface_hub`` (its cache, token and endpoint).

Pull (:func:`open_hub`, which :func:`surgery.open_checkpoint` calls for ``org/name[@revision]``):
the config, index and tokenizer files are fetched into the Hugging Face cache (``snapshot_download``
with those patterns only); each safetensors shard not already cached has its header read with two
ranged requests (its first 8 bytes, then the header's), so the :class:`Checkpoint` is built, and
every input checked against the others, before one weight byte moves. A shard is downloaded, whole
and into the cache, at its first read (:func:`fetch_pending`, which the readers call when they
first open a shard), and the next shard of that checkpoint follows in the background. With ``HF_HUB_OFFLINE=1``
only the cache is used.

Push (:func:`push`): a complete output folder goes to a repo in several commits (weights first in
batches of ``commit_size`` bytes, then index, config, tokenizer and card), each one
``HfApi.create_commit``. A rerun after an interruption asks the remote what it has (paths-info)
and commits only what differs; LFS objects uploaded before a failed commit are not sent again (the
LFS batch answer says so). Progress (file hashes, the pull request a push opened) is kept in
``~/.cache/surgery/push``. The token comes from ``huggingface_hub`` (``HF_TOKEN`` or the stored
login) and never appears in a message.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import CheckpointError, SurgeryError
from .io.checkpoint import HUB_ID, HUB_PATTERNS, Checkpoint, find_index, index_shards, open_files, open_index
from .io.safetensors_header import MAX_HEADER_BYTES, parse_header

# What a pull fetches before it looks at weights: index, config, generation config, tokenizer.
SIDECAR_PATTERNS = [p for p in HUB_PATTERNS if p != "*.safetensors"]
HEADER_THREADS = 8  # remote header reads in flight at once
MAX_FILES_PER_COMMIT = 100
DEFAULT_COMMIT_SIZE = "5GB"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class PushError(SurgeryError):
    """A push cannot start (folder incomplete, no token, bad repo id) or stopped; rerunning resumes it."""


# ---------------------------------------------------------------------------------------------
# Messages: one line, never a token


_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")


def redact(text: str, token: str | None = None) -> str:
    """``text`` without the token (the one given, the one ``huggingface_hub`` would send, anything
    shaped like an ``hf_`` token or a bearer credential)."""
    for t in {token, _current_token()}:
        if t:
            text = text.replace(t, "***")
    return _BEARER.sub(r"\1***", _TOKEN_LIKE.sub("hf_***", text))


def _current_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no readable token store: nothing to hide
        return None


def describe(error: BaseException, token: str | None = None) -> str:
    """One line saying what a ``huggingface_hub`` or HTTP error means, token removed."""
    from huggingface_hub import errors as hf

    kinds = [(getattr(hf, "GatedRepoError", ()), "gated repo: accept its conditions on the Hub and use a token that may read it"),
             (getattr(hf, "RepositoryNotFoundError", ()), "repository not found (or private: check the token)"),
             (getattr(hf, "RevisionNotFoundError", ()), "revision not found"),
             (getattr(hf, "RemoteEntryNotFoundError", getattr(hf, "EntryNotFoundError", ())), "file not found in the repo")]
    for kind, meaning in kinds:
        if kind and isinstance(error, kind):
            return meaning
    if isinstance(error, (getattr(hf, "OfflineModeIsEnabled", ()), getattr(hf, "LocalEntryNotFoundError", ()),
                          getattr(hf, "IncompleteSnapshotError", ()))) and _offline():
        return "not in the local cache, and HF_HUB_OFFLINE is set (only the cache is searched)"
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    server = getattr(error, "server_message", None)
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if status is not None:
        text = f"HTTP {status}" + (f": {server.strip()}" if server and server.strip() else f" ({text})" if text else "")
    else:
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    text = " ".join(redact(text, token).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# ---------------------------------------------------------------------------------------------
# Pull


@dataclass
class _Pending:
    """A Hub shard whose header was read remotely and whose weights are not downloaded yet."""

    repo_id: str
    filename: str  # in the repo
    commit: str
    size: int
    label: str  # what the user asked for, for messages
    siblings: list[str]  # the checkpoint's shard paths, in order (the next one is prefetched)
    lock: threading.Lock = field(default_factory=threading.Lock)


_pending: dict[str, _Pending] = {}  # local path the shard will have -> how to fetch it
_pending_lock = threading.Lock()


def open_hub(source: str) -> Checkpoint:
    """Open a Hub checkpoint ``org/name[@revision]`` from its small files and its shards' headers."""
    from huggingface_hub import snapshot_download

    repo_id, _, revision = source.partition("@")
    offline = _offline()
    try:
        folder = Path(os.path.abspath(snapshot_download(repo_id, revision=revision or None,
                                                        allow_patterns=SIDECAR_PATTERNS)))
    except Exception as e:  # the client raises many kinds; each means "could not get it"
        raise CheckpointError(f"cannot fetch Hub repo {source}: {describe(e)}") from None
    commit = folder.name
    index = find_index(folder) if folder.is_dir() else None
    if index is not None:
        shards = index_shards(folder, index)
    else:
        names = _repo_files(repo_id, commit, folder, source, offline)
        weights = sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)
        if "model.safetensors" in weights:
            weights = ["model.safetensors"]
        if not weights:
            pickled = " (it has pickled .bin weights, which are not fetched: convert them to safetensors)" \
                if any(n.endswith(".bin") for n in names) else ""
            where = " in the local cache (HF_HUB_OFFLINE is set)" if offline else ""
            raise CheckpointError(f"Hub repo {source} has no safetensors weights{where}{pickled}")
        shards = [str(folder / n) for n in weights]
    missing = sorted(p for p in shards if not os.path.isfile(p))
    if missing and offline:
        more = f" (and {len(missing) - 1} more shard(s))" if len(missing) > 1 else ""
        raise CheckpointError(f"Hub repo {source}: {_rel(missing[0], folder)}{more} not in the local cache, and "
                              "HF_HUB_OFFLINE is set (only the cache is searched); fetch it once online")
    if missing and (folder / ADAPTER_CONFIG).is_file() and [os.path.basename(p) for p in shards] == [ADAPTER_WEIGHTS]:
        # a LoRA adapter is small, and is read again from its folder by surgery.lora: fetch it whole now
        _download(_Pending(repo_id, ADAPTER_WEIGHTS, commit, -1, source, []), missing[0])
        missing = []
    remote = _remote_headers(repo_id, commit, folder, missing, source)
    known = {p: tensors for p, (tensors, _) in remote.items()}
    if index is not None:
        ckpt = open_index(source, folder, index, known)
    else:
        ckpt = open_files(source, folder, [Path(p) for p in shards], known)
    with _pending_lock:
        for path, (_, size) in remote.items():
            _pending[path] = _Pending(repo_id, _rel(path, folder), commit, size, source, sorted(missing))
    return ckpt


def fetch_pending(path: str) -> bool:
    """Make sure ``path`` is downloaded if it is a Hub shard opened from its remote header alone;
    whether it was one.

    Called by the readers at a shard's first read (and whenever a shard file is missing).
    Thread-safe: concurrent readers of one shard wait for a single download. Starts the next
    pending shard of the same checkpoint in the background, so the network works while this shard
    is computed on.
    """
    with _pending_lock:
        entry = _pending.get(path)
    if entry is None:
        return False
    with entry.lock:
        if not os.path.exists(path):
            _download(entry, path)
        with _pending_lock:
            _pending.pop(path, None)
    _prefetch_after(entry, path)
    return True


def _prefetch_after(entry: _Pending, path: str) -> None:
    try:
        nxt = entry.siblings[entry.siblings.index(path) + 1]
    except (ValueError, IndexError):
        return
    with _pending_lock:
        following = _pending.get(nxt)
    if following is None or not following.lock.acquire(blocking=False):
        return  # done, or being fetched already

    def run():
        try:
            if not os.path.exists(nxt):
                _download(following, nxt)
        except Exception:  # the reader that needs it retries, and reports the error
            pass
        finally:
            following.lock.release()

    threading.Thread(target=run, name="surgery-hub-prefetch", daemon=True).start()


def _download(entry: _Pending, path: str) -> None:
    from huggingface_hub import hf_hub_download

    try:
        got = hf_hub_download(entry.repo_id, entry.filename, revision=entry.commit)
    except Exception as e:
        raise CheckpointError(f"cannot download {entry.filename} from Hub repo {entry.label}: {describe(e)}",
                              file=path) from None
    if os.path.abspath(got) != path and not os.path.exists(path):
        raise CheckpointError(f"{entry.filename} of Hub repo {entry.label} was downloaded to {got}, not to the "
                              "cache folder it was opened from (did HF_HUB_CACHE change?)", file=path)
    size = os.path.getsize(path)
    if entry.size >= 0 and size != entry.size:
        raise CheckpointError(f"{entry.filename} of Hub repo {entry.label} has {size} bytes, but its header was "
                              f"read from a file of {entry.size}", file=path)


def _rel(path: str, folder: Path) -> str:
    return Path(os.path.relpath(path, folder)).as_posix()


def _repo_files(repo_id: str, commit: str, folder: Path, source: str, offline: bool) -> list[str]:
    """The repo's file names at ``commit``: the tree listing ``snapshot_download`` cached, else the
    Hub's listing (online) or the snapshot folder's (offline)."""
    try:
        from huggingface_hub import get_cached_repo_tree

        return [f.path for f in get_cached_repo_tree(repo_id, revision=commit)]
    except Exception:  # an older client, or a cache written without a tree listing
        pass
    if offline:
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    from huggingface_hub import HfApi

    try:
        return HfApi().list_repo_files(repo_id, revision=commit)
    except Exception as e:
        raise CheckpointError(f"cannot list Hub repo {source}: {describe(e)}") from None


def _remote_headers(repo_id: str, commit: str, folder: Path, paths: list[str], source: str) -> dict:
    """``{path: (tensors, file size)}`` for the shards not in the cache, read with ranged requests."""
    if not paths:
        return {}
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
    timeout = getattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10)

    def one(path: str):
        filename = _rel(path, folder)
        url = hf_hub_url(repo_id, filename, revision=commit)
        try:
            head, size = _ranged(url, headers, 0, 8, timeout)
            if len(head) < 8:
                raise CheckpointError("not a safetensors file: shorter than its 8-byte header length", file=path)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"corrupt or truncated safetensors header (declares {n} header bytes, "
                                      f"file has {size})", file=path)
            raw, _ = _ranged(url, headers, 8, n, timeout)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read the header of {filename} in Hub repo {source}: {describe(e)}",
                                  file=path) from None
        if len(raw) != n:
            raise CheckpointError(f"the Hub sent {len(raw)} of the {n} header bytes of {filename}", file=path)
        return parse_header(raw, size, path)[0], size

    if len(paths) == 1:
        return {paths[0]: one(paths[0])}
    with ThreadPoolExecutor(min(HEADER_THREADS, len(paths)), thread_name_prefix="surgery-hub-header") as pool:
        return dict(zip(paths, pool.map(one, paths)))


def _ranged(url: str, headers: dict, start: int, length: int, timeout) -> tuple[bytes, int]:
    """``length`` bytes of the file at ``url`` from ``start``, and the file's size, reading no more
    than that even from a server that ignores ``Range``."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    end = start + length - 1
    with get_session().stream("GET", url, headers={**headers, "Range": f"bytes={start}-{end}"},
                              timeout=timeout) as r:
        hf_raise_for_status(r)
        if r.status_code == 206:
            total = int(r.headers["Content-Range"].rpartition("/")[2])
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) >= length:
                    break
            return bytes(data[:length]), total
        total = int(r.headers.get("Content-Length", -1))
        data = bytearray()
        for chunk in r.iter_bytes():
            data += chunk
            if len(data) > end:
                break
        if total < 0:
            raise CheckpointError(f"the server answered a ranged request without a size ({url})")
        return bytes(data[start:end + 1]), total


# ---------------------------------------------------------------------------------------------
# Push


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
    if so asked), on branch ``revision`` (created if missing) or as a new pull request.

    Weights go first, in commits of at most ``commit_size`` bytes, then the index, config,
    tokenizer and card in the last commit, so the branch never has an index naming shards it lacks.
    Rerun the same call after an interruption: what the remote already has is skipped.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from .io.writer import parse_size

    log = log or (lambda _message: None)
    folder = Path(folder).expanduser()
    token = check_push(repo_id, token)
    if create_pr and revision not in (None, "main"):
        raise PushError("--create-pr opens a pull request against the default branch; it does not combine with --revision")
    files = _complete_folder(folder)
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


def _complete_folder(folder: Path) -> list[_LocalFile]:
    """The files of a finished checkpoint folder, weights first and index and card last; refuses a
    folder that is not one (missing shard, truncated file, an unfinished output)."""
    from .io.checkpoint import open_checkpoint

    if not folder.is_dir():
        raise PushError(f"nothing to push: {folder} is not a folder")
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
