"""The service under a real uvicorn on 127.0.0.1: overload (429), timeouts (504), clients that leave,
graceful shutdown with requests in flight, and the web page driven in Chromium."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from dallemini.checkpoints.native import write_examples, write_vocabulary
from dallemini.pipeline import TextToImage
from dallemini.random_model import create_random_model
from dallemini.serve import ServeSettings, create_app
from dallemini.serve.server import BackgroundServer
from dallemini.synonyms import write_synonyms
from tests.serve_utils import GatedPipe

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> TextToImage:
    d = create_random_model(tmp_path_factory.mktemp("server") / "tiny", preset="tiny")
    return TextToImage.from_pretrained(d, device="cpu")


def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until check() is true."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


class Call(threading.Thread):
    """One HTTP request in a background thread; `response` (or `error`) once joined."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.response: httpx.Response | None = None
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            self.response = httpx.post(self.url, json=self.body, timeout=60)
        except Exception as e:
            self.error = e

    def status(self) -> int:
        self.join(60)
        assert self.response is not None, self.error
        return self.response.status_code


def queued(srv: BackgroundServer) -> int:
    return httpx.get(f"{srv.url}/health").json()["queue"]["queued_requests"]


def test_overload_gets_429_with_retry_after(pipe: TextToImage) -> None:
    gated = GatedPipe(pipe)
    gated.gate.clear()
    app = create_app(gated, ServeSettings(max_queue=4, max_images=4, original_images=4))
    with BackgroundServer(app) as srv:
        running = Call(f"{srv.url}/v1/generate", {"prompt": "running", "num_images": 1})
        assert gated.entered.wait(10)
        waiting = Call(f"{srv.url}/v1/generate", {"prompt": "waiting", "num_images": 4})
        until(lambda: queued(srv) == 1)
        r = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "one more", "num_images": 1})
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["detail"]
        s = httpx.get(f"{srv.url}/v1/generate/stream", params={"prompt": "x", "num_images": 1})
        assert s.status_code == 429 and "retry-after" in s.headers
        gated.gate.set()
        assert running.status() == 200 and waiting.status() == 200


def test_timeout_gives_504_and_drops_work_that_has_not_started(pipe: TextToImage) -> None:
    gated = GatedPipe(pipe)
    gated.gate.clear()
    app = create_app(gated, ServeSettings(timeout_s=1.0))
    with BackgroundServer(app) as srv:
        running = Call(f"{srv.url}/v1/generate", {"prompt": "running", "num_images": 1})
        assert gated.entered.wait(10)
        t0 = time.monotonic()
        late = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "late"}, timeout=30)
        assert late.status_code == 504 and "timed out" in late.json()["detail"]
        assert time.monotonic() - t0 < 5
        assert running.status() == 504  # it ran too long; its work finishes but nobody gets it
        gated.gate.set()
        until(lambda: httpx.get(f"{srv.url}/health").json()["queue"]["running_requests"] == 0)
        assert app.state.batcher.stats.expired == 1
    assert "late" not in gated.prompts_run()


def test_clients_that_leave_drop_their_queued_work(pipe: TextToImage) -> None:
    gated = GatedPipe(pipe)
    gated.gate.clear()
    app = create_app(gated, ServeSettings())
    stats = app.state.batcher.stats
    with BackgroundServer(app) as srv:
        running = Call(f"{srv.url}/v1/generate", {"prompt": "running", "num_images": 1})
        assert gated.entered.wait(10)
        # A plain POST whose client hangs up while the request waits in the queue.
        body = json.dumps({"prompt": "gone", "num_images": 2}).encode()
        with socket.create_connection((srv.host, srv.port)) as sock:
            sock.sendall(
                b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            until(lambda: queued(srv) == 1)
        until(lambda: stats.cancelled == 1)
        # An event stream whose reader goes away after the first event.
        params = {"prompt": "gone too", "num_images": 1}
        with httpx.stream("GET", f"{srv.url}/v1/generate/stream", params=params) as r:
            assert r.status_code == 200
            assert next(r.iter_lines()).startswith("event: accepted")
        until(lambda: stats.cancelled == 2)
        assert queued(srv) == 0
        gated.gate.set()
        assert running.status() == 200
    assert gated.prompts_run() == ["running"]


def test_graceful_shutdown_finishes_requests_in_flight(pipe: TextToImage) -> None:
    gated = GatedPipe(pipe)
    gated.gate.clear()
    app = create_app(gated, ServeSettings(max_batch_images=2))
    srv = BackgroundServer(app).start()
    calls = [Call(f"{srv.url}/v1/generate", {"prompt": "first", "num_images": 1})]
    assert gated.entered.wait(10)
    calls += [
        Call(f"{srv.url}/v1/generate", {"prompt": f"p{i}", "num_images": 2, "top_k": i})
        for i in range(3)
    ]
    until(lambda: queued(srv) == 3)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    until(lambda: not app.state.batcher.accepting)
    try:  # new work is turned away: 503, or no connection at all once uvicorn stops listening
        late = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "late"}, timeout=10)
        assert late.status_code == 503 and "retry-after" in late.headers
    except httpx.TransportError:
        pass
    gated.gate.set()
    stopper.join(60)
    assert not stopper.is_alive()
    assert [c.status() for c in calls] == [200] * 4
    assert [len(c.response.json()["images"]) for c in calls] == [1, 2, 2, 2]
    assert "late" not in gated.prompts_run()


