"""A small stand-in for the Hugging Face Hub that the real ``huggingface_hub`` client can talk to, for tests.

``HubServer`` runs a stdlib ``ThreadingHTTPServer`` on ``127.0.0.1`` (random free port) in a daemon thread and keeps
model repositories in memory. Point a *fresh* process at it with ``HF_ENDPOINT=server.url`` (the client reads the
endpoint when ``huggingface_hub`` is imported) and ``HF_TOKEN=<a token passed to HubServer(users=...)>``.
Checked against huggingface_hub 0.36 (requests/httpx) and 2.4 (httpx2): push and pull through ``transformers``
(4.57 and 5.x) and ``peft`` work unchanged.

Implemented (model repos only, ``/api/models/...``):

- ``GET /api/whoami-v2``; ``GET /api/agent-harnesses`` (an empty registry; 2.x asks for it to build its
  user agent); ``POST /api/repos/create`` (``private`` and ``visibility``, 409 when it exists);
  ``POST /api/validate-yaml`` (YAML front matter of a README: must parse to a mapping; a few fields are type-checked).
- ``GET /api/models/{repo}`` and ``.../revision/{rev}`` (repo info with ``sha`` and ``siblings``), ``.../refs``,
  ``.../tree/{rev}[/{path}]`` (the whole listing, no pagination).
- ``POST .../branch/{name}`` (from ``startingPoint`` or ``main``; 409 when it exists).
- ``POST .../preupload/{rev}``: every file is answered ``uploadMode: "regular"`` (with the git oid of the current
  file, so unchanged files are skipped), so the client sends contents base64-encoded inside the commit itself.
- ``POST .../commit/{rev}`` (ndjson ``header`` / ``file`` / ``deletedFile`` / ``deletedFolder``; ``parentCommit``;
  ``create_pr=1`` creates ``refs/pr/N``). A README whose metadata does not validate is refused, as on the Hub.
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}`` with the headers ``hf_hub_download`` needs: ``X-Repo-Commit``,
  ``ETag`` (the git blob sha1, as the Hub sends for non-LFS files) and ``Content-Length``; ``Range: bytes=N-``.
- Revisions: branch names, ``refs/pr/N`` and full commit oids. Auth: ``Authorization: Bearer <token>``; an unknown
  token is a 401 everywhere, private repos are invisible (404 ``RepoNotFound``) to anyone but their owner, writes need
  the owner's token (401 without a token, 403 in someone else's namespace).
- Errors carry the ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and
  ``X-Error-Message`` headers the client turns into ``RepositoryNotFoundError`` & co.

Not implemented (a request for any other route gets a 501 and is recorded in ``HubServer.unhandled``):
LFS (``lfsFile`` commit entries, the LFS batch API, multipart uploads), xet storage (no ``X-Xet-*`` headers are sent,
so clients with ``hf_xet`` installed download over plain HTTP), redirects to a CDN, datasets/spaces/buckets,
organizations, gated repos, tags, commit history (``list_repo_commits``), discussions and PR merges, repo deletion,
moves and settings, pagination, rate limits, the ``.gitignore`` logic of preupload (nothing is ever ignored), and
any persistence (everything lives in memory for the life of the server).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT_OID = re.compile(r"^[0-9a-f]{40}$")
_TIMESTAMP = "2025-01-01T00:00:00.000Z"
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as ETag and oid of non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An HTTP error answer, with the Hub's error headers."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name (incl. refs/pr/N) -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: int = 0

    @property
    def owner(self) -> str:
        return self.repo_id.split("/")[0]


class HubServer:
    """An in-memory Hub on ``127.0.0.1`` for the ``huggingface_hub`` client; use as a context manager.

    Args:
        users: token -> user name. Each user may write to their own namespace.
    """

    def __init__(self, users: dict[str, str] | None = None) -> None:
        self.users = dict(users or {"hf_test_token": "tester"})
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self.unhandled: list[str] = []  # requests for routes this server does not implement
        self._lock = threading.RLock()
        self._oids = itertools.count()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection helpers for tests ------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (branch name or commit oid)."""
        with self._lock:
            repo = self.repos[repo_id]
            return dict(repo.commits[self._resolve(repo, revision)].files)

    # -- state changes (called with the lock held) -------------------------------------------------------------------
    def _new_commit(self, repo: Repo, parent: str | None, summary: str, files: dict[str, bytes]) -> str:
        digest = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{summary}\0{next(self._oids)}".encode())
        for path in sorted(files):
            digest.update(f"\0{path}\0{git_blob_oid(files[path])}".encode())
        oid = digest.hexdigest()
        repo.commits[oid] = Commit(oid, parent, summary, files)
        return oid

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if _COMMIT_OID.match(revision) and revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer  # set on the per-server subclass

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        parts = [unquote(p) for p in split.path.split("/")[1:]]
        body = self._read_body()
        status = 500
        try:
            with self.hub._lock:
                status, headers, payload = self._route(method, parts, body)
        except HubError as err:
            status, headers, payload = err.status, {}, json.dumps({"error": err.message}).encode()
            headers["X-Error-Message"] = err.message
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["Content-Type"] = "application/json"
        except Exception as err:  # a bug in this server: answer 500 with the reason rather than hang the client
            status, headers, payload = 500, {"Content-Type": "text/plain"}, f"hub_server error: {err!r}".encode()
        self.hub.log.append((method, split.path, status))
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    @staticmethod
    def _json(data: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(data).encode()

    # -- auth -------------------------------------------------------------------------------------------------------
    def _user(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.hub.users:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.users[token]

    def _readable(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and self._user() != repo.owner):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str) -> Repo:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository: pass a token with write access")
        repo = self._readable(repo_id)
        if user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # -- routing ----------------------------------------------------------------------------------------------------
    def _route(self, method: str, parts: list[str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        if parts[:1] == ["api"]:
            api = parts[1:]
            if method == "GET" and api == ["agent-harnesses"]:  # huggingface_hub 2.x's user-agent registry
                return self._json({"standardEnvVars": [], "harnesses": {}})
            if method == "GET" and api == ["whoami-v2"]:
                return self._whoami()
            if method == "POST" and api == ["validate-yaml"]:
                errors = validate_card_metadata(json.loads(body or b"{}").get("content", ""))
                return self._json({"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)
            if method == "POST" and api == ["repos", "create"]:
                return self._create_repo(json.loads(body or b"{}"))
            if len(api) >= 3 and api[0] == "models":
                repo_id, rest = f"{api[1]}/{api[2]}", api[3:]
                if method == "GET" and not rest:
                    return self._repo_info(repo_id, "main")
                if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                    return self._repo_info(repo_id, rest[1])
                if method == "GET" and rest == ["refs"]:
                    return self._refs(repo_id)
                if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]))
                if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                    return self._create_branch(repo_id, rest[1], json.loads(body or b"{}"))
                if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                    return self._preupload(repo_id, rest[1], json.loads(body or b"{}"))
                if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                    return self._commit(repo_id, rest[1], body)
        elif method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve_file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        self.hub.unhandled.append(f"{method} {self.path}")
        raise HubError(501, f"tests/hub_server.py does not implement {method} {urlsplit(self.path).path}")

    # -- endpoints --------------------------------------------------------------------------------------------------
    def _whoami(self) -> tuple[int, dict[str, str], bytes]:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        return self._json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
            }
        )

    def _create_repo(self, payload: dict) -> tuple[int, dict[str, str], bytes]:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository: pass a token with write access")
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, "tests/hub_server.py only hosts model repos")
        name, namespace = payload.get("name", ""), payload.get("organization") or user
        if not _REPO_NAME.match(name):
            raise HubError(400, f"Invalid repo name: {name!r}")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._json({"error": "You already created this model repo", "url": url}, 409)
        private = payload.get("private")
        if private is None:
            private = payload.get("visibility") == "private"
        repo = Repo(repo_id, bool(private))
        repo.branches["main"] = self.hub._new_commit(repo, None, "initial commit", {".gitattributes": _GITATTRIBUTES})
        self.hub.repos[repo_id] = repo
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _repo_info(self, repo_id: str, revision: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._readable(repo_id)
        commit = repo.commits[self.hub._resolve(repo, revision)]
        card = _front_matter(commit.files.get("README.md", b"").decode("utf-8", "replace")) or {}
        card = card if isinstance(card, dict) else {}
        return self._json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo.owner,
                "sha": commit.oid,
                "lastModified": _TIMESTAMP,
                "createdAt": _TIMESTAMP,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": list(card.get("tags") or []),
                "pipeline_tag": card.get("pipeline_tag"),
                "library_name": card.get("library_name"),
                "cardData": card,
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        )

    def _refs(self, repo_id: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._readable(repo_id)
        include_prs = self.query.get("include_prs") in ("1", "true", "True")
        branches, prs = [], []
        for name, oid in sorted(repo.branches.items()):
            if name.startswith("refs/pr/"):
                prs.append({"name": name.removeprefix("refs/pr/"), "ref": name, "targetCommit": oid})
            else:
                branches.append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid})
        refs: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if include_prs:
            refs["pullRequests"] = prs
        return self._json(refs)

    def _tree(self, repo_id: str, revision: str, path: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._readable(repo_id)
        files = repo.commits[self.hub._resolve(repo, revision)].files
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        below = {p: data for p, data in files.items() if p.startswith(prefix)}
        if prefix and not below:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        recursive = self.query.get("recursive") in ("1", "true", "True")
        entries: dict[str, dict] = {}
        for full, data in sorted(below.items()):
            rel = full[len(prefix) :].split("/")
            for depth in range(1, len(rel)):  # the directories on the way
                directory = prefix + "/".join(rel[:depth])
                if (recursive or depth == 1) and directory not in entries:
                    entries[directory] = {"type": "directory", "oid": git_blob_oid(directory.encode()), "size": 0}
            if recursive or len(rel) == 1:
                entries[full] = {"type": "file", "oid": git_blob_oid(data), "size": len(data)}
        return self._json([{**entry, "path": p} for p, entry in entries.items()])

    def _create_branch(self, repo_id: str, branch: str, payload: dict) -> tuple[int, dict[str, str], bytes]:
        repo = self._writable(repo_id)
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = self.hub._resolve(repo, payload.get("startingPoint") or "main")
        return self._json({})

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> tuple[int, dict[str, str], bytes]:
        repo = self._writable(repo_id)
        files = repo.commits[self.hub._resolve(repo, revision)].files
        answer = []
        for item in payload.get("files", []):
            current = files.get(item["path"])
            answer.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(current) if current is not None else None,
                }
            )
        return self._json({"files": answer, "commitOid": repo.branches.get(revision)})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        repo = self._writable(repo_id)
        head = self.hub._resolve(repo, revision)
        header: dict = {}
        files = dict(repo.commits[head].files)
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(folder)}
            elif key == "lfsFile":
                raise HubError(400, "tests/hub_server.py does not implement LFS uploads (preupload says 'regular')")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        if not header.get("summary"):
            raise HubError(400, "A commit needs a summary")
        if header.get("parentCommit") not in (None, head):
            raise HubError(412, f"parentCommit {header['parentCommit']} is not the head of {revision}")
        if "README.md" in files and (errors := validate_card_metadata(files["README.md"].decode("utf-8", "replace"))):
            raise HubError(400, "Invalid metadata in README.md: " + "; ".join(errors))

        pr_url = None
        if self.query.get("create_pr") in ("1", "true", "True"):
            repo.pull_requests += 1
            revision = f"refs/pr/{repo.pull_requests}"
            pr_url = f"{self.hub.url}/{repo_id}/discussions/{repo.pull_requests}"
        oid = self.hub._new_commit(repo, head, header["summary"], files)
        if revision in repo.branches or revision.startswith("refs/pr/"):
            repo.branches[revision] = oid
        else:
            raise HubError(400, f"Cannot commit to {revision}: not a branch")
        return self._json(
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def _resolve_file(self, repo_id: str, revision: str, path: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._readable(repo_id)
        oid = self.hub._resolve(repo, revision)
        data = repo.commits[oid].files.get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_oid(data)}"',
            "X-Repo-Commit": oid,
            "Content-Length": str(len(data)),
        }
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and int(match.group(1)) <= len(data):
            start = int(match.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            headers["Content-Length"] = str(len(data) - start)
            return 206, headers, data[start:]
        return 200, headers, data


def _front_matter(text: str) -> Any:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    return yaml.safe_load(match.group(1)) if match else None


def validate_card_metadata(text: str) -> list[str]:
    """What the Hub would refuse in a README's YAML front matter (a small subset of its checks)."""
    try:
        meta = _front_matter(text)
    except yaml.YAMLError as err:
        return [f"YAML front matter does not parse: {err}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["YAML front matter must be a mapping"]
    errors = []
    for key in ("library_name", "pipeline_tag", "license"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "metrics", "language"):
        value = meta.get(key)
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            errors.append(f'"{key}" must be a string or a list of strings')
    base = meta.get("base_model")
    for model_id in [base] if isinstance(base, str) else base or []:
        if not isinstance(model_id, str) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model_id):
            errors.append(f'"base_model" with value {model_id!r} is not a valid model id')
    if "model-index" in meta and not isinstance(meta["model-index"], list):
        errors.append('"model-index" must be a list')
    return errors
