"""What the routes of one app share: the pipeline, its batcher, the image cache, and how a request becomes a job and a reply.

One Service is made per app and held on `app.state.service`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict
from typing import Any

import anyio
import torch
from fastapi import Depends, HTTPException, Request
from PIL import Image

from .. import __version__
from ..errors import DalleMiniError
from ..pipeline import GeneratedImage, TextToImage
from .batcher import Batcher, Job, Rejected
from .errors import error_responses, invalid, job_error
from .metrics import Metrics
from .scheduler import ContinuousBatcher
from .schemas import (
    MAX_PROMPT_CHARS,
    GenerateRequest,
    GenerateResponse,
    ImageOut,
    Settings,
    query_model,
    request_model,
)
from .security import api_key_dependency
from .settings import ServeSettings
from .support import b64, decode_image, image_store, png_bytes


class Updates:
    """Frames and completion of one job, handed from the worker thread to the event loop (latest frame only)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.frame: tuple[list, int, int] | None = None
        self.event = asyncio.Event()

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        """Run fn on the loop; a loop already closed (server gone) is ignored."""
        with suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)

    def on_frame(self, images: list, done: int, total: int) -> None:
        """Worker thread: a new partial frame (replaces one not sent yet)."""
        self._call(self._set_frame, (images, done, total))

    def on_done(self, job: Job) -> None:
        """Worker thread: the job finished."""
        self._call(self.event.set)

    def _set_frame(self, frame: tuple[list, int, int]) -> None:
        self.frame = frame
        self.event.set()

    async def wait(self, timeout: float) -> tuple[list, int, int] | None:
        """Wait up to `timeout` s for news; returns a new frame if there is one."""
        with suppress(asyncio.TimeoutError):  # not the builtin TimeoutError before Python 3.11
            await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()
        frame, self.frame = self.frame, None
        return frame


async def encode_pngs(images: list[GeneratedImage]) -> list[bytes]:
    """The images as PNG files, encoded off the event loop."""
    return await anyio.to_thread.run_sync(lambda: [png_bytes(g.image) for g in images])


def make_batcher(pipe: TextToImage, settings: ServeSettings) -> Batcher:
    """The server's batcher: continuous (iteration-level) or request-level, as the settings say."""
    if settings.batching == "continuous":
        return ContinuousBatcher(
            pipe,
            max_batch_images=settings.max_batch_images,
            max_queue=settings.max_queue,
            stream_every=settings.stream_every,
        )
    return Batcher(
        pipe,
        max_batch_images=settings.max_batch_images,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        stream_every=settings.stream_every,
    )


