"""Servers for the remote-data tests, all on 127.0.0.1: moto's S3-compatible server and a plain
HTTP file server that can also serve 404s, connections cut mid-file and flaky first attempts."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

# Every AWS setting a client could read, pointed at the local server with dummy credentials; the
# profile/config files are cleared so that nothing on the machine adds a real endpoint.
_AWS_VARS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_PROFILE")


def point_aws_at(endpoint: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment for boto/s3fs (this process and children): only `endpoint`, dummy credentials."""
    for name in _AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))


class S3Server:
    """moto's standalone S3 server in a thread on 127.0.0.1 (a free port)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer  # dev extra: only these tests need moto

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def client(self) -> Any:
        """A boto3 S3 client of this server (for setting up and inspecting buckets)."""
        import boto3  # installed with moto

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def stop(self) -> None:
        self._server.stop()


@dataclass
class HTTPFiles:
    """What the HTTP file server does besides serving `root`: paths to cut mid-file (always, or the
    first `flaky[path]` times), and every GET it answered."""

    root: Path
    cut: set[str] = field(default_factory=set)
    flaky: dict[str, int] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    url: str = ""


class _Handler(SimpleHTTPRequestHandler):
    files: HTTPFiles

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.files.requests.append(self.path)
        flaky = self.files.flaky.get(self.path, 0)
        if self.path in self.files.cut or flaky > 0:
            if flaky > 0:
                self.files.flaky[self.path] = flaky - 1
            data = (self.files.root / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])  # then the connection drops
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@contextmanager
def http_file_server(root: Path) -> Iterator[HTTPFiles]:
    """Serve `root` over HTTP on 127.0.0.1 (a free port) while the block runs."""
    files = HTTPFiles(root)
    handler = type("Handler", (_Handler,), {"files": files})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    files.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield files
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
