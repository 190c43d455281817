"""Running the app under uvicorn with graceful shutdown, in the foreground or in a background thread."""

from __future__ import annotations

import errno
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from ..errors import ConfigError


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that turns new work away (503) as soon as shutdown begins.

    uvicorn then stops listening, waits for the requests in flight, and runs the app's lifespan
    shutdown, which finishes every accepted job before the process exits.
    """

    def handle_exit(self, sig: int, frame: object) -> None:
        """On SIGINT/SIGTERM: stop accepting work, then uvicorn's own shutdown."""
        batcher = getattr(getattr(self.config.app, "state", None), "batcher", None)
        if batcher is not None:
            batcher.stop_accepting()
        super().handle_exit(sig, frame)


def make_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> GracefulServer:
    """A GracefulServer for the app: on SIGTERM, requests in flight get the app's
    `settings.drain_timeout_s`; connections still open then (a client stalled mid-body) are closed."""
    settings = getattr(app.state, "settings", None)
    drain = getattr(settings, "drain_timeout_s", None)
    config = uvicorn.Config(
        app,
        host,
        port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=drain,
        access_log=False,  # the app writes its own, with request ids (serve/access.py)
    )
    return GracefulServer(config)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (not listening yet); ConfigError when the port is taken or the host bad."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use: stop what uses it or pick another --port"
            ) from e
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


def run(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully; `sock`: already bound (see `bind_socket`)."""
    sock = sock if sock is not None else bind_socket(host, port)
    server = make_server(app, host, port, log_level)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise ConfigError(f"could not start the server on {host}:{port}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on host now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """The app served by uvicorn in a thread on 127.0.0.1 (for tests and benchmarks); a context manager."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.server = make_server(app, self.host, self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        """Start and wait until it listens."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful shutdown, as on SIGTERM: finish what was accepted, then stop."""
        self.server.handle_exit(15, None)
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
