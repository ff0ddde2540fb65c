"""A local HTTP server shaped like the Hugging Face Hub, for download tests with no internet.

It serves one model repository from a folder, at one commit, under the endpoints huggingface_hub
calls (``HF_ENDPOINT=http://127.0.0.1:PORT``):

- ``HEAD|GET /{repo}/resolve/{revision}/{path}``: small files answer 200 with ``ETag`` and
  ``X-Repo-Commit``; ``.safetensors`` files (LFS files on the real hub) answer 302 to a second
  listener (the "CDN": another origin, so huggingface_hub takes the metadata from the redirect's
  ``X-Linked-Etag`` / ``X-Linked-Size`` and sends no token there), as the hub does;
- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{revision}`` (model_info);
- ``GET /api/models/{repo}/tree/{revision}`` (the listing snapshot_download reads);
- errors as the hub sends them: 404 with ``X-Error-Code: EntryNotFound`` / ``RevisionNotFound`` /
  ``RepoNotFound``, 401 ``GatedRepo`` without the right token.

Every file body sent is recorded (``fetched``), so a test can assert what was downloaded.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".model")


@dataclass
class HubRepo:
    """One repository at one commit: its files (path -> bytes) and the branches/tags naming that commit."""

    repo_id: str
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    refs: tuple[str, ...] = ("main",)
    token: str | None = None  # when set, every request needs "Authorization: Bearer <token>" (a gated repo)
    fetched: list[str] = field(default_factory=list)  # paths whose bodies were sent, in order
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, authorization)

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path, **kwargs) -> "HubRepo":
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return cls(repo_id, files, **kwargs)

    def resolves(self, revision: str) -> bool:
        return revision == self.commit or revision in self.refs

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else hashlib.sha1(data).hexdigest()

    def by_sha256(self, digest: str) -> str | None:
        return next((p for p in self.files if self.is_lfs(p) and self.etag(p) == digest), None)

    def tree(self) -> list[dict]:
        entries = []
        for path, data in self.files.items():
            entry = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if self.is_lfs(path):
                entry["lfs"] = {"oid": self.etag(path), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries


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

    def _check(self, repo_id: str, revision: str) -> bool:
        if repo_id != self.hub.repo.repo_id:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return False
        if not self.hub.repo.resolves(revision):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return False
        return True

    def _api(self, repo_id: str, kind: str | None, revision: str) -> None:
        if not self._check(repo_id, revision):
            return
        repo = self.hub.repo
        if kind == "tree":
            return self._json(repo.tree())
        self._json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit, "private": False,
                    "siblings": [{"rfilename": p} for p in repo.files]})

    def _resolve(self, repo_id: str, revision: str, path: str, body: bool) -> None:
        if not self._check(repo_id, revision):
            return
        repo = self.hub.repo
        if path not in repo.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
        headers = {"X-Repo-Commit": repo.commit}
        if repo.is_lfs(path):
            headers.update({"X-Linked-Etag": f'"{repo.etag(path)}"', "X-Linked-Size": str(len(repo.files[path])),
                            "Location": f"{self.hub.cdn_url}/blobs/{repo.etag(path)}", "ETag": '"pointer"'})
            return self._send(302, b"", headers, body)
        headers["ETag"] = f'"{repo.etag(path)}"'
        self._send(200, repo.files[path], headers, body, fetched=path)

    def _blob(self, path: str, body: bool) -> None:
        match = re.fullmatch(r"/blobs/([0-9a-f]{64})", path)
        name = self.hub.repo.by_sha256(match.group(1)) if match else None
        if name is None:
            return self._error(404, None, "no such blob")
        self._send(200, self.hub.repo.files[name], {"ETag": f'"{match.group(1)}"'}, body, fetched=name)

    def _json(self, value) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"}, True)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, "X-Repo-Commit": self.hub.repo.commit}
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
