"""A small Hugging Face Hub on the loopback interface, for tests.

It answers the part of the Hub API that ``huggingface_hub`` 2.x calls to pull and push model
repos with xet disabled (``HF_HUB_DISABLE_XET=1``): repo create, whoami, revision info, tree and
paths-info listings, file resolve (HEAD, and GET with ``Range``), branch create, YAML validation,
preupload, the LFS batch API with basic single-part uploads and verify, and NDJSON commits
(optionally opening a pull request). Everything lives in memory and every request is counted, so
a test can say how many bytes of each file were served, which objects were uploaded, and which
commits landed; ``fail_commit_at`` makes the Nth commit request fail (an interrupted push).

Standard library only; one thread per connection.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".gguf", ".model")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def stored_as_lfs(path: str, size: int, sample: bytes = b"") -> bool:
    """The Hub's rule, roughly: LFS for weights and binaries and anything of 10 MB or more."""
    return path.endswith(LFS_SUFFIXES) or size >= 10 * 1024 * 1024 or b"\0" in sample


@dataclass(frozen=True)
class File:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def blob_id(self) -> str:  # git's id of what git stores: the pointer for an LFS file
        return git_blob_id(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:  # as the Hub: the sha256 of an LFS file, the git blob id of a regular one
        return self.sha256 if self.lfs else self.blob_id

    def entry(self, path: str) -> dict:
        e = {"type": "file", "oid": self.blob_id, "size": len(self.data), "path": path}
        if self.lfs:
            e["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return e


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    commits: dict[str, dict[str, File]] = field(default_factory=dict)  # commit oid -> files
    refs: dict[str, str] = field(default_factory=dict)  # "main", branches, "refs/pr/N" -> commit oid
    prs: int = 0

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None

    def commit(self, ref: str, files: dict[str, File], message: str = "") -> str:
        parent = self.refs.get(ref, "")
        oid = hashlib.sha1(f"{self.repo_id}\n{parent}\n{message}\n{len(self.commits)}\n".encode()
                           + json.dumps(sorted((p, f.etag) for p, f in files.items())).encode()).hexdigest()
        self.commits[oid] = dict(files)
        self.refs[ref] = oid
        return oid


class HubState:
    """The server's memory, and what tests look at."""

    def __init__(self, token: str | None = None):
        self.lock = threading.RLock()
        self.required_token = token  # writes (and reads of private repos) need it, when set
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # uploaded LFS objects by sha256
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.served: Counter = Counter()  # (repo_id, filename) -> bytes of content sent
        self.full_gets: Counter = Counter()  # (repo_id, filename) -> GETs without Range
        self.uploaded: Counter = Counter()  # sha256 -> bytes received by LFS uploads
        self.commits: list[tuple[str, str, list[str]]] = []  # (repo_id, ref, paths) of commits that landed
        self.commit_calls = 0
        self.fail_commit_at: int | None = None  # the Nth commit request (counting from 1) fails
        self.authorizations: list[str] = []  # every Authorization header received
        self.unhandled: list[tuple[str, str]] = []

    def add_repo(self, repo_id: str, folder: Path | None = None, files: dict[str, bytes] | None = None,
                 private: bool = False, ref: str = "main") -> str:
        """A repo holding ``folder``'s files (or ``files``); returns the commit."""
        with self.lock:
            repo = self.repos.get(repo_id) or Repo(repo_id, private)
            self.repos[repo_id] = repo
            content = dict(files or {})
            if folder is not None:
                for p in sorted(Path(folder).rglob("*")):
                    if p.is_file():
                        content[p.relative_to(folder).as_posix()] = p.read_bytes()
            current = dict(repo.commits.get(repo.refs.get(ref, ""), {".gitattributes": File(GITATTRIBUTES, False)}))
            for path, data in content.items():
                lfs = stored_as_lfs(path, len(data), data[:512])
                current[path] = File(data, lfs)
                if lfs:
                    self.lfs[hashlib.sha256(data).hexdigest()] = data
            return repo.commit(ref, current, "seed")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return {p: f.data for p, f in repo.commits[repo.resolve(revision)].items()}

    def weight_bytes_served(self) -> dict[str, int]:
        """Bytes of ``.safetensors`` content sent, per ``repo_id/filename``."""
        return {f"{r}/{f}": n for (r, f), n in self.served.items() if f.endswith(".safetensors")}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TinyHub/1"
    disable_nagle_algorithm = True  # else each response's body waits out a delayed ACK (40 ms)
    wbufsize = 1 << 16  # headers and body leave in one write (flushed after each request)

    def log_message(self, *args):  # quiet
        pass

    @property
    def hub(self) -> HubState:
        return self.server.hub  # type: ignore[attr-defined]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    # -- plumbing -------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json", length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data, status: int = 200, headers: dict | None = None, content_type: str = "application/json"):
        self._send(status, json.dumps(data).encode(), headers, content_type)

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None):
        h = dict(headers or {})
        if code:
            h["X-Error-Code"] = code
        h["X-Error-Message"] = message
        self._json({"error": message}, status, h)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization")
        return auth.split(" ", 1)[1] if auth and " " in auth else None

    def _may_write(self) -> bool:
        need = self.hub.required_token
        if need is not None and self._token() != need:
            self._error(401, None, "Invalid credentials in Authorization header")
            return False
        return True

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and self.hub.required_token and self._token() != self.hub.required_token):
            self._error(404 if repo is None else 401, "RepoNotFound", "Repository not found")
            return None
        return repo

    def _writable(self, repo_id: str) -> Repo | None:
        """The repo a write request names, or None once the refusal (credentials, no such repo) is sent."""
        return self._repo(repo_id) if self._may_write() else None

    def _commit_of(self, repo: Repo, revision: str) -> str | None:
        oid = repo.resolve(revision)
        if oid is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return oid

    # -- dispatch -------------------------------------------------------------------------------

    def do_HEAD(self):
        self._dispatch()

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def _dispatch(self):
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        self.hub.requests.append((self.command, url.path, self.headers.get("Range")))
        if self.headers.get("Authorization"):
            self.hub.authorizations.append(self.headers["Authorization"])
        try:
            with self.hub.lock:
                handled = self._route(self.command, parts, query)
        except (BrokenPipeError, ConnectionResetError):
            return
        if not handled:
            self.hub.unhandled.append((self.command, self.path))
            self._error(404, None, f"not implemented by the test hub: {self.command} {url.path}")

    def _route(self, method: str, parts: list[str], query: dict) -> bool:
        if parts[:2] == ["api", "repos"] and parts[2:] == ["create"] and method == "POST":
            return self._create_repo()
        if parts == ["api", "whoami-v2"]:
            if not self._may_write():
                return True
            self._json({"type": "user", "name": "tester", "orgs": [], "auth": {"type": "access_token"}})
            return True
        if parts == ["api", "agent-harnesses"]:  # the client's agent detection asks once a day
            self._json({"standardEnvVars": [], "harnesses": {}})
            return True
        if parts == ["api", "validate-yaml"] and method == "POST":
            self._body()
            self._json({"errors": [], "warnings": []})
            return True
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if not rest and method == "GET":
                return self._info(repo_id, "main")
            if len(rest) == 2 and rest[0] == "revision" and method == "GET":
                return self._info(repo_id, rest[1])
            if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
            if len(rest) == 2 and rest[0] == "paths-info" and method == "POST":
                return self._paths_info(repo_id, rest[1])
            if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
                return self._preupload(repo_id, rest[1], query)
            if len(rest) == 2 and rest[0] == "commit" and method == "POST":
                return self._commit(repo_id, rest[1], query)
            if len(rest) == 2 and rest[0] == "branch" and method == "POST":
                return self._branch(repo_id, rest[1])
            return False
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
        if len(parts) == 2 and parts[0] == "lfs-upload" and method == "PUT":
            return self._lfs_put(parts[1])
        if len(parts) == 2 and parts[0] == "lfs-verify" and method == "POST":
            self._body()
            if parts[1] in self.hub.lfs:
                self._json({"ok": True})
            else:
                self._error(404, None, "object not uploaded")
            return True
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return False

    # -- endpoints ------------------------------------------------------------------------------

    def _create_repo(self) -> bool:
        payload = json.loads(self._body() or b"{}")
        if not self._may_write():
            return True
        repo_id = f"{payload.get('organization')}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.hub.repos:
            self._json({"error": "You already created this model repo", "url": f"{self.base}/{repo_id}"}, 409)
            return True
        private = payload.get("private") is True or payload.get("visibility") == "private"
        repo = Repo(repo_id, private)
        repo.commit("main", {".gitattributes": File(GITATTRIBUTES, False)}, "initial commit")
        self.hub.repos[repo_id] = repo
        self._json({"url": f"{self.base}/{repo_id}", "name": repo_id})
        return True

    def _info(self, repo_id: str, revision: str) -> bool:
        repo = self._repo(repo_id)
        oid = repo and self._commit_of(repo, revision)
        if oid:
            files = repo.commits[oid]
            self._json({"id": repo_id, "modelId": repo_id, "sha": oid, "private": repo.private,
                        "siblings": [{"rfilename": p} for p in sorted(files)]})
        return True

    def _tree(self, repo_id: str, revision: str, prefix: str, query: dict) -> bool:
        repo = self._repo(repo_id)
        oid = repo and self._commit_of(repo, revision)
        if not oid:
            return True
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        base = prefix.rstrip("/") + "/" if prefix else ""
        entries, folders = [], set()
        for path, f in sorted(repo.commits[oid].items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest and not recursive:
                folders.add(base + rest.split("/")[0])
                continue
            entries.append(f.entry(path))
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(folders)]
        self._json(entries)
        return True

    def _paths_info(self, repo_id: str, revision: str) -> bool:
        form = parse_qs(self._body().decode())
        repo = self._repo(repo_id)
        oid = repo and self._commit_of(repo, revision)
        if oid:
            files = repo.commits[oid]
            self._json([files[p].entry(p) for p in form.get("paths", []) if p in files])
        return True

    def _preupload(self, repo_id: str, revision: str, query: dict) -> bool:
        payload = json.loads(self._body() or b"{}")
        repo = self._writable(repo_id)
        if repo is None:
            return True
        if query.get("create_pr"):
            revision = "main"
        oid = self._commit_of(repo, revision)
        if not oid:
            return True
        current = repo.commits[oid]
        out = []
        for f in payload.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            have = current.get(f["path"])
            out.append({"path": f["path"], "uploadMode": "lfs" if stored_as_lfs(f["path"], f["size"], sample) else "regular",
                        "shouldIgnore": False, "oid": have.etag if have else None})
        self._json({"files": out, "commitOid": oid})
        return True

    def _lfs_batch(self, repo_id: str) -> bool:
        payload = json.loads(self._body() or b"{}")
        if self._writable(repo_id) is None:
            return True
        objects = []
        for o in payload.get("objects", []):
            entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.hub.lfs:  # already there: no actions, nothing to send
                entry["actions"] = {"upload": {"href": f"{self.base}/lfs-upload/{o['oid']}", "header": {}},
                                    "verify": {"href": f"{self.base}/lfs-verify/{o['oid']}"}}
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")
        return True

    def _lfs_put(self, oid: str) -> bool:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            self._error(400, None, "content does not match its sha256")
            return True
        self.hub.lfs[oid] = data
        self.hub.uploaded[oid] += len(data)
        self._send(200)
        return True

    def _branch(self, repo_id: str, branch: str) -> bool:
        payload = json.loads(self._body() or b"{}")
        repo = self._writable(repo_id)
        if repo is None:
            return True
        if branch in repo.refs:
            self._error(409, None, "Reference already exists")
            return True
        start = self._commit_of(repo, payload.get("startingPoint") or "main")
        if start:
            repo.refs[branch] = start
            self._json({})
        return True

    def _commit(self, repo_id: str, revision: str, query: dict) -> bool:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        repo = self._writable(repo_id)
        if repo is None:
            return True
        self.hub.commit_calls += 1
        if self.hub.fail_commit_at is not None and self.hub.commit_calls == self.hub.fail_commit_at:
            # as a careless server might: the credential it was sent, echoed in the error's body
            self._json({"error": f"simulated failure; request was sent with {self.headers.get('Authorization')}"}, 500)
            return True
        pr = None
        if query.get("create_pr"):
            revision = "main"
        if not self._commit_of(repo, revision):
            return True
        files = dict(repo.commits[repo.refs.get(revision) or repo.resolve(revision)])
        if query.get("create_pr"):
            repo.prs += 1
            pr = repo.prs
            revision = f"refs/pr/{pr}"
            repo.refs[revision] = repo.refs["main"]
        header, changed = {}, []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = File(base64.b64decode(value["content"]), False)
                changed.append(value["path"])
            elif key == "lfsFile":
                data = self.hub.lfs.get(value["oid"])
                if data is None:
                    self._error(422, None, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    return True
                files[value["path"]] = File(data, True)
                changed.append(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
                changed.append(value["path"])
            else:
                self._error(400, None, f"unsupported commit operation {key}")
                return True
        oid = repo.commit(revision, files, header.get("summary", ""))
        self.hub.commits.append((repo_id, revision, changed))
        self._json({"success": True, "commitOid": oid, "commitUrl": f"{self.base}/{repo_id}/commit/{oid}",
                    "pullRequestUrl": f"{self.base}/{repo_id}/discussions/{pr}" if pr else None})
        return True

    def _resolve(self, repo_id: str, revision: str, path: str) -> bool:
        repo = self._repo(repo_id)
        oid = repo and self._commit_of(repo, revision)
        if not oid:
            return True
        f = repo.commits[oid].get(path)
        if f is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", {"X-Repo-Commit": oid})
            return True
        size = len(f.data)
        headers = {"X-Repo-Commit": oid, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.etag}"', "X-Linked-Size": str(size)})
        if self.command == "HEAD":
            self._send(200, b"", headers, "application/octet-stream", length=size)
            return True
        wanted = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted or "")
        if wanted and m:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if start >= size:
                self._error(416, None, "range not satisfiable", {"Content-Range": f"bytes */{size}"})
                return True
            body = f.data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self.hub.served[(repo_id, path)] += len(body)
            self._send(206, body, headers, "application/octet-stream")
            return True
        self.hub.served[(repo_id, path)] += size
        self.hub.full_gets[(repo_id, path)] += 1
        self._send(200, f.data, headers, "application/octet-stream")
        return True


class HubServer:
    """``with HubServer() as hub: ...`` serves on ``hub.url`` until the block ends."""

    def __init__(self, token: str | None = None):
        self.state = HubState(token)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self.state  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="test-hub", daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self, token: str | None = None) -> HubState:
        """Forget every repo, upload and counter (one server serves a whole test module)."""
        self.state = HubState(token)
        self._server.hub = self.state  # type: ignore[attr-defined]
        return self.state


def use_hub(monkeypatch, tmp_path: Path, url: str | None, token: str | None = None, offline: bool = False) -> Path:
    """Point ``huggingface_hub`` at ``url`` with a fresh cache, token store and push state under
    ``tmp_path``, through the environment (for subprocesses) and through its constants (it reads
    the environment once, at import). Returns the hub cache folder."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    env = {"HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "SURGERY_CACHE_DIR": str(tmp_path / "surgery-cache"), "NO_PROXY": "127.0.0.1,localhost"}
    if url is not None:
        env["HF_ENDPOINT"] = url
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    if url is not None:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    for name, value in {"HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": offline,
                        "HF_HUB_DISABLE_XET": True, "HF_TOKEN_PATH": str(home / "token"),
                        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
                        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json")}.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    return cache
