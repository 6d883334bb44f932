"""A small Hugging Face Hub for the tests: real HTTP on 127.0.0.1, spoken to by the unmodified huggingface_hub client.

The real Hub cannot be reached from the test machines and no installable local Hub accepts uploads, so this module
implements the part of the Hub's HTTP protocol that uploading a model and downloading it again use, as
huggingface_hub 2.x speaks it (read from its source: `hf_api.py`, `_commit_api.py`, `lfs.py`, `file_download.py`):

    POST /api/repos/create                               create_repo (409 when it exists)
    POST /api/validate-yaml                              the README.md metadata check before a commit
    GET  /api/whoami-v2                                  whoami
    GET  /api/agent-harnesses                            the registry the client fetches once a day (empty here)
    GET  /api/models/{repo}[/revision/{rev}]             model_info / repo_info (siblings with sizes and LFS info)
    POST /api/models/{repo}/branch/{branch}              create_branch
    POST /api/models/{repo}/preupload/{rev}              upload mode per file (regular or LFS) and remote oids
    POST /{repo}.git/info/lfs/objects/batch              LFS batch: upload actions only for objects not stored yet
    PUT  /lfs/{repo}/{oid}                               LFS basic transfer (the "S3" PUT), checked against sha256
    POST /lfs/{repo}/{oid}/verify                        LFS verify
    POST /api/models/{repo}/commit/{rev}[?create_pr=1]   the NDJSON commit (header, file, lfsFile, deletedFile...)
    GET  /api/models/{repo}/tree/{rev}[/{path}]          tree listing (list_repo_files, list_repo_tree)
    POST /api/models/{repo}/paths-info/{rev}             get_paths_info
    HEAD/GET /{repo}/resolve/{rev}/{path}                file download, with X-Repo-Commit, ETag and Range

Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) and `X-Error-Message`
headers, which is what huggingface_hub turns into its typed exceptions. Everything is held in memory. Tests inject
failures with `HubServer.fail(...)`: the next matching requests get the given status instead of being served.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# The .gitattributes the Hub puts in every new model repo: these patterns are stored with LFS.
LFS_PATTERNS = [
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
    "*.pth", "*.rar", "*.safetensors", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst",
    "*tfevents*",
]
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB with LFS whatever their name
RELATIONS = {"adapter", "merge", "quantized", "finetune"}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
REQUEST_TIMEOUT_S = 30  # a client that stops sending mid-request is dropped after this


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    lfs_sha256: str | None  # set for files stored with LFS

    @property
    def blob_id(self) -> str:
        """The git oid: of the content, or (for LFS) of the pointer file git stores instead."""
        return git_blob_sha1(self.pointer if self.lfs_sha256 else self.data)

    @property
    def pointer(self) -> bytes:
        spec = "version https://git-lfs.github.com/spec/v1"
        return f"{spec}\noid sha256:{self.lfs_sha256}\nsize {len(self.data)}\n".encode()

    @property
    def etag(self) -> str:
        return self.lfs_sha256 or git_blob_sha1(self.data)

    def info(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": path, "size": len(self.data), "oid": self.blob_id}
        if self.lfs_sha256:
            entry["lfs"] = {"oid": self.lfs_sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, StoredFile]
    title: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content, uploaded but maybe uncommitted
    pull_requests: int = 0

    def resolve(self, revision: str) -> Commit | None:
        oid = self.refs.get(revision, revision)
        return self.commits.get(oid)


@dataclass
class Failure:
    method: str
    path: re.Pattern[str]
    status: int
    times: int
    headers: dict[str, str]
    message: str
    body_contains: bytes | None


class HubError(Exception):
    """Raised inside a handler: becomes an HTTP error response in the Hub's format."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubState:
    """Users, tokens, repos, LFS objects, and the log of requests served. All access under `lock`."""

    def __init__(self, tokens: dict[str, str]):
        self.lock = threading.RLock()
        self.tokens = dict(tokens)  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.failures: list[Failure] = []
        self.log: list[tuple[str, str, int]] = []  # (method, path, status)

    def user(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, StoredFile], title: str) -> Commit:
        commit = Commit(uuid.uuid4().hex + uuid.uuid4().hex[:8], parent, files, title,
                        datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"))
        repo.commits[commit.oid] = commit
        return commit


class HubServer:
    """The server, on a free port of 127.0.0.1, serving from a background thread until `close()`."""

    def __init__(self, tokens: dict[str, str]):
        self.state = HubState(tokens)
        handler = type("BoundHandler", (HubHandler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        handler.base_url = self.url
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fail(self, method: str, path_regex: str, status: int, *, times: int = 1, message: str = "injected failure",
             headers: dict[str, str] | None = None, body_contains: str | None = None) -> None:
        """Answer the next `times` requests matching method, path (a regex searched in the path) and, if given, a
        string in the body, with `status` (and the headers, e.g. X-Error-Code) instead of serving them."""
        with self.state.lock:
            self.state.failures.append(Failure(method, re.compile(path_regex), status, times, headers or {}, message,
                                               body_contains.encode() if body_contains else None))

    def clear_failures(self) -> None:
        with self.state.lock:
            self.state.failures.clear()

    @contextmanager
    def recording(self) -> Iterator[list[tuple[str, str, int]]]:
        """The requests served inside the block, as (method, path, status)."""
        with self.state.lock:
            start = len(self.state.log)
        seen: list[tuple[str, str, int]] = []
        yield seen
        with self.state.lock:
            seen.extend(self.state.log[start:])

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision, as the server stores them."""
        with self.state.lock:
            commit = self.state.repos[repo_id].resolve(revision)
            assert commit is not None, f"{repo_id} has no revision {revision}"
            return {path: stored.data for path, stored in commit.files.items()}

    def refs(self, repo_id: str) -> dict[str, str]:
        with self.state.lock:
            return dict(self.state.repos[repo_id].refs)


_REPO = r"(?P<repo>[^/]+/[^/]+?)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), name)
    for method, pattern, name in [
        ("POST", r"^/api/repos/create$", "create_repo"),
        ("POST", r"^/api/validate-yaml$", "validate_yaml"),
        ("GET", r"^/api/whoami-v2$", "whoami"),
        ("GET", r"^/api/agent-harnesses$", "agent_harnesses"),
        ("GET", rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$", "model_info"),
        ("POST", rf"^/api/models/{_REPO}/branch/(?P<branch>[^/]+)$", "create_branch"),
        ("POST", rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$", "preupload"),
        ("POST", rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$", "commit"),
        ("GET", rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$", "tree"),
        ("POST", rf"^/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)$", "paths_info"),
        ("POST", rf"^/{_REPO}\.git/info/lfs/objects/batch$", "lfs_batch"),
        ("PUT", rf"^/lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})$", "lfs_put"),
        ("POST", rf"^/lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})/verify$", "lfs_verify"),
        ("GET", rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
        ("HEAD", rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
    ]
]


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response has a Content-Length
    timeout = REQUEST_TIMEOUT_S
    state: HubState
    base_url: str

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr logging
        pass

    # ------------------------------------------------------------------------------------------------ plumbing

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.body = self._read_body()
        status = 500
        try:
            injected = self._injected_failure(method, url.path)
            if injected:
                raise injected
            for route_method, pattern, name in _ROUTES:
                match = pattern.match(url.path)
                if match and route_method == method:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    status = getattr(self, name)(**params)
                    break
            else:
                raise HubError(404, f"no route for {method} {url.path}")
        except HubError as e:
            status = e.status
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            headers.update(getattr(e, "extra_headers", {}))
            self._send(e.status, {"error": e.message}, headers)
        except Exception as e:  # a bug here, or a request it cannot parse: answer, so the client reports it
            status = 500
            self._send(500, {"error": f"test Hub error: {type(e).__name__}: {e}"})
        finally:
            with self.state.lock:
                self.state.log.append((method, url.path, status))

    def _injected_failure(self, method: str, path: str) -> HubError | None:
        with self.state.lock:
            for failure in self.state.failures:
                if (failure.times > 0 and failure.method == method and failure.path.search(path)
                        and (failure.body_contains is None or failure.body_contains in self.body)):
                    failure.times -= 1
                    error = HubError(failure.status, failure.message, failure.headers.get("X-Error-Code"))
                    error.extra_headers = failure.headers  # type: ignore[attr-defined]
                    return error
        return None

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None, *,
              raw: bytes | None = None, content_type: str = "application/json") -> int:
        body = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def _json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as e:
            raise HubError(400, f"body is not JSON: {e}") from None

    def _user(self, required: bool) -> str | None:
        user = self.state.user(self.headers.get("Authorization"))
        if required and user is None:
            raise HubError(401, "You must be authenticated to access this resource.")
        return user

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user(required=write)
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and repo_id.split("/")[0] != user):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and repo_id.split("/")[0] != user:
            raise HubError(403, "You don't have the rights to write to this repository")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------------------------------------ endpoints

    def whoami(self) -> int:
        user = self._user(required=True)
        return self._send(200, {"type": "user", "name": user, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def agent_harnesses(self) -> int:
        return self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def create_repo(self) -> int:
        user = self._user(required=True)
        body = self._json()
        namespace = body.get("organization") or user
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        if body.get("type", "model") != "model":
            raise HubError(400, "this test Hub only hosts models")
        repo_id = f"{namespace}/{body['name']}"
        if not REPO_ID.match(repo_id):
            raise HubError(400, f"{repo_id!r} is not a valid repo name")
        with self.state.lock:
            if repo_id in self.state.repos:  # the Hub's 409 carries the url: create_repo(exist_ok=True) returns it
                message = "You already created this model repo"
                return self._send(409, {"error": message, "url": f"{self.base_url}/{repo_id}"},
                                  {"X-Error-Message": message})
            repo = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
            initial = self.state.new_commit(repo, None, {".gitattributes": StoredFile(GITATTRIBUTES, None)},
                                            "initial commit")
            repo.refs["main"] = initial.oid
            self.state.repos[repo_id] = repo
        return self._send(200, {"url": f"{self.base_url}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex})

    def validate_yaml(self) -> int:
        body = self._json()
        errors = [{"message": m} for m in validate_card_metadata(body.get("content", ""))]
        return self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def model_info(self, repo: str, rev: str = "main") -> int:
        hosted = self._repo(repo)
        commit = self._commit(hosted, rev)
        card = card_metadata(commit.files.get("README.md"))
        return self._send(200, {
            "id": repo, "modelId": repo, "sha": commit.oid, "private": hosted.private, "lastModified": commit.date,
            "tags": card.get("tags", []), "library_name": card.get("library_name"),
            "pipeline_tag": card.get("pipeline_tag"), "cardData": card,
            "siblings": [
                {"rfilename": p, "size": len(f.data), "blobId": f.blob_id,
                 **({"lfs": {"sha256": f.lfs_sha256, "size": len(f.data), "pointerSize": len(f.pointer)}}
                    if f.lfs_sha256 else {})}
                for p, f in sorted(commit.files.items())
            ],
        })

    def create_branch(self, repo: str, branch: str) -> int:
        hosted = self._repo(repo, write=True)
        start = self._json().get("startingPoint") or "main"
        with self.state.lock:
            if branch in hosted.refs:
                raise HubError(409, f"Branch {branch} already exists")
            hosted.refs[branch] = self._commit(hosted, start).oid
        return self._send(200, {})

    def preupload(self, repo: str, rev: str) -> int:
        hosted = self._repo(repo, write=True)
        commit = self._commit(hosted, "main" if self.query.get("create_pr") else rev)
        answers = []
        for item in self._json().get("files", []):
            sample = base64.b64decode(item["sample"])
            lfs = (any(fnmatch(item["path"].rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)
                   or item["size"] >= LFS_SIZE_THRESHOLD or _is_binary(sample))
            existing = commit.files.get(item["path"])
            answers.append({
                "path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                "oid": (existing.etag if existing else None),
            })
        return self._send(200, {"files": answers, "commitOid": commit.oid})

    def lfs_batch(self, repo: str) -> int:
        hosted = self._repo(repo, write=True)
        body = self._json()
        if body.get("operation") != "upload":
            raise HubError(400, "only uploads are supported")
        objects = []
        for obj in body.get("objects", []):
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            with self.state.lock:
                stored = obj["oid"] in hosted.lfs_objects
            if not stored:  # already stored: no actions, the client skips the upload (what makes a re-run resume)
                href = f"{self.base_url}/lfs/{repo}/{obj['oid']}"
                entry["authenticated"] = True
                entry["actions"] = {"upload": {"href": href, "header": {}}, "verify": {"href": f"{href}/verify"}}
            objects.append(entry)
        return self._send(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def lfs_put(self, repo: str, oid: str) -> int:
        """The storage PUT: like a presigned S3 URL, it carries no token (the batch call that handed it out did)."""
        hosted = self.state.repos.get(repo)
        if hosted is None:
            raise HubError(404, "no such upload location")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256")
        with self.state.lock:
            hosted.lfs_objects[oid] = self.body
        return self._send(200, {})

    def lfs_verify(self, repo: str, oid: str) -> int:
        hosted = self._repo(repo, write=True)
        body = self._json()
        with self.state.lock:
            stored = hosted.lfs_objects.get(oid)
        if stored is None or len(stored) != body.get("size"):
            raise HubError(404, f"object {oid} was not uploaded")
        return self._send(200, {})

    def commit(self, repo: str, rev: str) -> int:
        hosted = self._repo(repo, write=True)
        if self.headers.get("Content-Type") != "application/x-ndjson":
            raise HubError(400, "a commit is sent as application/x-ndjson")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first line of a commit must be its header")
        header = lines[0]["value"]
        with self.state.lock:
            base = self._commit(hosted, rev)
            if rev not in hosted.refs:  # a commit id, not a branch: the Hub commits to branches only
                raise HubError(404, f"Invalid rev id: {rev} is not a branch", "RevisionNotFound")
            if header.get("parentCommit") and not base.oid.startswith(header["parentCommit"]):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(base.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"]
                if key == "file":
                    files[path] = StoredFile(base64.b64decode(value["content"]), None)
                elif key == "lfsFile":
                    data = hosted.lfs_objects.get(value["oid"])
                    if data is None:
                        raise HubError(422, f"LFS object {value['oid']} of {path} was never uploaded")
                    files[path] = StoredFile(data, value["oid"])
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    files = {p: f for p, f in files.items() if not p.startswith(path.rstrip("/") + "/")}
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            commit = self.state.new_commit(hosted, base.oid, files, header.get("summary", ""))
            pr_url = None
            if self.query.get("create_pr"):
                hosted.pull_requests += 1
                hosted.refs[f"refs/pr/{hosted.pull_requests}"] = commit.oid
                pr_url = f"{self.base_url}/{repo}/discussions/{hosted.pull_requests}"
            else:
                hosted.refs[rev] = commit.oid
        return self._send(200, {"commitUrl": f"{self.base_url}/{repo}/commit/{commit.oid}", "commitOid": commit.oid,
                                "pullRequestUrl": pr_url, "success": True})

    def tree(self, repo: str, rev: str, path: str = "") -> int:
        commit = self._commit(self._repo(repo), rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        recursive = self.query.get("recursive", "false").lower() in ("true", "1")
        entries: dict[str, dict[str, Any]] = {}
        for file_path, stored in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, _folder(folder))
            if recursive or len(parts) == 1:
                entries[file_path] = stored.info(file_path)
        return self._send(200, list(entries.values()))

    def paths_info(self, repo: str, rev: str) -> int:
        commit = self._commit(self._repo(repo), rev)
        wanted = parse_qs(self.body.decode()).get("paths", [])
        found = []
        for path in wanted:
            if path in commit.files:
                found.append(commit.files[path].info(path))
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                found.append(_folder(path))
        return self._send(200, found)

    def resolve(self, repo: str, rev: str, path: str) -> int:
        commit = self._commit(self._repo(repo), rev)
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{stored.etag}"', "Accept-Ranges": "bytes"}
        data, status = stored.data, 200
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start = int(ranged.group(1))
            end = int(ranged.group(2)) if ranged.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        return self._send(status, raw=data, headers=headers, content_type="application/octet-stream")


def _folder(path: str) -> dict[str, Any]:
    return {"type": "directory", "path": path, "oid": git_blob_sha1(path.encode()), "size": 0}


def _is_binary(sample: bytes) -> bool:
    if b"\0" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(sample) - 3  # a multi-byte character cut by the 512-byte sample is still text
    return False


def card_metadata(readme: StoredFile | None) -> dict[str, Any]:
    if readme is None:
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.data.decode("utf-8", "replace"), re.S)
    try:
        data = yaml.safe_load(match.group(1)) if match else {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def validate_card_metadata(content: str) -> list[str]:
    """The Hub's README.md metadata rules this server enforces (a subset of the real Hub's, written independently
    of llm-retrofit's own checks so that the two can disagree)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
    if not match:
        return []  # no metadata block: the Hub accepts it (with a warning)
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as e:
        return [f"metadata is not valid YAML: {e}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    base_models = data.get("base_model")
    for base in [base_models] if isinstance(base_models, str) else base_models or []:
        if not (isinstance(base, str) and REPO_ID.match(base)):
            errors.append(f'"base_model" must be a valid model id, got {base!r}')
    relation = data.get("base_model_relation")
    if relation is not None:
        if relation not in RELATIONS:
            errors.append(f'"base_model_relation" must be one of {sorted(RELATIONS)}, got {relation!r}')
        if not base_models:
            errors.append('"base_model_relation" needs "base_model"')
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        errors.append('"tags" must be a list of strings')
    for key in ("library_name", "pipeline_tag", "license"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    for entry in data.get("model-index", []) or []:
        results = entry.get("results") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not entry.get("name") or not isinstance(results, list):
            errors.append('"model-index" entries need a "name" and a list of "results"')
            continue
        for result in results:
            if not isinstance(result, dict):
                errors.append('"model-index" results must be mappings')
                continue
            metrics, dataset = result.get("metrics"), result.get("dataset", {})
            if not (result.get("task", {}).get("type") and dataset.get("type") and dataset.get("name")
                    and isinstance(metrics, list)):
                errors.append('"model-index" results need task.type, dataset.type, dataset.name and metrics')
                continue
            for metric in metrics:
                value = metric.get("value") if isinstance(metric, dict) else None
                if not (isinstance(metric, dict) and metric.get("type") and isinstance(value, (int, float))):
                    errors.append('"model-index" metrics need a type and a numeric value')
    return errors