EXAMPLES = ["pizza on a blue background, top left", "avocado on red, center"]


@pytest.fixture(scope="module")
def described(tmp_path_factory: pytest.TempPathFactory) -> TextToImage:
    """A tiny random model whose directory lists a vocabulary and example prompts."""
    d = create_random_model(tmp_path_factory.mktemp("described") / "tiny", preset="tiny")
    write_vocabulary(d, EXAMPLES)
    write_examples(d, EXAMPLES, "pizza and avocados on coloured backgrounds")
    write_synonyms(d, {"guacamole fruit": "avocado"}, ["avocado"])
    return TextToImage.from_pretrained(d, device="cpu")


def _check_examples_and_unknown_words(page: Any, expect: Any) -> None:
    """The page says what the model draws, its examples fill the prompt box, and a prompt with
    words the model does not know gets a note naming them."""
    expect(page.locator("#about-text")).to_contain_text("pizza and avocados")
    buttons = page.locator("#examples button.example")
    expect(buttons).to_have_text(EXAMPLES)
    buttons.nth(1).click()
    assert page.input_value("#prompt") == EXAMPLES[1]
    page.fill("#prompt", "An armchair in the shape of an avocado")
    page.click("#run")
    note = page.locator("#unknown")
    expect(note).to_contain_text("This model does not know: armchair, shape")
    expect(page.locator("#status")).to_contain_text("Done in", timeout=30_000)
    page.fill("#prompt", "a guacamole fruit on red, center")
    page.click("#run")
    expect(note).to_have_text('This model reads "guacamole fruit" as "avocado".')
    expect(page.locator("#status")).to_contain_text("Done in", timeout=30_000)
    buttons.nth(0).click()
    page.click("#run")
    expect(page.locator("#status")).to_contain_text("Done in", timeout=30_000)
    expect(note).to_be_hidden()


