"""A small Hugging Face Hub-compatible server for tests, on 127.0.0.1, in memory.

It implements what the installed ``huggingface_hub`` client calls to create a repo, commit files
(preupload, regular base64 files in the NDJSON commit, LFS batch + PUT upload for weights) and download
them (repo info, tree listing, ``resolve`` with ``X-Repo-Commit``, ``ETag``/``X-Linked-Etag``,
``X-Linked-Size`` and ``Content-Length``). Each commit is an immutable snapshot, so pinned revisions
keep returning old files. Writes need ``Authorization: Bearer <token>``; the client's Xet transfer is
not offered (run clients with ``HF_HUB_DISABLE_XET=1``).

    server = HubServer(token="hf_test"); server.start(); ...; server.stop()
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_REV = r"(?P<rev>[^/]+)"


@dataclass
class _Blob:
    data: bytes
    lfs: bool

    @property
    def git_oid(self) -> str:  # git's blob hash: sha1("blob <size>\0" + data)
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class _Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, dict[str, _Blob]] = field(default_factory=dict)  # commit oid -> {path: blob}

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        matches = [oid for oid in self.commits if oid.startswith(rev)] if len(rev) >= 7 else []
        return matches[0] if len(matches) == 1 else None


class HubServer:
    def __init__(self, token: str = "hf_test_token"):
        self.token = token
        self.repos: dict[str, _Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded before the commit
        self.requests: list[tuple[str, str]] = []  # (method, path), for tests to inspect
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # ------------------------------------------------------------------ operations
    def create_repo(self, repo_id: str, private: bool) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            repo = _Repo(private=private)
            oid = _new_oid()
            repo.commits[oid] = {".gitattributes": _Blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", False)}
            repo.branches["main"] = oid
            self.repos[repo_id] = repo
            return True

    def commit(self, repo_id: str, branch: str, lines: list[dict]) -> str:
        with self.lock:
            repo = self.repos[repo_id]
            files = dict(repo.commits[repo.branches[branch]])
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = _Blob(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    if value["oid"] not in self.lfs_objects:
                        raise KeyError(f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = _Blob(self.lfs_objects[value["oid"]], lfs=True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            oid = _new_oid()
            repo.commits[oid] = files
            repo.branches[branch] = oid
            return oid


def _new_oid() -> str:
    return hashlib.sha1(uuid.uuid4().bytes).hexdigest()


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        # -------------------------------------------------------------- plumbing
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, payload, headers: dict | None = None):
            self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str | None, message: str, headers: dict | None = None, head=False):
            extra = {"X-Error-Code": code} if code else {}
            self._send(status, json.dumps({"error": message}).encode(),
                       {"Content-Type": "application/json", "X-Error-Message": message, **extra, **(headers or {})},
                       head=head)

        def _authorised(self) -> bool:
            return self.headers.get("Authorization", "") == f"Bearer {hub.token}"

        def _repo(self, repo_id: str, head: bool = False) -> _Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorised()):
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
                return None
            return repo

        def _route(self, method: str):
            path = urlsplit(self.path).path
            hub.requests.append((method, path))
            for pattern_method, pattern, action in ROUTES:
                match = re.fullmatch(pattern, path)
                if pattern_method == method and match:
                    groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    return action(self, **groups)
            self._error(404, None, f"no route for {method} {path}")

        def do_GET(self):
            self._route("GET")

        def do_HEAD(self):
            self._route("HEAD")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        # -------------------------------------------------------------- endpoints
        def create_repo(self):
            payload = json.loads(self._body())
            if not self._authorised():
                return self._error(401, None, "Invalid credentials in Authorization header")
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            url = f"{hub.url}/{repo_id}"
            if not hub.create_repo(repo_id, payload.get("visibility") == "private"):
                return self._json(409, {"error": "You already created this model repo", "url": url})
            self._json(200, {"url": url, "name": repo_id})

        def validate_yaml(self):
            self._body()
            self._json(200, {"errors": [], "warnings": []})

        def preupload(self, repo, rev):
            payload = json.loads(self._body())
            if self._repo(repo) is None:
                return
            files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                      "shouldIgnore": False} for f in payload["files"]]
            self._json(200, {"files": files})

        def lfs_batch(self, repo):
            payload = json.loads(self._body())
            if not self._authorised():
                return self._error(401, None, "Invalid credentials in Authorization header")
            if self._repo(repo) is None:
                return
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs_objects:
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            self._json(200, {"transfer": "basic", "objects": objects})

        def lfs_upload(self, oid):
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, None, f"content does not hash to {oid}")
            hub.lfs_objects[oid] = data
            self._send(200)

        def commit(self, repo, rev):
            body = self._body()
            if not self._authorised():
                return self._error(401, None, "Invalid credentials in Authorization header")
            if self._repo(repo) is None:
                return
            if rev not in hub.repos[repo].branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            try:
                oid = hub.commit(repo, rev, lines)
            except KeyError as err:
                return self._error(400, None, str(err))
            self._json(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None, "success": True})

        def repo_info(self, repo, rev="main"):
            record = self._repo(repo)
            if record is None:
                return
            oid = record.resolve(rev)
            if oid is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = record.commits[oid]
            self._json(200, {"id": repo, "modelId": repo, "sha": oid, "private": record.private,
                             "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [], "downloads": 0})

        def tree(self, repo, rev, sub=""):
            record = self._repo(repo)
            if record is None:
                return
            oid = record.resolve(rev)
            if oid is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            entries = []
            for path, blob in sorted(record.commits[oid].items()):
                if sub and not path.startswith(sub.rstrip("/") + "/"):
                    continue
                entry = {"type": "file", "path": path, "size": len(blob.data), "oid": blob.git_oid}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
                entries.append(entry)
            self._json(200, entries)

        def resolve(self, repo, rev, filename, head=False):
            record = self._repo(repo, head=head)
            if record is None:
                return
            oid = record.resolve(rev)
            if oid is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
            blob = record.commits[oid].get(filename)
            if blob is None:
                return self._error(404, "EntryNotFound", f"{filename} does not exist at {rev}",
                                   headers={"X-Repo-Commit": oid}, head=head)
            headers = {"X-Repo-Commit": oid, "ETag": f'"{blob.git_oid}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            if blob.lfs:
                headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
            self._send(200, blob.data, headers, head=head)

        def resolve_head(self, repo, rev, filename):
            self.resolve(repo, rev, filename, head=True)

    ROUTES = [
        ("POST", r"/api/repos/create", Handler.create_repo),
        ("POST", r"/api/validate-yaml", Handler.validate_yaml),
        ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", Handler.preupload),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", Handler.lfs_batch),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", Handler.lfs_upload),
        ("POST", rf"/api/models/{_REPO}/commit/{_REV}", Handler.commit),
        ("GET", rf"/api/models/{_REPO}(?:/revision/{_REV})?", Handler.repo_info),
        ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<sub>.+))?", Handler.tree),
        ("GET", rf"/{_REPO}/resolve/{_REV}/(?P<filename>.+)", Handler.resolve),
        ("HEAD", rf"/{_REPO}/resolve/{_REV}/(?P<filename>.+)", Handler.resolve_head),
    ]
    return Handler
