"""Two `dallemini serve` processes sharing one --image-store: an image made by one is served by the
other; and a store that cannot be used stops `serve` at start."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from dallemini.random_model import create_random_model
from dallemini.serve.server import free_port
from tests.test_cli import run_here


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random_model(tmp_path_factory.mktemp("replicas") / "tiny", preset="tiny")


@contextmanager
def replica(model: Path, store: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A `dallemini serve` process on a free port of 127.0.0.1 with `--image-store store`: its base
    URL and process (stopped with SIGTERM on exit)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "dallemini.cli", "serve", "--model", str(model)),
            *("--port", str(port), "--device", "cpu", "--threads", "1"),
            *("--image-store", str(store)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until the process answers /health with 200."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the server at {base} did not come up"
        time.sleep(0.2)


def test_an_image_made_by_one_replica_is_served_by_another(tiny: Path, tmp_path: Path) -> None:
    store = tmp_path / "shared" / "images"  # created by the servers
    with ExitStack() as stack:
        (a, proc_a), (b, proc_b) = (stack.enter_context(replica(tiny, store)) for _ in range(2))
        wait_ready(a, proc_a)
        wait_ready(b, proc_b)
        body = {"prompt": "a cat", "num_images": 2, "seed": 5, "response": "url"}
        r = httpx.post(f"{a}/v1/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        urls = [im["url"] for im in r.json()["images"]]
        assert len(urls) == 2 and all(u.startswith(f"{a}/v1/images/") for u in urls)
        for url in urls:
            path = urlsplit(url).path
            from_a, from_b = httpx.get(f"{a}{path}"), httpx.get(f"{b}{path}")
            assert from_b.status_code == 200 and from_b.headers["content-type"] == "image/png"
            assert from_b.content.startswith(b"\x89PNG\r\n\x1a\n")
            assert from_b.content == from_a.content == (store / Path(path).name).read_bytes()
        assert sorted(p.name for p in store.iterdir()) == sorted(
            Path(urlsplit(u).path).name for u in urls
        )  # the PNG files and nothing else
        unknown = httpx.get(f"{b}/v1/images/{secrets.token_urlsafe(16)}.png")
        assert unknown.status_code == 404 and "no such image" in unknown.json()["detail"]
        for malformed in ("not-an-id", "a" * 23, "..%2F..%2Fetc%2Fpasswd"):
            assert httpx.get(f"{b}/v1/images/{malformed}.png").status_code == 404, malformed
        proc_a.send_signal(signal.SIGTERM)
        proc_b.send_signal(signal.SIGTERM)
    assert proc_a.returncode in (0, -signal.SIGTERM)
    assert proc_b.returncode in (0, -signal.SIGTERM)


def test_an_image_store_that_cannot_be_used_is_a_user_error(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, err = run_here(capsys, "serve", "--model", tiny, "--image-store", blocker / "images")
    assert code == 2, err
    assert f"image store {blocker / 'images'}: cannot create the directory" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
