"""A stand-in for the part of the Hugging Face Hub's HTTP API that downloads use, on 127.0.0.1.

What huggingface_hub 2.4 and mamba2 send, and what this server answers:

- `GET /api/models/{org}/{name}` and `.../revision/{rev}` (with `?blobs=true`): repo info,
  with the commit (`sha`), `gated`, and per file its size, git blob id and, for LFS files,
  `lfs.sha256` / `lfs.size`.
- `HEAD|GET /{org}/{name}/resolve/{rev}/{path}`: regular files are served here with
  `ETag` (git blob id) and `X-Repo-Commit`; LFS files answer 302 to a "CDN" URL on another
  origin (`localhost` instead of `127.0.0.1`, so the client neither follows the HEAD's
  redirect nor sends its token there), with `X-Linked-Etag` (the SHA-256) and
  `X-Linked-Size`.
- `GET /cdn/{sha256}`: LFS content, with `Range: bytes=N-` answered by 206.
- Errors as the Hub signals them: `X-Error-Code` RepoNotFound / RevisionNotFound /
  EntryNotFound / GatedRepo (401 without a token, 403 with a wrong one).

Faults for tests: `drop_after[path] = n` closes the connection after n bytes of the next
GET of that file (once); `corrupt.add(path)` serves that file with one byte changed while
advertising its true SHA-256 and git blob id; `hold[path] = n` sends n bytes of the next GET of
that file, then waits until `release` is set (or the client goes away) before sending the
rest; `drop_every[path] = n` drops every GET of that file after n bytes and ignores its Range
requests; `extra[path] = n` appends n bytes to the GET answers of that file (the HEAD stays
true). Every request is appended to `log`.

A hostile endpoint, for tests that nothing leaves the cache: a Repo's file names, shard names
and `commit` are served as given (`../x` included), and `etag[path]` / `head_commit` replace
the ETag / X-Repo-Commit of the file's HEAD and GET answers.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".model.v3", ".pt")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = ""
    branches: dict[str, str] = field(default_factory=dict)  # extra names -> commit ("" = this one); "main" is added
    gated: bool = False
    etag: dict[str, str] = field(default_factory=dict)  # path -> the ETag served instead of the true one
    head_commit: str | None = None  # the X-Repo-Commit served instead of the commit

    def __post_init__(self):
        if not self.commit:
            names = sorted(self.files)
            self.commit = hashlib.sha1(repr([(n, len(self.files[n])) for n in names]).encode()).hexdigest()
        self.branches = {"main": self.commit, **{k: v or self.commit for k, v in self.branches.items()}}
        self.sha256 = {p: hashlib.sha256(d).hexdigest() for p, d in self.files.items() if self.is_lfs(p)}

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def resolve(self, rev: str) -> str | None:
        return rev if rev == self.commit else self.branches.get(rev)


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int = 0
    sent: int = 0  # body bytes written

    @property
    def file(self) -> str | None:
        """The repo file a content request was for (resolve or CDN URL), else None."""
        m = re.match(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", self.path)
        if m:
            return unquote(m.group(1))
        m = re.match(r"/cdn/[0-9a-f]{64}/[^/]+/[^/]+/(.+)", self.path)
        return unquote(m.group(1)) if m else None


class HubServer:
    def __init__(self, repos: dict[str, Repo], token: str = "hf_good_token"):
        self.repos = repos
        self.token = token
        self.log: list[Request] = []
        self.drop_after: dict[str, int] = {}
        self.drop_every: dict[str, int] = {}
        self.extra: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.hold: dict[str, int] = {}  # path -> bytes to send before waiting for `release`
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn = f"http://localhost:{self.port}"
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            for c in list(self._conns):  # keep-alive connections would outlive the listener
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # What tests assert on.
    def gets(self, file: str | None = None) -> list[Request]:
        """Content GETs (resolve or CDN), optionally of one repo file."""
        return [r for r in self.log if r.method == "GET" and r.file is not None and (file is None or r.file == file)]

    def content_bytes(self) -> int:
        return sum(r.sent for r in self.gets())

    def files_fetched(self) -> set[str]:
        return {r.file for r in self.gets() if r.status in (200, 206)}


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients that drop connections (the point of some tests) are not errors here


def _make_handler(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def setup(self):
            super().setup()
            with server._lock:
                server._conns.add(self.connection)

        def finish(self):
            with server._lock:
                server._conns.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        def do_HEAD(self):
            self._handle(body=False)

        def do_GET(self):
            self._handle(body=True)

        # ---------------------------------------------------------------------------
        def _handle(self, body: bool):
            path = urlsplit(self.path).path
            self.req = Request(self.command, path, self.headers.get("Range"), self.headers.get("Authorization"))
            with server._lock:
                server.log.append(self.req)
            if path == "/api/agent-harnesses":  # huggingface_hub's user-agent telemetry asks once a day
                return self._send(200, {"Content-Type": "application/json"},
                                  b'{"standardEnvVars": [], "harnesses": {}}')
            hostile = self._hostile_name(path)
            if hostile is not None:
                return self._resolve(*hostile, body)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?", path)
            if m:
                return self._model_info(unquote(m.group(1)), unquote(m.group(2) or "main"))
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._resolve(unquote(m.group(1)), unquote(m.group(2)), unquote(m.group(3)), body)
            m = re.fullmatch(r"/cdn/([0-9a-f]{64})/([^/]+/[^/]+)/(.+)", path)
            if m:
                return self._cdn(unquote(m.group(2)), unquote(m.group(3)), m.group(1), body)
            self._error(404, None, "Not Found")

        def _hostile_name(self, path: str) -> tuple[str, str, str] | None:
            """(repo, revision, file) of a file named with '..', asked for at the path a client's URL
            normalization makes of it: such names are served, as a hostile endpoint would."""
            for repo_id, repo in server.repos.items():
                for name in repo.files:
                    if ".." in name.replace("\\", "/").split("/"):
                        for rev in {repo.commit, *repo.branches}:
                            if posixpath.normpath(f"/{repo_id}/resolve/{quote(rev, safe='')}/{name}") == path:
                                return repo_id, rev, name
            return None

        def _send(self, status: int, headers: dict, data: bytes = b"", body: bool = True):
            self.req.status = status
            self.send_response(status)
            headers.setdefault("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if body and data:
                self.wfile.write(data)
                self.req.sent = len(data)

        def _error(self, status: int, code: str | None, message: str, extra: dict | None = None):
            data = json.dumps({"error": message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, headers, data, body=self.command != "HEAD")

        def _repo(self, repo_id: str, rev: str):
            repo = server.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None, None
            commit = repo.resolve(rev)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return None, None
            return repo, commit

        def _model_info(self, repo_id: str, rev: str):
            repo, commit = self._repo(repo_id, rev)
            if repo is None:
                return
            siblings = []
            for p, d in sorted(repo.files.items()):
                s = {"rfilename": p, "size": len(d), "blobId": git_blob_id(d)}
                if repo.is_lfs(p):
                    s["lfs"] = {"size": len(d), "sha256": repo.sha256[p], "pointerSize": 134}
                siblings.append(s)
            info = {"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                    "gated": "manual" if repo.gated else False, "disabled": False, "tags": [], "downloads": 0,
                    "likes": 0, "siblings": siblings}
            self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode())

        def _authorized(self, repo: Repo, repo_id: str) -> bool:
            if not repo.gated:
                return True
            auth = self.headers.get("Authorization")
            if auth is None:
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                            "and be authenticated to access it. Please log in.")
                return False
            if auth != f"Bearer {server.token}":
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                            "authorized list.")
                return False
            return True

        def _resolve(self, repo_id: str, rev: str, file: str, body: bool):
            repo, commit = self._repo(repo_id, rev)
            if repo is None or not self._authorized(repo, repo_id):
                return
            if file not in repo.files:
                return self._error(404, "EntryNotFound", f"{file} does not exist", {"X-Repo-Commit": commit})
            data = repo.files[file]
            commit = repo.head_commit or commit
            if repo.is_lfs(file):
                sha = repo.sha256[file]
                return self._send(302, {
                    "Location": f"{server.cdn}/cdn/{sha}/{repo_id}/{quote(file, safe='')}",
                    "X-Linked-Etag": f'"{repo.etag.get(file, sha)}"', "X-Linked-Size": str(len(data)),
                    "ETag": f'"{git_blob_id(b"pointer " + sha.encode())}"', "X-Repo-Commit": commit,
                }, body=body)
            etag = repo.etag.get(file, git_blob_id(data))
            self._content(data, {"ETag": f'"{etag}"', "X-Repo-Commit": commit}, file, body)

        def _cdn(self, repo_id: str, file: str, sha: str, body: bool):
            repo = server.repos.get(repo_id)
            if repo is None or repo.sha256.get(file) != sha:
                return self._error(404, None, "Not Found")
            self._content(repo.files[file], {"ETag": f'"{sha}"'}, file, body)

        def _content(self, data: bytes, headers: dict, file: str, body: bool):
            if file in server.corrupt:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            if body and file in server.extra:
                data += b"\0" * server.extra[file]
            start, status = 0, 200
            rng = self.headers.get("Range")
            if rng and file not in server.drop_every:
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                if not m or int(m.group(1)) >= len(data):
                    return self._error(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{len(data)}"})
                start = int(m.group(1))
                end = int(m.group(2)) + 1 if m.group(2) else len(data)
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
                data, status = data[start:end], 206
            headers["Accept-Ranges"] = "bytes"
            with server._lock:
                drop = (server.drop_after.pop(file, None) or server.drop_every.get(file)) if body else None
                hold = server.hold.pop(file, None) if body else None
            if hold is not None:
                self._send(status, {**headers, "Content-Length": str(len(data))}, b"", body)
                try:
                    for piece in (data[:hold], data[hold:]):
                        self.wfile.write(piece)
                        self.wfile.flush()
                        self.req.sent += len(piece)
                        if not server.release.wait(60):
                            break
                except OSError:  # the client went away
                    pass
                self.close_connection = True
                return
            if drop is None:
                return self._send(status, headers, data, body)
            # Promise the whole body, send part of it, then drop the connection.
            self.req.status = status
            self.send_response(status)
            headers["Content-Length"] = str(len(data))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data[:drop])
            self.wfile.flush()
            self.req.sent = drop
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    return Handler
