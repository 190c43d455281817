"""Helpers for the serve tests: a pipeline wrapper that counts calls and can hold the worker at a gate."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from dallemini.pipeline import TextToImage


class GatedPipe:
    """Wraps a TextToImage: records every generation call and waits at `gate` (open by default) first."""

    def __init__(self, pipe: TextToImage) -> None:
        self.pipe = pipe
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a call reached the gate
        self.calls: list[tuple[str, list[str], list[int]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def _enter(self, kind: str, prompts: Any, counts: Any) -> None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        counts = [counts] * len(prompts) if isinstance(counts, int) else list(counts)
        self.calls.append((kind, prompts, counts))
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"

    def __call__(self, prompts: Any, **kwargs: Any) -> Any:
        self._enter("call", prompts, kwargs.get("num_images", 1))
        return self.pipe(prompts, **kwargs)

    def stream(self, prompts: Any, **kwargs: Any) -> Iterator[Any]:
        self._enter("stream", prompts, kwargs.get("num_images", 1))
        yield from self.pipe.stream(prompts, **kwargs)

    def row_requests(self, prompt: str, num_images: int, *args: Any, **kwargs: Any) -> Any:
        """Continuous batching: a request's rows are made as it is admitted."""
        self.calls.append(("rows", [prompt], [num_images]))
        return self.pipe.row_requests(prompt, num_images, *args, **kwargs)

    def running_batch(self, capacity: int) -> Any:
        """Continuous batching: a running batch whose every step waits at the gate first."""
        batch = self.pipe.running_batch(capacity)
        step = batch.step

        def gated_step() -> Any:
            self.entered.set()
            assert self.gate.wait(60), "the test never opened the gate"
            return step()

        batch.step = gated_step
        return batch

    def prompts_run(self) -> list[str]:
        """Every prompt that reached the pipeline, in order."""
        return [p for _, prompts, _ in self.calls for p in prompts]
