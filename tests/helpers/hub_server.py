"""A local HTTP server shaped like the Hugging Face Hub, for download tests with no internet.

It serves one model repository from folders, one per commit, under the endpoints huggingface_hub
calls (``HF_ENDPOINT=http://127.0.0.1:PORT``), with what the hub sends:

- ``HEAD|GET /{repo}/resolve/{revision}/{path}``: small files answer 200 with ``ETag`` (the git blob id)
  and ``X-Repo-Commit`` (the commit the revision names); ``.safetensors`` files (LFS files on the real
  hub) answer 302 to a second listener (the "CDN": another origin, so huggingface_hub takes the metadata
  from the redirect's ``X-Linked-Etag``, the file's SHA-256, and ``X-Linked-Size``, and sends no token
  there), as the hub does;
- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{revision}`` (model_info: ``sha`` is the
  commit; with ``?blobs=true`` each sibling has ``size``, ``blobId`` and for LFS files ``lfs.sha256``);
- ``GET /api/models/{repo}/tree/{revision}`` (the listing snapshot_download reads);
- errors as the hub sends them: 404 with ``X-Error-Code: EntryNotFound`` / ``RevisionNotFound`` /
  ``RepoNotFound``, 401 ``GatedRepo`` without the right token.

Every file body sent is recorded (``fetched``), so a test can assert what was downloaded. ``tampered``
(SHA-256 -> bytes) makes the CDN send other bytes for a blob than the hub publishes the hash of.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".model")
SKIPPED = {"swarmlm-weights.json"}  # what a local checkpoint keeps beside its files is not part of a repository


def read_folder(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in SKIPPED}


def git_blob_id(data: bytes) -> str:
    """What git (and the hub, for a file kept outside LFS) names a file's content by."""
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class HubRepo:
    """One repository: its commits (commit -> files, path -> bytes) and the branches/tags naming them."""

    repo_id: str
    files: dict[str, bytes]  # the files of ``commit``, which the default branch names
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    refs: tuple[str, ...] = ("main",)  # the names of ``commit``
    token: str | None = None  # when set, every request needs "Authorization: Bearer <token>" (a gated repo)
    fetched: list[str] = field(default_factory=list)  # paths whose bodies were sent, in order
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, authorization)
    tampered: dict[str, bytes] = field(default_factory=dict)  # sha256 -> what the CDN sends instead of that blob
    hashes: bool = True  # False: model info lists the files without their hashes (as a mirror might)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # every commit's files
    names: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit

    def __post_init__(self) -> None:
        self.commits.setdefault(self.commit, self.files)
        self.names.update({ref: self.commit for ref in self.refs})

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path, **kwargs) -> "HubRepo":
        return cls(repo_id, read_folder(folder), **kwargs)

    def add_commit(self, commit: str, folder: Path, refs: tuple[str, ...] = ()) -> None:
        """Another commit of the repository, with the files of ``folder``, named by ``refs``."""
        self.commits[commit] = read_folder(folder)
        self.names.update({ref: commit for ref in refs})

    def resolve(self, revision: str) -> str | None:
        """The commit ``revision`` (a branch, tag or commit) names, or None."""
        return revision if revision in self.commits else self.names.get(revision)

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def etag(self, commit: str, path: str) -> str:
        data = self.commits[commit][path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_blob_id(data)

    def blob(self, digest: str) -> tuple[str, bytes] | None:
        """(path, bytes) of an LFS file of any commit with SHA-256 ``digest``."""
        for files in self.commits.values():
            for path, data in files.items():
                if self.is_lfs(path) and hashlib.sha256(data).hexdigest() == digest:
                    return path, data
        return None

    def entry(self, commit: str, path: str, key: str) -> dict:
        """A file as the hub's API lists it (``key``: "path" in trees, "rfilename" in model info)."""
        data = self.commits[commit][path]
        item = {key: path, "size": len(data), ("oid" if key == "path" else "blobId"): git_blob_id(data)}
        if self.is_lfs(path):
            digest = hashlib.sha256(data).hexdigest()
            item["lfs"] = {("oid" if key == "path" else "sha256"): digest, "size": len(data), "pointerSize": 134}
        return item

    def tree(self, commit: str) -> list[dict]:
        return [{"type": "file", **self.entry(commit, path, "path")} for path in self.commits[commit]]


class _Handler(BaseHTTPRequestHandler):
    server_version = "hub-shaped/1"
    hub: "HubServer"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def _dispatch(self, body: bool) -> None:
        repo, path = self.hub.repo, unquote(urlsplit(self.path).path)
        repo.requests.append((self.command, path, self.headers.get("Authorization")))
        if self.server is self.hub.cdn:
            return self._blob(path, body)
        if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(401, "GatedRepo", "Access to this repository is restricted: give a token")
        api = re.fullmatch(r"/api/models/(.+?)(?:/(revision|tree)/([^/]+))?/?", path)
        if api:
            return self._api(api.group(1), api.group(2), api.group(3) or "main")
        resolve = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        if resolve:
            return self._resolve(resolve.group(1), resolve.group(2), resolve.group(3), body)
        self._error(404, None, "not found")

    def _check(self, repo_id: str, revision: str) -> str | None:
        """The commit ``revision`` names, or None (the error sent)."""
        if repo_id != self.hub.repo.repo_id:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        commit = self.hub.repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _api(self, repo_id: str, kind: str | None, revision: str) -> None:
        commit = self._check(repo_id, revision)
        if commit is None:
            return
        repo = self.hub.repo
        if kind == "tree":
            return self._json(repo.tree(commit))
        blobs = parse_qs(urlsplit(self.path).query).get("blobs", [""])[0].lower() == "true"  # files_metadata=True
        blobs = blobs and repo.hashes
        siblings = [repo.entry(commit, p, "rfilename") if blobs else {"rfilename": p} for p in repo.commits[commit]]
        self._json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "private": False, "siblings": siblings})

    def _resolve(self, repo_id: str, revision: str, path: str, body: bool) -> None:
        commit = self._check(repo_id, revision)
        if commit is None:
            return
        repo = self.hub.repo
        if path not in repo.commits[commit]:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
        headers, etag, data = {"X-Repo-Commit": commit}, repo.etag(commit, path), repo.commits[commit][path]
        if repo.is_lfs(path):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data)),
                            "Location": f"{self.hub.cdn_url}/blobs/{etag}", "ETag": '"pointer"'})
            return self._send(302, b"", headers, body)
        headers["ETag"] = f'"{etag}"'
        self._send(200, data, headers, body, fetched=path)

    def _blob(self, path: str, body: bool) -> None:
        match = re.fullmatch(r"/blobs/([0-9a-f]{64})", path)
        found = self.hub.repo.blob(match.group(1)) if match else None
        if found is None:
            return self._error(404, None, "no such blob")
        name, data = found
        self._send(200, self.hub.repo.tampered.get(match.group(1), data), {"ETag": f'"{match.group(1)}"'}, body,
                   fetched=name)

    def _json(self, value) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"}, True)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, self.command != "HEAD")

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool, fetched: str | None = None) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)
            if fetched is not None:
                self.hub.repo.fetched.append(fetched)


class HubServer:
    """The hub-shaped server (and its "CDN" listener) on 127.0.0.1, in threads. Use as a context manager;
    ``url`` is what HF_ENDPOINT should be."""

    def __init__(self, repo: HubRepo) -> None:
        self.repo = repo
        handler = type("Handler", (_Handler,), {"hub": self})
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.http, self.cdn)]

    def __enter__(self) -> "HubServer":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for server in (self.http, self.cdn):
            server.shutdown()
            server.server_close()
