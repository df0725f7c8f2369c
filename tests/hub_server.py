"""A local Hugging Face Hub-compatible HTTP server for tests (stdlib only).

It speaks the part of the Hub API that the real ``huggingface_hub`` client (1.33, ``HF_HUB_DISABLE_XET=1``)
uses to create repos, commit (regular files inline, large files through git-LFS "basic" uploads), branch, tag,
list and download, so push and resume code can be tested offline against the real client instead of a mock. Commits are
real immutable snapshots; test hooks inject failures, slow the server down and corrupt stored bytes.

Run by hand with ``python tests/hub_server.py --port 0``; it prints its URL.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# Files the Hub stores through git-LFS: known binary extensions (the Hub's default .gitattributes), anything
# over 10 MiB, and content whose first bytes contain a NUL (the Hub sniffs the preupload sample the same way).
LFS_EXTENSIONS = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".gz", ".h5", ".joblib", ".model", ".msgpack", ".npy", ".npz",
    ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth", ".safetensors", ".tar", ".tflite",
    ".tgz", ".xz", ".zip", ".zst",
)  # fmt: skip
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
GITATTRIBUTES = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_EXTENSIONS).encode()

_URL_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_REPO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(.*))?$")
_LFS_BATCH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)\.git/info/lfs/objects/batch$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_LFS_UPLOAD = re.compile(r"^/_lfs-upload/([0-9a-f]{32})$")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def _now() -> str:
    """Hub timestamp format, the only one `huggingface_hub.utils.parse_datetime` accepts."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _git_blob_oid(data: bytes) -> str:
    """Git blob id, which the client compares with preupload's `oid` to skip unchanged regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class _Entry:
    """One file of a snapshot; its bytes live in the repo's blob store under `sha256`."""

    sha256: str
    size: int
    lfs: bool
    oid: str  # git blob id the Hub reports: of the content (regular) or of the LFS pointer (lfs)

    @classmethod
    def regular(cls, data: bytes) -> _Entry:
        return cls(hashlib.sha256(data).hexdigest(), len(data), False, _git_blob_oid(data))

    @classmethod
    def large(cls, sha256: str, size: int) -> _Entry:
        return cls(sha256, size, True, _git_blob_oid(_lfs_pointer(sha256, size)))

    @property
    def etag(self) -> str:
        """What the Hub sends as (X-Linked-)ETag and as preupload `oid`: sha256 for LFS, git id otherwise."""
        return self.sha256 if self.lfs else self.oid

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True)
class CommitRecord:
    """A commit as tests see it: where it landed and which paths it added/changed and removed."""

    id: str
    parent: str | None
    branch: str
    summary: str
    description: str
    added: tuple[str, ...]
    deleted: tuple[str, ...]
    date: str


@dataclass(frozen=True)
class _Commit:
    record: CommitRecord
    tree: dict[str, _Entry]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    blobs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> bytes, as the Hub's storage would hold
    commits: dict[str, _Commit] = field(default_factory=dict)  # insertion order = creation order
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # name -> commit id; a tag never moves

    def resolve(self, revision: str) -> _Commit:
        """A branch name, a tag or any full commit id of this repo, like the Hub accepts everywhere."""
        commit = self.commits.get(self.branches.get(revision) or self.tags.get(revision, revision))
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def add_commit(
        self,
        branch: str,
        summary: str,
        description: str,
        tree: dict[str, _Entry],
        added: list[str],
        deleted: list[str],
    ) -> _Commit:
        parent = self.branches.get(branch)
        seed = json.dumps([parent, branch, summary, sorted((p, e.oid) for p, e in tree.items()), len(self.commits)])
        oid = hashlib.sha1(f"{seed}{time.time_ns()}".encode()).hexdigest()
        record = CommitRecord(oid, parent, branch, summary, description, tuple(added), tuple(deleted), _now())
        commit = _Commit(record, tree)
        self.commits[oid] = commit
        self.branches[branch] = oid
        return commit


