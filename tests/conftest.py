"""Shared test setup: keep process-wide torch settings from leaking between tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_globals() -> Iterator[None]:
    """Importing min_dalle turns autograd off and changes the thread count for the whole process: restore both."""
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    yield
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)