def test_web_page_fills_the_grid_from_the_stream(described: TextToImage, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing: run `bash tools/install-system-deps.sh`")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]'")
    app = create_app(described, ServeSettings(model_name="tiny", max_images=8))
    prompt = "pizza on a blue background, top left"
    with BackgroundServer(app) as srv, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(srv.url)
            sync_api.expect(page.locator("#footer")).to_contain_text("64×64 px")
            assert page.get_attribute("#num_images", "max") == "8"
            _check_examples_and_unknown_words(page, sync_api.expect)
            page.fill("#prompt", prompt)
            page.click("#settings summary")
            page.fill("#num_images", "4")
            page.fill("#seed", "3")
            assert page.input_value("#top_p") == ""  # empty: the model's default, shown
            assert page.get_attribute("#top_p", "placeholder") == "default (1)"
            page.fill("#top_p", "0.9")
            with page.expect_request(lambda r: "/v1/generate/stream" in r.url) as sent:
                page.click("#run")
            sent_body = sent.value.post_data_json
            assert sent_body["top_p"] == 0.9 and sent_body["seed"] == 3
            cards = page.locator(".card.done")
            sync_api.expect(cards).to_have_count(4, timeout=30_000)
            sync_api.expect(page.locator("#status")).to_contain_text("Done in")
            sizes = page.eval_on_selector_all(".card img", "els => els.map(e => e.naturalWidth)")
            assert sizes == [64] * 4
            # 64×64 images shown large enough to see, each pixel a sharp square
            shown = page.eval_on_selector_all(
                ".card img",
                "els => els.map(e => [e.clientWidth, getComputedStyle(e).imageRendering])",
            )
            assert all(w >= 192 and r == "pixelated" for w, r in shown), shown
            sync_api.expect(page.locator("#unknown")).to_be_hidden()  # every word is known
            assert int(page.get_attribute("#grid", "data-frames") or 0) >= 1  # partial frames came
            labels = page.locator(".card .meta span").all_inner_texts()
            assert labels == ["seed 3", "seed 4", "seed 5", "seed 6"]
            with page.expect_download() as download:
                page.locator(".card a.download").first.click()
            assert download.value.suggested_filename == (
                "dallemini-pizza-on-a-blue-background-top-left-3.png"
            )
            page.screenshot(path=tmp_path / "page.png", full_page=True)
            # A server-side validation error is shown on the page.
            page.fill("#seed", "-5")
            page.click("#run")
            error = page.locator("#error")
            sync_api.expect(error).to_be_visible()
            sync_api.expect(error).to_contain_text("Error 422: seed")
            sync_api.expect(cards).to_have_count(4)  # the last results stay
            page.screenshot(path=tmp_path / "error.png", full_page=True)
            _check_completion(page, sync_api.expect, tmp_path)
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000


def _check_completion(page: Any, expect: Any, tmp_path: Path) -> None:
    """Start from an image: the page sends it with the rows to keep, and the images come back."""
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "init.png")
    page.fill("#seed", "3")
    page.set_input_files("#init_image", str(tmp_path / "init.png"))
    page.fill("#keep_rows", "2")
    with page.expect_request(lambda r: "/v1/generate/stream" in r.url) as sent:
        page.click("#run")
    body = sent.value.post_data_json
    assert body["keep_rows"] == 2 and len(body["init_image"]) > 100
    expect(page.locator("#status")).to_contain_text("Done in", timeout=30_000)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator(".card.done")).to_have_count(4)


def test_a_client_stalled_mid_body_cannot_hold_shutdown_past_the_drain_timeout(
    pipe: TextToImage,
) -> None:
    app = create_app(pipe, ServeSettings(drain_timeout_s=1.0))
    srv = BackgroundServer(app).start()
    stalled = socket.create_connection((srv.host, srv.port))
    head = "POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    stalled.sendall(f"{head}Content-Length: 100\r\n\r\n{{".encode())  # 99 bytes never come
    try:
        until(lambda: httpx.get(f"{srv.url}/health").status_code == 200)
        started = time.monotonic()
        srv.stop(timeout=30)
        assert not srv.thread.is_alive()
        assert time.monotonic() - started < 10  # the drain timeout, not the client, decides
    finally:
        stalled.close()


def test_drain_timeout_must_be_positive() -> None:
    with pytest.raises(Exception, match="drain_timeout_s"):
        ServeSettings(drain_timeout_s=0).check()


def test_work_cut_at_the_drain_deadline_is_logged_by_request_id(
    pipe: TextToImage, caplog: pytest.LogCaptureFixture
) -> None:
    gated = GatedPipe(pipe)
    gated.gate.clear()  # the decoding step never finishes before the deadline
    app = create_app(gated, ServeSettings(drain_timeout_s=1.0))
    srv = BackgroundServer(app).start()
    try:
        body = json.dumps({"prompt": "too slow", "num_images": 2}).encode()
        with socket.create_connection((srv.host, srv.port)) as sock:
            sock.sendall(
                b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + b"X-Request-ID: slow-request-7\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert gated.entered.wait(10)
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="dallemini.serve"):
                srv.stop(timeout=30)
            assert not srv.thread.is_alive()
            assert time.monotonic() - started < 1.0 + 5  # the drain deadline + the short grace
    finally:
        gated.gate.set()
        app.state.batcher._thread.join(30)  # it stops after the step it was in
    assert not app.state.batcher._thread.is_alive()
    lines = [r.getMessage() for r in caplog.records]
    assert any("slow-request-7" in m and "not answered" in m for m in lines), lines
    assert app.state.batcher.stats.done == 0
