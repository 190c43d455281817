"""`dallemini serve`: its user errors (exit 2) and a real server process that shuts down gracefully."""

from __future__ import annotations

import base64
import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from dallemini.random_model import create_random_model
from dallemini.serve.server import free_port
from tests.test_cli import run_here


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random_model(tmp_path_factory.mktemp("serve-cli") / "tiny", preset="tiny")


def test_serve_user_errors_exit_2(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (
            ("serve", "--model", tiny, "--max-queue", "4"),
            "max_queue (4) must hold one whole request (16 images",
        ),
        (
            ("serve", "--model", tiny, "--max-batch-images", "0"),
            "max_batch_images must be at least 1",
        ),
        (("serve", "--model", tiny, "--port", "0"), "--port must be between 1 and 65535"),
        (("serve", "--model", tiny, "--api-key", " "), "API key must not be empty"),
        (("serve", "--model", tiny.parent / "missing"), "does not exist"),
    ]
    for args, message in cases:
        code, err = run_here(capsys, *args)
        assert code == 2, (args, code, err)
        assert message in err, (args, err)


def test_serve_process_answers_the_original_protocol_and_stops_on_sigterm(tiny: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dallemini.cli",
            "serve",
            "--model",
            tiny,
            "--port",
            str(port),
            "--device",
            "cpu",
            "--api-key",
            "k",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        r = httpx.post(
            f"{base}/generate", json={"prompt": "a cat"}, headers={"X-API-Key": "k"}, timeout=60
        )
        assert r.status_code == 200
        images = [Image.open(io.BytesIO(base64.b64decode(i))) for i in r.json()["images"]]
        assert len(images) == 9
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # uvicorn re-raises the signal once it has shut down, so the exit status says SIGTERM.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