class _HubError(Exception):
    """An error answered like the Hub's: JSON body plus X-Error-Code/-Message, for typed client errors."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {message}")
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}

    def reply(self) -> _Reply:
        headers = {
            "X-Error-Message": self.message.encode("ascii", "backslashreplace").decode(),
            **self.headers,
        }
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return _Reply.json({"error": self.message}, self.status, headers)


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Reply:
        return cls(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None
    range: str | None
    body: bytes
    alive: Callable[[], bool]  # false once the server that received it was stopped

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as exc:
            raise _HubError(400, f"Invalid JSON body: {exc}") from exc


@dataclass
class _Fault:
    remaining: int
    status: int
    match: str | None


class _Api:
    """Hub state and endpoint logic; state access holds `lock` (the client talks from several threads)."""

    def __init__(self, token: str, user: str) -> None:
        self.token, self.user = token, user
        self.base_url = ""
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], _Repo] = {}
        # LFS upload href nonce -> (repo key, sha256, size) announced in the batch request
        self.uploads: dict[str, tuple[tuple[str, str], str, int]] = {}
        self.faults: list[_Fault] = []
        self.commit_delay = 0.0
        self.upload_delay = 0.0
        self.log: list[tuple[str, str]] = []

    def repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def repo_url(self, repo: _Repo) -> str:
        return f"{self.base_url}/{_URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def handle(self, req: _Request) -> _Reply:
        with self.lock:
            self.log.append((req.method, req.path))
            fault = next((f for f in self.faults if f.match is None or f.match in f"{req.method} {req.path}"), None)
            if fault is not None:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self.faults.remove(fault)
        if fault is not None:
            raise _HubError(fault.status, f"Injected failure ({fault.status})")
        if req.authorization is not None and req.authorization != f"Bearer {self.token}":
            raise _HubError(401, INVALID_CREDENTIALS)
        return self._route(req)

    def _route(self, req: _Request) -> _Reply:
        method, path = req.method, req.path
        fixed = {
            ("GET", "/api/whoami-v2"): self._whoami,
            ("POST", "/api/repos/create"): self._create_repo,
            ("POST", "/api/validate-yaml"): self._validate_yaml,
        }
        if (method, path) in fixed:
            return fixed[(method, path)](req)
        if method == "PUT" and (m := _LFS_UPLOAD.match(path)):
            return self._lfs_upload(req, m[1])
        if method == "POST" and (m := _LFS_BATCH.match(path)):
            return self._lfs_batch(req, _URL_TYPES[m[1] or "models"], f"{unquote(m[2])}/{unquote(m[3])}")
        if method in ("GET", "HEAD") and (m := _RESOLVE.match(path)):
            repo_id = f"{unquote(m[2])}/{unquote(m[3])}"
            return self._resolve(req, _URL_TYPES[m[1] or "models"], repo_id, unquote(m[4]), unquote(m[5]))
        if m := _API_REPO.match(path):
            return self._route_repo_api(req, _URL_TYPES[m[1]], f"{unquote(m[2])}/{unquote(m[3])}", m[4])
        raise _HubError(404, f"{method} {path} is not implemented by the test hub server")

    def _route_repo_api(self, req: _Request, repo_type: str, repo_id: str, rest: str | None) -> _Reply:
        """/api/{models,datasets,spaces}/NAMESPACE/NAME[/REST]: REST is an action and its arguments."""
        method = req.method
        action, *args = [unquote(part) for part in rest.split("/")] if rest else [""]
        if method == "GET" and (action == "" and not args or action == "revision" and len(args) == 1):
            return self._repo_info(req, repo_type, repo_id, args[0] if args else "main")
        if method == "POST" and action == "preupload" and len(args) == 1:
            return self._preupload(req, repo_type, repo_id, args[0])
        if method == "POST" and action == "commit" and len(args) == 1:
            return self._commit(req, repo_type, repo_id, args[0])
        if method == "GET" and action == "tree" and args:
            return self._tree(req, repo_type, repo_id, args[0], "/".join(args[1:]).strip("/"))
        if method == "GET" and action == "refs" and not args:
            return self._refs(req, repo_type, repo_id)
        if method == "POST" and action == "branch" and len(args) == 1:
            return self._create_branch(req, repo_type, repo_id, args[0])
        if method == "POST" and action == "tag" and len(args) == 1:
            return self._create_tag(req, repo_type, repo_id, args[0])
        if method == "DELETE" and action == "tag" and len(args) == 1:
            return self._delete_tag(req, repo_type, repo_id, args[0])
        raise _HubError(404, f"{method} {req.path} is not implemented by the test hub server")

    def _validate_yaml(self, req: _Request) -> _Reply:
        """The README.md metadata check huggingface_hub runs before committing a README: its front matter must be
        a YAML mapping (the Hub also checks known keys; a model card of ours uses only those)."""
        content = req.json().get("content", "")
        front = content.split("---")[1] if content.startswith("---") and content.count("---") >= 2 else ""
        try:
            metadata = yaml.safe_load(front) if front.strip() else {}
        except yaml.YAMLError as error:
            return _Reply.json({"errors": [{"message": f"Invalid YAML: {error}"}]}, status=400)
        if not isinstance(metadata, dict):
            return _Reply.json({"errors": [{"message": "The metadata must be a YAML mapping"}]}, status=400)
        return _Reply.json({"warnings": [] if metadata else [{"message": "empty or missing yaml metadata"}]})

    def _require_auth(self, req: _Request) -> None:
        """Writes need a token (a wrong one was already refused); anonymous reads are allowed."""
        if req.authorization is None:
            raise _HubError(401, "You must be authenticated to perform this action")

    def _whoami(self, req: _Request) -> _Reply:
        self._require_auth(req)
        access_token = {"displayName": "test", "role": "write"}
        return _Reply.json(
            {
                "type": "user",
                "id": hashlib.sha1(self.user.encode()).hexdigest()[:24],
                "name": self.user,
                "fullname": self.user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": access_token},
            }
        )

    def _create_repo(self, req: _Request) -> _Reply:
        self._require_auth(req)
        payload = req.json()
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIXES or not payload.get("name"):
            raise _HubError(400, f"Invalid repo type or name: {payload!r}")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        with self.lock:
            existing = self.repos.get((repo_type, repo_id))
            if existing is not None:
                message = f"You already created this {repo_type} repo"
                return _Reply.json(
                    {"error": message, "url": self.repo_url(existing)}, 409, {"X-Error-Message": message}
                )
            repo = _Repo(repo_type, repo_id, private, _now())
            self.repos[(repo_type, repo_id)] = repo
            repo.blobs[_Entry.regular(GITATTRIBUTES).sha256] = GITATTRIBUTES
            tree = {".gitattributes": _Entry.regular(GITATTRIBUTES)}
            repo.add_commit("main", "initial commit", "", tree, [".gitattributes"], [])
            return _Reply.json({"url": self.repo_url(repo), "name": repo_id})

    def _repo_info(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Reply:
        with_blobs = req.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        with self.lock:
            repo = self.repo(repo_type, repo_id)
            commit = repo.resolve(revision)
            siblings = []
            for path, entry in sorted(commit.tree.items()):
                sibling: dict[str, Any] = {"rfilename": path}
                if with_blobs:
                    sibling.update(size=entry.size, blobId=entry.oid)
                    if entry.lfs:
                        lfs = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
                        sibling["lfs"] = lfs
                siblings.append(sibling)
            return _Reply.json(
                {
                    "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                    "id": repo_id,
                    "author": repo_id.split("/")[0],
                    "sha": commit.record.id,
                    "lastModified": commit.record.date,
                    "createdAt": repo.created_at,
                    "private": repo.private,
                    "disabled": False,
                    "gated": False,
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                    "siblings": siblings,
                }
            )

    def _preupload(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Reply:
        self._require_auth(req)
        files = req.json().get("files", [])
        with self.lock:
            commit = self.repo(repo_type, repo_id).resolve(revision)
            answers = []
            for item in files:
                path, size = item["path"], int(item["size"])
                lfs = (
                    size > LFS_SIZE_THRESHOLD
                    or path.lower().endswith(LFS_EXTENSIONS)
                    or b"\0" in base64.b64decode(item.get("sample", ""))
                )
                answer = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                if path in commit.tree:
                    answer["oid"] = commit.tree[path].etag
                answers.append(answer)
            return _Reply.json({"files": answers, "commitOid": commit.record.id})

    def _lfs_batch(self, req: _Request, repo_type: str, repo_id: str) -> _Reply:
        self._require_auth(req)
        payload = req.json()
        if payload.get("operation") != "upload":
            raise _HubError(400, "Only LFS uploads go through the batch API of the test hub server")
        with self.lock:
            repo = self.repo(repo_type, repo_id)
            objects: list[dict[str, Any]] = []
            for obj in payload.get("objects", []):
                oid, size = str(obj.get("oid")), obj.get("size")
                if not (_SHA256.fullmatch(oid) and isinstance(size, int) and size >= 0):
                    error = {"code": 422, "message": "oid must be a sha256 hex digest, size an int >= 0"}
                    objects.append({"oid": oid, "size": size if isinstance(size, int) else -1, "error": error})
                elif oid in repo.blobs and len(repo.blobs[oid]) == size:
                    objects.append({"oid": oid, "size": size})  # stored already: no actions, no upload
                else:
                    nonce = secrets.token_hex(16)
                    self.uploads[nonce] = ((repo_type, repo_id), oid, size)
                    upload = {"href": f"{self.base_url}/_lfs-upload/{nonce}", "expires_in": 3600}
                    actions = {"upload": upload}
                    objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        return _Reply.json(
            {"transfer": "basic", "objects": objects},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_upload(self, req: _Request, nonce: str) -> _Reply:
        """Stand-in for a presigned URL: the nonce authorizes it, since the client sends no Authorization."""
        with self.lock:
            target = self.uploads.get(nonce)
            delay = self.upload_delay
        if target is None:
            raise _HubError(403, "Unknown or expired upload URL")
        key, oid, size = target
        if len(req.body) != size or hashlib.sha256(req.body).hexdigest() != oid:
            raise _HubError(400, f"Uploaded content does not match sha256 {oid} and size {size}")
        time.sleep(delay)
        with self.lock:
            if not req.alive():
                raise _HubError(503, "Server stopped during the upload")
            self.repo(*key).blobs[oid] = req.body
        return _Reply(200)

    def _commit(self, req: _Request, repo_type: str, repo_id: str, branch: str) -> _Reply:
        self._require_auth(req)
        if req.query.get("create_pr"):
            raise _HubError(400, "Pull requests are not supported by the test hub server")
        try:
            lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        except ValueError as exc:
            raise _HubError(400, f"Invalid NDJSON commit payload: {exc}") from exc
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "The commit payload must start with a header line")
        header, operations = lines[0]["value"], lines[1:]
        staged = {
            op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in operations if op["key"] == "file"
        }
        with self.lock:
            self.repo(repo_type, repo_id)  # fail fast, before any delay
            delay = self.commit_delay
        time.sleep(delay)
        with self.lock:
            if not req.alive():
                raise _HubError(503, "Server stopped during the commit")
            repo = self.repo(repo_type, repo_id)
            if branch not in repo.branches:
                repo.resolve(branch)  # 404 RevisionNotFound unless it is a commit id
                raise _HubError(400, f"Cannot commit to {branch}: not a branch")
            head = repo.commits[repo.branches[branch]]
            if header.get("parentCommit") not in (None, head.record.id):
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            tree, added, deleted = self._apply(repo, dict(head.tree), operations, staged)
            for data in staged.values():
                repo.blobs[hashlib.sha256(data).hexdigest()] = data
            commit = repo.add_commit(
                branch, header.get("summary", ""), header.get("description", ""), tree, added, deleted
            )
            oid = commit.record.id
            return _Reply.json({"success": True, "commitOid": oid, "commitUrl": f"{self.repo_url(repo)}/commit/{oid}"})

    @staticmethod
    def _apply(
        repo: _Repo, tree: dict[str, _Entry], operations: list[dict[str, Any]], staged: dict[str, bytes]
    ) -> tuple[dict[str, _Entry], list[str], list[str]]:
        """Apply commit operations in order to a copy of the parent tree, tracking what tests assert on."""
        added: dict[str, None] = {}
        deleted: dict[str, None] = {}
        for op in operations:
            for p, entry in _Api._touched(repo, tree, op, staged).items():
                if entry is None:
                    del tree[p]
                    added.pop(p, None)
                    deleted[p] = None
                else:
                    tree[p] = entry
                    deleted.pop(p, None)
                    added[p] = None
        return tree, list(added), list(deleted)

    @staticmethod
    def _touched(
        repo: _Repo, tree: dict[str, _Entry], op: dict[str, Any], staged: dict[str, bytes]
    ) -> dict[str, _Entry | None]:
        """The paths one commit operation sets (to their new entry) or deletes (None)."""
        key, path = op.get("key"), op.get("value", {}).get("path", "")
        if key == "file":
            return {path: _Entry.regular(staged[path])}
        if key == "lfsFile":
            oid = op["value"].get("oid", "")
            data = repo.blobs.get(oid)
            if data is None or op["value"].get("size", len(data)) != len(data):
                raise _HubError(400, f"LFS object {oid} for {path} was not uploaded")
            return {path: _Entry.large(oid, len(data))}
        if key == "deletedFile":
            if path not in tree:
                raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            return {path: None}
        if key == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            touched: dict[str, _Entry | None] = {p: None for p in tree if p.startswith(prefix)}
            if not touched:
                raise _HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            return touched
        raise _HubError(400, f"Unsupported commit operation: {key}")

    def _tree(self, req: _Request, repo_type: str, repo_id: str, revision: str, base: str) -> _Reply:
        recursive = req.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{base}/" if base else ""
        with self.lock:
            tree = self.repo(repo_type, repo_id).resolve(revision).tree
        files = {p[len(prefix) :]: e for p, e in tree.items() if p.startswith(prefix)}
        if base and not files:
            raise _HubError(404, f"{base} does not exist on {revision}", "EntryNotFound")
        folders = {rel.rsplit("/", 1)[0] for rel in files if "/" in rel}
        folders |= {parent for folder in folders for parent in _parents(folder)}
        if not recursive:
            files = {rel: e for rel, e in files.items() if "/" not in rel}
            folders = {rel for rel in folders if "/" not in rel}
        listing: list[dict[str, Any]] = []
        for rel in sorted(folders):
            inner = sorted((p, e.oid) for p, e in tree.items() if p.startswith(f"{prefix}{rel}/"))
            oid = hashlib.sha1(json.dumps(inner).encode()).hexdigest()
            listing.append({"type": "directory", "oid": oid, "size": 0, "path": prefix + rel})
        for rel, entry in sorted(files.items()):
            item: dict[str, Any] = {
                "type": "file",
                "oid": entry.oid,
                "size": entry.size,
                "path": prefix + rel,
            }
            if entry.lfs:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
            listing.append(item)
        return _Reply.json(listing)

    def _refs(self, req: _Request, repo_type: str, repo_id: str) -> _Reply:
        with self.lock:
            repo = self.repo(repo_type, repo_id)
            branches, tags = dict(repo.branches), dict(repo.tags)
        refs: dict[str, Any] = {
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in branches.items()],
            "converts": [],
            "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in tags.items()],
        }
        if req.query.get("include_prs"):
            refs["pullRequests"] = []
        return _Reply.json(refs)

    def _create_branch(self, req: _Request, repo_type: str, repo_id: str, branch: str) -> _Reply:
        self._require_auth(req)
        starting_point = req.json().get("startingPoint") or "main"
        with self.lock:
            repo = self.repo(repo_type, repo_id)
            if branch in repo.branches:
                raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = repo.resolve(starting_point).record.id
        return _Reply.json({})

    def _create_tag(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Reply:
        """Tag `revision` (branch, tag or commit id), as `HfApi.create_tag` and lerobot's `push_to_hub` do."""
        self._require_auth(req)
        tag = req.json().get("tag")
        if not tag:
            raise _HubError(400, "A tag name is required")
        with self.lock:
            repo = self.repo(repo_type, repo_id)
            if tag in repo.tags or tag in repo.branches:
                raise _HubError(409, f"Reference already exists: refs/tags/{tag}")
            repo.tags[tag] = repo.resolve(revision).record.id
        return _Reply.json({})

    def _delete_tag(self, req: _Request, repo_type: str, repo_id: str, tag: str) -> _Reply:
        self._require_auth(req)
        with self.lock:
            repo = self.repo(repo_type, repo_id)
            if repo.tags.pop(tag, None) is None:
                raise _HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
        return _Reply.json({})

    def _resolve(self, req: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> _Reply:
        with self.lock:
            repo = self.repo(repo_type, repo_id)
            commit = repo.resolve(revision)
            entry = commit.tree.get(path)
            if entry is None:
                headers = {"X-Repo-Commit": commit.record.id}
                raise _HubError(404, "Entry not found", "EntryNotFound", headers)
            data = repo.blobs[entry.sha256]
        headers = {
            "X-Repo-Commit": commit.record.id,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        span = _RANGE.fullmatch(req.range or "")
        if req.method == "GET" and span is not None:
            start, end = int(span[1]), int(span[2]) if span[2] else len(data) - 1
            if start >= len(data):
                return _Reply(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            body = data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
            return _Reply(206, body, headers)
        return _Reply(200, data, headers)  # HEAD: same headers, exact Content-Length, body not sent


def _parents(folder: str) -> Iterator[str]:
    parts = folder.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


class _HTTPServer(ThreadingHTTPServer):
    """Tracks open sockets so `stop` also cuts keep-alive connections: clients must see the server go away."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: _Api) -> None:
        super().__init__(address, _Handler)
        self.api = api
        self.alive = True
        self._sockets: set[socket.socket] = set()
        self._sockets_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._sockets_lock:
            self._sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._sockets_lock:
            self._sockets.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self._sockets_lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):  # already closed by the peer
                    sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about connections the client or `stop` closed; report anything else."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the client's connection pool expects
    server: _HTTPServer

    def do_GET(self) -> None:
        body = self._read_body()  # always read the whole body first so the connection stays usable
        url = urlsplit(self.path)
        req = _Request(
            method=self.command,
            path=url.path,
            query=parse_qs(url.query),
            authorization=self.headers.get("Authorization"),
            range=self.headers.get("Range"),
            body=body,
            alive=lambda server=self.server: server.alive,
        )
        try:
            reply = self.server.api.handle(req)
        except _HubError as err:
            reply = err.reply()
        except Exception as exc:  # noqa: BLE001 - a server bug: answer a 500 the test can read, not a dropped socket
            reply = _HubError(500, f"Test hub server error: {type(exc).__name__}: {exc}").reply()
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers up to the blank line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: tests inspect `HubServer.requests()` instead of stderr noise."""


class HubServer:
    """A Hub on 127.0.0.1 for tests; repos survive `stop`/`start`, which reuse the same port."""

    def __init__(self, token: str = "hf_test_token", *, port: int = 0, user: str = "test-user") -> None:
        self.token = token
        self.user = user
        self._api = _Api(token, user)
        self._port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("HubServer has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        if self._httpd is not None:
            raise RuntimeError("HubServer is already running")
        self._httpd = _HTTPServer(("127.0.0.1", self._port), self._api)
        self._port = self._httpd.server_address[1]
        self._api.base_url = self.url
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Go down like an outage: refuse new connections and cut open ones, in-flight commits included."""
        if self._httpd is None or self._thread is None:
            return
        self._httpd.alive = False
        self._httpd.shutdown()
        self._httpd.drop_connections()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def fail_next(self, n: int = 1, status: int = 500, match: str | None = None) -> None:
        """Answer the next `n` requests with `status` (if `match` is given, only those whose "METHOD /path"
        contains it).

        The client retries 429/5xx on preupload, LFS batch and LFS upload (1 s backoff, doubling), but not
        commit, repo_info, whoami or create_repo, which raise at once.
        """
        with self._api.lock:
            self._api.faults.append(_Fault(n, status, match))

    def revoke_token(self) -> None:
        """From now on the token is refused with 401, as when a user revokes it on the Hub mid-run."""
        with self._api.lock:
            self._api.token = f"revoked-{self._api.token}"

    def set_delay(self, seconds: float, *, commit: bool = True, upload: bool = True) -> None:
        """Make every commit and/or LFS upload take `seconds` longer: uploads slower than checkpointing."""
        with self._api.lock:
            self._api.commit_delay = seconds if commit else 0.0
            self._api.upload_delay = seconds if upload else 0.0

    def commits(self, repo_id: str, repo_type: str = "model") -> list[CommitRecord]:
        """All commits of the repo on every branch, oldest first; the first is the Hub's "initial commit"."""
        with self._api.lock:
            return [c.record for c in self._api.repo(repo_type, repo_id).commits.values()]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The stored bytes of every file at `revision` (branch or commit id), `.gitattributes` included."""
        with self._api.lock:
            repo = self._api.repo(repo_type, repo_id)
            return {path: repo.blobs[e.sha256] for path, e in sorted(repo.resolve(revision).tree.items())}

    def corrupt(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> None:
        """Flip the first byte of a stored file, keeping its size and advertised hashes (ETag, sha256, oid).

        Storage is content-addressed: every path and commit of the repo sharing that content is damaged too.
        """
        with self._api.lock:
            repo = self._api.repo(repo_type, repo_id)
            entry = repo.resolve(revision).tree.get(path)
            if entry is None or entry.size == 0:
                raise ValueError(f"{repo_id}@{revision} has no non-empty file {path!r} to corrupt")
            data = repo.blobs[entry.sha256]
            repo.blobs[entry.sha256] = bytes([data[0] ^ 0xFF]) + data[1:]

    def requests(self) -> list[tuple[str, str]]:
        """Every (method, path) received so far (path as sent: URL-quoted, no query), to count uploads etc."""
        with self._api.lock:
            return list(self._api.log)


def publish_dataset(api: Any, repo_id: str, folder: Path) -> str:
    """A LeRobot dataset folder published as lerobot's `push_to_hub` lays it out (without its dataset card, whose
    YAML huggingface_hub validates on huggingface.co): a dataset repo holding the folder's files at its root, in
    one commit tagged with meta/info.json's codebase_version, the tag lerobot opens a Hub dataset at. `api` is an
    HfApi that talks to the server. Returns the commit."""
    api.create_repo(repo_id, repo_type="dataset")
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="dataset").oid
    version = json.loads((folder / "meta" / "info.json").read_text())["codebase_version"]
    api.create_tag(repo_id, tag=version, revision=commit, repo_type="dataset")
    return commit


def running_hub() -> Iterator[HubServer]:
    """Fixture body: `hub = pytest.fixture(running_hub, name="hub")` gives each test a fresh server."""
    with HubServer() as server:
        yield server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Local Hugging Face Hub-compatible server for tests.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", default="hf_test_token")
    args = parser.parse_args(argv)
    with HubServer(args.token, port=args.port) as server:
        print(server.url, flush=True)
        print(
            f"token {args.token}; use HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
