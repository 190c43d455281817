"""A fake Hugging Face Hub on 127.0.0.1 that answers what huggingface_hub 2.4 asks of a model repo.

Serves `HfApi.model_info`/`repo_info` (`/api/models/...`), `list_repo_tree` (`/api/models/.../tree/...`)
and `HEAD`/`GET /{repo_id}/resolve/{revision}/{filename}` (what `hf_hub_download` and
`snapshot_download` use), so tests can download tiny checkpoints under the published repo names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest

LFS_THRESHOLD = 1024  # files larger than this are listed and served as LFS files, as the Hub would
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of `data` (what the Hub reports as `oid` and as the ETag of a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def file_etag(data: bytes) -> str:
    """The ETag the Hub gives a file (unquoted): its sha256 if LFS, else its git blob sha1."""
    return hashlib.sha256(data).hexdigest() if len(data) > LFS_THRESHOLD else git_blob_sha1(data)


def _tree_entry(path: str, data: bytes, etag: str) -> dict[str, Any]:
    if len(data) <= LFS_THRESHOLD:
        return {"type": "file", "oid": etag, "size": len(data), "path": path}
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{etag}\nsize {len(data)}\n"
    lfs = {"oid": etag, "size": len(data), "pointerSize": len(pointer)}
    return {
        "type": "file",
        "oid": git_blob_sha1(pointer.encode()),
        "size": len(data),
        "path": path,
        "lfs": lfs,
    }


@dataclass
class _Commit:
    sha: str
    files: dict[str, bytes]  # bytes, or any buffer (an mmap serves a large file from disk)
    date: str
    etags: dict[str, str] = field(default_factory=dict)  # hashed once: files may be gigabytes


@dataclass
class _Repo:
    commits: dict[str, _Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    default_branch: str = "main"

    def resolve(self, revision: str) -> _Commit | None:
        sha = self.refs.get(revision, revision)
        return self.commits.get(sha)


class FakeHub:
    """A threaded HTTP server on an ephemeral 127.0.0.1 port that plays the Hub for model repos."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._n_commits = 0
        self.requests: list[tuple[str, str]] = []
        self.request_headers: list[dict[str, str]] = []  # lower-cased names, parallel to `requests`
        self.drop_once: dict[str, int] = {}
        self.drop_always: dict[str, int] = {}  # like drop_once, but on every GET of the file
        self.tree_page_size: int | None = None  # paginate /tree listings with Link headers when set
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        branch: str = "main",
        tags: tuple[str, ...] = (),
    ) -> str:
        """Commit `files` (the whole tree) to `branch` of `repo_id`, creating it; return the commit sha."""
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(default_branch=branch))
            self._n_commits += 1
            etags = {p: file_etag(d) for p, d in files.items()}
            seed = f"{repo_id}\0{branch}\0{self._n_commits}\0" + "".join(
                f"{p}\0{etags[p]}\0" for p in sorted(files)
            )
            sha = hashlib.sha1(seed.encode()).hexdigest()
            date = f"2024-01-01T00:{self._n_commits // 60 % 60:02d}:{self._n_commits % 60:02d}.000Z"
            repo.commits[sha] = _Commit(sha, dict(files), date, etags)
            for ref in (branch, *tags):
                repo.refs[ref] = sha
            return sha

    def file_requests(self, repo_id: str | None = None) -> list[str]:
        """Filenames of the GETs of file contents (`/resolve/`), optionally of one repo only."""
        names = []
        for method, path in self.snapshot():
            repo, sep, tail = urlsplit(path).path.partition("/resolve/")
            if method == "GET" and sep and repo_id in (None, unquote(repo.lstrip("/"))):
                names.append(unquote(tail.partition("/")[2]))
        return names

    def snapshot(self) -> list[tuple[str, str]]:
        """A copy of `requests`, taken under the lock."""
        with self._lock:
            return list(self.requests)

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()
            self.request_headers.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((method, path))
            self.request_headers.append(headers)

    def _take_drop(self, filename: str) -> int | None:
        with self._lock:
            if filename in self.drop_once:
                return self.drop_once.pop(filename)
            return self.drop_always.get(filename)

    def _repo(self, repo_id: str) -> _Repo | None:
        with self._lock:
            return self._repos.get(repo_id)


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _unsupported(self) -> None:
        self.hub._record(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        self.close_connection = True  # the request body, if any, is left unread
        self._error(405, "", "Method not supported by FakeHub", head=False)

    do_POST = do_PUT = do_PATCH = do_DELETE = _unsupported

    def _route(self, head: bool) -> None:
        self.hub._record(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        if path == "/api/agent-harnesses":  # huggingface_hub's agent detection (CLI/terminal)
            return self._json({"standardEnvVars": [], "harnesses": {}}, head)
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/") :]
            for marker, action in (("/revision/", self._info), ("/tree/", self._tree)):
                repo_id, sep, tail = rest.partition(marker)
                if sep:
                    return action(unquote(repo_id), tail, query, head)
            return self._info(unquote(rest), None, query, head)
        repo_id, sep, tail = path.partition("/resolve/")
        if sep:
            return self._resolve(unquote(repo_id.lstrip("/")), tail, head)
        self._error(404, "", "Not Found", head)

    def _commit(self, repo_id: str, revision: str | None, head: bool) -> _Commit | None:
        repo = self.hub._repo(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
            return None
        commit = repo.resolve(unquote(revision) if revision is not None else repo.default_branch)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + unquote(revision or ""), head)
        return commit

    def _info(self, repo_id: str, revision: str | None, query: dict, head: bool) -> None:
        commit = self._commit(repo_id, revision, head)
        if commit is None:
            return
        siblings: list[dict[str, Any]] = []
        for name, data in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": name}
            if query.get("blobs", [""])[0].lower() == "true":
                entry = _tree_entry(name, data, commit.etags[name])
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    lfs = entry["lfs"]
                    sibling["lfs"] = {
                        "sha256": lfs["oid"],
                        "size": lfs["size"],
                        "pointerSize": lfs["pointerSize"],
                    }
            siblings.append(sibling)
        info = {
            "_id": commit.sha[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": commit.date,
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(d) for d in commit.files.values()),
        }
        self._json(info, head, {"X-Repo-Commit": commit.sha})

    def _tree(self, repo_id: str, tail: str, query: dict, head: bool) -> None:
        revision, _, sub = tail.partition("/")
        commit = self._commit(repo_id, revision, head)
        if commit is None:
            return
        base = unquote(sub).strip("/")
        dirs = {
            "/".join(p.split("/")[:i]) for p in commit.files for i in range(1, p.count("/") + 1)
        }
        if base and base not in dirs:
            return self._error(404, "EntryNotFound", f"{base} does not exist", head)
        prefix = base + "/" if base else ""
        recursive = query.get("recursive", ["false"])[0].lower() == "true"

        def listed(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

        entries = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(dirs)
            if listed(d)
        ]
        entries += [
            _tree_entry(p, d, commit.etags[p]) for p, d in sorted(commit.files.items()) if listed(p)
        ]
        headers = {}
        size = self.hub.tree_page_size
        if size:
            start = int(query.get("cursor", ["0"])[0])
            if start + size < len(entries):
                params = {k: v[0] for k, v in query.items() if k != "cursor"} | {
                    "cursor": start + size
                }
                next_url = f"{self.hub.url}{urlsplit(self.path).path}?{urlencode(params)}"
                headers["Link"] = f'<{next_url}>; rel="next"'
            entries = entries[start : start + size]
        self._json(entries, head, headers)

    def _resolve(self, repo_id: str, tail: str, head: bool) -> None:
        revision, _, filename = tail.partition("/")
        commit = self._commit(repo_id, revision, head)
        if commit is None:
            return
        filename = unquote(filename)
        data = commit.files.get(filename)
        if data is None:
            msg = "Entry not found"
            return self._error(404, "EntryNotFound", msg, head, {"X-Repo-Commit": commit.sha})
        etag = f'"{commit.etags[filename]}"'
        headers = {"X-Repo-Commit": commit.sha, "ETag": etag, "Accept-Ranges": "bytes"}
        if len(data) > LFS_THRESHOLD:  # the Hub links LFS files to their content's sha256 and size
            headers |= {"X-Linked-Etag": etag, "X-Linked-Size": str(len(data))}
        status, body = 200, data
        match = _RANGE.fullmatch(self.headers.get("Range", "")) if not head else None
        if match:
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), len(data) - 1) if last else len(data) - 1
            else:
                start, end = max(len(data) - int(last or 0), 0), len(data) - 1
            if start >= len(data) or start > end:
                headers["Content-Range"] = f"bytes */{len(data)}"
                return self._send(416, b"", head, headers)
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        drop = None if head else self.hub._take_drop(filename)
        self._send(status, body, head, headers, content_type="application/octet-stream", drop=drop)

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        head: bool,
        headers: dict[str, str] | None = None,
    ) -> None:
        extra = {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {})
        self._json({"error": message}, head, extra | (headers or {}), status)

    def _json(
        self, obj: Any, head: bool, headers: dict[str, str] | None = None, status: int = 200
    ) -> None:
        self._send(status, json.dumps(obj).encode(), head, headers or {})

    def _send(
        self,
        status: int,
        body: bytes,
        head: bool,
        headers: dict[str, str],
        content_type: str = "application/json",
        drop: int | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": content_type, **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        if drop is not None and drop < len(body):  # cut the body short and hang up
            self.wfile.write(body[:drop])
            self.close_connection = True
            return
        self.wfile.write(body)


def point_hf_at(url: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point huggingface_hub (this process, through its module constants, and child processes,
    through the environment) at the hub at `url` and at a fresh cache under `home`."""
    hub_cache = home / "hub"
    env = {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"]))
    monkeypatch.setenv("NO_PROXY", no_proxy)
    monkeypatch.setenv("no_proxy", no_proxy)
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_OIDC_RESOURCE",
        "HUGGINGFACE_CO_STAGING",
        "HUGGINGFACE_HUB_CACHE",
        "HF_ASSETS_CACHE",
        "HF_XET_CACHE",
        "HF_TOKEN_PATH",
    ):
        monkeypatch.delenv(name, raising=False)

    import huggingface_hub.hf_api
    from huggingface_hub import constants
    from huggingface_hub.utils import _cache_assets, _cache_manager

    values = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
    }
    for name, value in values.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(_cache_assets, "HF_ASSETS_CACHE", str(home / "assets"))
    # `huggingface_hub.model_info` etc. are bound methods of a module-level HfApi made at import.
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", url)


def hub_offline(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """Turn huggingface_hub's offline mode on or off, here (module constant) and for child processes (env)."""
    from huggingface_hub import constants

    if on:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", on)