class Service:
    """One server's pipeline, batcher, image cache and settings, with the steps its routes share."""

    def __init__(self, pipe: TextToImage, settings: ServeSettings) -> None:
        self.pipe = pipe
        self.settings = settings
        self.batcher = make_batcher(pipe, settings)
        # response="url" PNGs: in memory, or in a directory that replicas share
        self.cache = image_store(settings.image_store, settings.cache_images)
        self.metrics = Metrics(self.batcher)
        # The request model with this server's bound on num_images (the OpenAPI schema states it).
        self.Req = request_model(settings.max_images, settings.default_images)
        self.Query = query_model(self.Req)
        self.version = f"dallemini {__version__} ({settings.model_name})"
        # Without a key the schema declares no security scheme and no 401 answers.
        key = settings.api_key
        self.auth = [Depends(api_key_dependency(key))] if key is not None else []

    def errors(self, *codes: int) -> dict[int | str, dict[str, Any]]:
        """OpenAPI error entries of a route (401 only when an API key is required)."""
        return error_responses(*(c for c in codes if c != 401 or self.settings.api_key is not None))

    def submit(
        self,
        req: GenerateRequest,
        num_images: int,
        on_frame: Callable[..., object] | None = None,
        request_id: str | None = None,
    ) -> Job:
        """Queue a validated request (429/503 with Retry-After when it cannot be taken)."""
        pipe = self.pipe
        try:
            # The request's one SamplingConfig (the model's defaults under what it gives), handed
            # down as is: the batcher groups by it and the pipeline samples with it.
            sampling = pipe.sampling(**req.sampling_overrides())
            pipe.text([req.prompt])  # a prompt with nothing to tokenize fails here, not in a batch
        except DalleMiniError as e:
            raise invalid("prompt" if "prompt" in str(e) else "settings", str(e)) from e
        init_image = self.init_image(req)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        try:
            return self.batcher.submit(
                req.prompt,
                num_images,
                seed,
                sampling,
                rerank=req.rerank,
                on_frame=on_frame,
                timeout_s=self.settings.timeout_s,
                init_image=init_image,
                keep_rows=req.keep_rows if init_image is not None else 0,
                request_id=request_id,
            )
        except Rejected as e:
            raise HTTPException(
                e.status, str(e), headers={"Retry-After": str(e.retry_after)}
            ) from e

    def init_image(self, req: GenerateRequest) -> Image.Image | None:
        """A completion's init image, decoded and checked (422 for a bad one or bad keep_rows)."""
        grid = self.pipe.config.vqgan.grid_size
        if req.keep_rows > grid:
            raise invalid(
                "keep_rows", f"keep_rows must be at most {grid} (the token grid is {grid}x{grid})"
            )
        if req.init_image is None:
            if req.keep_rows:
                raise invalid("keep_rows", "keep_rows needs an init_image to take the rows from")
            return None
        try:
            return decode_image(req.init_image)
        except ValueError as e:
            raise invalid("init_image", str(e)) from e

    async def wait(self, job: Job, request: Request) -> list[GeneratedImage]:
        """Await a job; 504 past its deadline (dropped if not started), dropped if the client leaves."""
        updates = Updates(asyncio.get_running_loop())
        job.add_done_callback(updates.on_done)
        while not job.done():
            left = job.deadline - time.monotonic()
            if left <= 0:
                self.batcher.cancel(job, expired=True)
                if not (job.done() and job.state == "done"):
                    raise HTTPException(504, "the request timed out")
                break
            await updates.wait(min(0.5, left))
            if not job.done() and await request.is_disconnected():
                self.batcher.cancel(job)
                raise HTTPException(499, "the client went away")
        if job.state != "done" or job.result is None:
            raise job_error(job)
        return job.result

    async def render(
        self, request: Request, req: GenerateRequest, job: Job, images: list[GeneratedImage]
    ) -> dict[str, Any]:
        """The response body for a finished job."""
        pngs = await encode_pngs(images)
        out = []
        for g, data in zip(images, pngs, strict=True):
            if req.response == "url":
                image_id = await anyio.to_thread.run_sync(self.cache.put, data)  # may write a file
                url = str(request.url_for("image", image_id=image_id))
                out.append(ImageOut(seed=g.seed, score=g.score, url=url))
            else:
                out.append(ImageOut(seed=g.seed, score=g.score, base64=b64(data)))
        used = Settings(
            num_images=job.num_images,
            seed=job.seed,
            rerank=job.rerank and getattr(self.pipe, "scorer", None) is not None,
            keep_rows=job.keep_rows,
            **job.settings.to_dict(),
        )
        queued = (job.started or job.enqueued) - job.enqueued
        run = (job.finished or time.monotonic()) - (job.started or job.enqueued)
        return GenerateResponse(
            prompt=req.prompt,
            unknown_words=self.unknown_words(req.prompt),
            read_as=self.read_as(req.prompt),
            images=out,
            settings=used,
            model=self.settings.model_name,
            queued_s=round(queued, 4),
            run_s=round(run, 4),
        ).model_dump(mode="json")

    def unknown_words(self, prompt: str) -> list[str]:
        """The words of a prompt the model never saw in training (none when it lists no vocabulary)."""
        find = getattr(self.pipe, "unknown_words", None)
        return find(prompt) if find is not None else []

    def read_as(self, prompt: str) -> dict[str, str]:
        """The prompt's words the model reads as others (its synonym list; none without one)."""
        read = getattr(self.pipe, "read_prompt", None)
        return dict(read(prompt)[1]) if read is not None else {}

    def health(self) -> dict[str, Any]:
        """The /health body: readiness, queue depth, counters, the model, defaults and limits."""
        pipe, settings, batcher = self.pipe, self.settings, self.batcher
        cfg = pipe.config
        examples = getattr(pipe, "examples", None)
        return {
            "status": "ok" if batcher.accepting else "shutting down",
            "ready": batcher.accepting,
            "version": self.version,
            "auth": settings.api_key is not None,
            "queue": batcher.depth(),
            "stats": asdict(batcher.stats),
            "model": {
                "name": settings.model_name,
                "device": str(getattr(pipe, "device", "")),
                "dtype": str(getattr(pipe, "dtype", "")).removeprefix("torch."),
                "threads": torch.get_num_threads(),
                "image_size": cfg.vqgan.resolution,
                "grid": cfg.vqgan.grid_size,
                "image_tokens": cfg.bart.image_length,
                "reranker": getattr(pipe, "scorer", None) is not None,
                "builtin": bool(getattr(pipe, "is_builtin", False)),
                # what the model draws (its directory's examples.json): a line and example prompts
                "description": examples.description if examples is not None else None,
                "examples": list(examples.prompts) if examples is not None else [],
            },
            "defaults": {"num_images": self.Req.model_fields["num_images"].default}
            | cfg.sampling.to_dict(),
            "limits": {
                "max_images": settings.max_images,
                "batching": settings.batching,
                "max_batch_images": settings.max_batch_images,
                "max_queue_images": settings.max_queue,
                "max_prompt_chars": MAX_PROMPT_CHARS,
                "timeout_s": settings.timeout_s,
            },
        }
