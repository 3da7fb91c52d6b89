"""Hub pull: a checkpoint ``org/name[@revision]`` opened from its small files and its shards'
headers (ranged reads), each shard downloaded into the Hugging Face cache at its first read."""
from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from ..io.checkpoint import HUB_PATTERNS, Checkpoint, find_index, index_shards, open_files, open_index
from ..io.safetensors_header import MAX_HEADER_BYTES, parse_header
from .messages import _offline, describe

# What a pull fetches before it looks at weights: index, config, generation config, tokenizer.
SIDECAR_PATTERNS = [p for p in HUB_PATTERNS if p != "*.safetensors"]
HEADER_THREADS = 8  # remote header reads in flight at once
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"



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
