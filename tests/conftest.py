"""Shared test setup: keep process-wide torch settings from leaking between tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from dallemini import threads
from tests.fakehub import FakeHub, point_hf_at

# Thread counts tuned by timing would make pixels (not tokens) depend on the machine's load, by a
# level here and there; tests that compare images run with the count they set. tests/test_threads.py
# tests the tuning itself.
os.environ.setdefault("DALLEMINI_TUNE_THREADS", "0")
# Likewise the few-row product path is fixed (timing would pick it by load); tests of the choice
# itself unset it.
os.environ.setdefault("DALLEMINI_FEW_ROWS", "native")


@pytest.fixture(autouse=True)
def _torch_globals() -> Iterator[None]:
    """Importing min_dalle turns autograd off and changes the thread count for the whole process: restore both."""
    grad, count, state = torch.is_grad_enabled(), torch.get_num_threads(), dict(threads._STATE)
    yield
    torch.set_grad_enabled(grad)
    torch.set_num_threads(count)
    threads._STATE.update(state)
    threads._TUNERS.clear()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A FakeHub on 127.0.0.1 with huggingface_hub pointed at it and at a fresh cache under tmp_path,
    in this process (module constants) and in child processes (HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, ...)."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub.utils import close_session

    with FakeHub() as hub:
        point_hf_at(hub.url, tmp_path / "hf", monkeypatch)
        close_session()  # a fresh HTTP client: no pooled connections, proxies read from the new env
        try:
            yield hub
        finally:
            close_session()
