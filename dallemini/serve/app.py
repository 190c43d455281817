"""The web service: FastAPI app with the HTTP API, the original demo's backend protocol and the web page.

No `from __future__ import annotations` here: FastAPI reads the route functions' annotations at run
time, and some name types defined inside create_app.
"""

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..errors import ConfigError, DalleMiniError
from ..pipeline import GeneratedImage, TextToImage
from .batcher import Batcher, Job, JobCancelled, JobTimeout, Rejected
from .schemas import (
    MAX_PROMPT_CHARS,
    ErrorOut,
    GenerateRequest,
    GenerateResponse,
    ImageOut,
    InvalidOut,
    OriginalRequest,
    OriginalResponse,
    Settings,
    request_model,
)
from .support import BodyLimit, ImageCache, b64, png_bytes

log = logging.getLogger("dallemini.serve")
STATIC = Path(__file__).parent / "static"
API_KEY_ENV = "DALLEMINI_API_KEY"
IMAGE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # ImageCache ids (token_urlsafe); others are 422


@dataclass
class ServeSettings:
    """Limits and options of one server."""

    max_batch_images: int = 16  # images sampled together in one decoder batch
    max_wait_ms: float = 10.0  # how long the oldest request waits for others to join its batch
    max_queue: int = 64  # images waiting; past it new requests get 429
    timeout_s: float = 300.0  # per request, queueing included; past it 504
    api_key: str | None = None
    max_images: int = 16  # per request
    default_images: int = 4
    original_images: int = 9  # per request of the original demo protocol
    max_body_bytes: int = 16_384
    cache_images: int = 512  # PNGs kept for response="url"
    stream_every: int | None = None  # tokens between partial frames (default: one token row)
    model_name: str = "model"

    def check(self) -> None:
        """Raise ConfigError for limits that cannot work together."""
        for name in ("max_batch_images", "max_queue", "max_images", "original_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ConfigError("max_wait_ms must be >= 0 and timeout_s > 0")
        largest = max(self.max_images, self.original_images)
        if self.max_queue < largest:
            raise ConfigError(
                f"max_queue ({self.max_queue}) must hold one whole request ({largest} images: "
                f"max_images {self.max_images}, original protocol {self.original_images})"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key must not be empty")


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error replies (422 in this service's own shape)."""
    return {c: {"model": InvalidOut if c == 422 else ErrorOut} for c in codes}


def _invalid(loc: str, msg: str) -> RequestValidationError:
    """A 422 for one field, answered like pydantic's own validation errors."""
    return RequestValidationError([{"loc": ("body", loc), "msg": msg, "type": "value_error"}])


def _validation_message(exc: RequestValidationError) -> JSONResponse:
    """422 with one readable line ('field: what is wrong; ...') and the structured errors."""
    errors, lines = [], []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query")]
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "json_invalid":
            loc, msg = [], f"the body is not valid JSON ({msg})"
        lines.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
        errors.append({"loc": loc, "msg": msg, "type": str(e.get("type", ""))})
    return JSONResponse({"detail": "; ".join(lines), "errors": errors}, status_code=422)


async def _on_invalid(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler for request validation errors."""
    assert isinstance(exc, RequestValidationError)
    return _validation_message(exc)


def _auth_dependency(api_key: str) -> Callable[..., Any]:
    """A dependency that lets a request through only with the API key (declared in the OpenAPI schema)."""
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")

    async def check(
        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        x_key: Annotated[str | None, Depends(header)],
    ) -> None:
        want = api_key.encode()
        for given in (cred.credentials if cred else None, x_key):
            if given is not None and secrets.compare_digest(given.encode(), want):
                return
        raise HTTPException(
            401,
            "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
            headers={"WWW-Authenticate": "Bearer"},
        )

    return check


class _Updates:
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


def _sse(event: str, data: object) -> bytes:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _job_failure(job: Job) -> tuple[int, str]:
    """HTTP status and message for a job that did not produce images."""
    e = job.error
    if isinstance(e, JobTimeout):
        return 504, "the request timed out"
    if isinstance(e, JobCancelled):
        return 499, "the request was cancelled"
    if isinstance(e, DalleMiniError):
        return 422, str(e)
    return 500, f"generation failed: {type(e).__name__}"


def _job_error(job: Job) -> HTTPException | RequestValidationError:
    """The exception to answer a failed job with."""
    status, detail = _job_failure(job)
    return _invalid("prompt", detail) if status == 422 else HTTPException(status, detail)


def create_app(
    pipe_or_path: TextToImage | str | os.PathLike,
    settings: ServeSettings | None = None,
    **load: Any,
) -> FastAPI:
    """The FastAPI app serving a pipeline (or a model directory loaded with `load`: device, dtype, clip)."""
    settings = settings or ServeSettings()
    settings.check()
    if isinstance(pipe_or_path, (str, os.PathLike)):
        pipe = TextToImage.from_pretrained(pipe_or_path, **load)
        if settings.model_name == "model":
            settings.model_name = Path(pipe_or_path).name
    else:
        pipe = pipe_or_path
    batcher = Batcher(
        pipe,
        max_batch_images=settings.max_batch_images,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        stream_every=settings.stream_every,
    )
    cache = ImageCache(settings.cache_images)
    Req = request_model(settings.max_images, settings.default_images)
    version = f"dallemini {__version__} ({settings.model_name})"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        log.info("serving %s", version)
        yield
        # Graceful shutdown: no new work; everything accepted is finished before the worker stops.
        await anyio.to_thread.run_sync(batcher.close)

    app = FastAPI(
        title="dallemini",
        version=__version__,
        summary="DALL·E Mini text-to-image service",
        lifespan=lifespan,
    )
    app.state.batcher, app.state.pipe, app.state.settings, app.state.cache = (
        batcher,
        pipe,
        settings,
        cache,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    # Without a key the schema declares no security scheme and no 401 answers.
    keyed = settings.api_key is not None
    auth = [Depends(_auth_dependency(settings.api_key))] if settings.api_key is not None else []

    def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
        """OpenAPI error entries of a route (401 only when an API key is required)."""
        return _error_responses(*(c for c in codes if c != 401 or keyed))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def submit(
        req: GenerateRequest, num_images: int, on_frame: Callable[..., object] | None = None
    ) -> Job:
        """Queue a validated request (429/503 with Retry-After when it cannot be taken)."""
        try:
            # The request's one SamplingConfig (the model's defaults under what it gives), handed
            # down as is: the batcher groups by it and the pipeline samples with it.
            sampling = pipe.sampling(**req.sampling_overrides())
            pipe.text([req.prompt])  # a prompt with nothing to tokenize fails here, not in a batch
        except DalleMiniError as e:
            raise _invalid("prompt" if "prompt" in str(e) else "settings", str(e)) from e
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        try:
            return batcher.submit(
                req.prompt,
                num_images,
                seed,
                sampling,
                rerank=req.rerank,
                on_frame=on_frame,
                timeout_s=settings.timeout_s,
            )
        except Rejected as e:
            raise HTTPException(
                e.status, str(e), headers={"Retry-After": str(e.retry_after)}
            ) from e

    async def wait(job: Job, request: Request) -> list[GeneratedImage]:
        """Await a job; 504 past its deadline (dropped if not started), dropped if the client leaves."""
        updates = _Updates(asyncio.get_running_loop())
        job.add_done_callback(updates.on_done)
        while not job.done():
            left = job.deadline - time.monotonic()
            if left <= 0:
                batcher.cancel(job, expired=True)
                if not (job.done() and job.state == "done"):
                    raise HTTPException(504, "the request timed out")
                break
            await updates.wait(min(0.5, left))
            if not job.done() and await request.is_disconnected():
                batcher.cancel(job)
                raise HTTPException(499, "the client went away")
        if job.state != "done" or job.result is None:
            raise _job_error(job)
        return job.result

    async def render(
        request: Request, req: GenerateRequest, job: Job, images: list[GeneratedImage]
    ) -> dict[str, Any]:
        """The response body for a finished job."""
        pngs = await anyio.to_thread.run_sync(lambda: [png_bytes(g.image) for g in images])
        out = []
        for g, data in zip(images, pngs, strict=True):
            if req.response == "url":
                url = str(request.url_for("image", image_id=cache.put(data)))
                out.append(ImageOut(seed=g.seed, score=g.score, url=url))
            else:
                out.append(ImageOut(seed=g.seed, score=g.score, base64=b64(data)))
        used = Settings(
            num_images=job.num_images,
            seed=job.seed,
            rerank=job.rerank and getattr(pipe, "scorer", None) is not None,
            **job.settings.to_dict(),
        )
        queued = (job.started or job.enqueued) - job.enqueued
        run = (job.finished or time.monotonic()) - (job.started or job.enqueued)
        return GenerateResponse(
            prompt=req.prompt,
            images=out,
            settings=used,
            model=settings.model_name,
            queued_s=round(queued, 4),
            run_s=round(run, 4),
        ).model_dump(mode="json")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        """The web page."""
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get(
        "/health",
        summary="Readiness, queue depth and model info",
        responses={
            200: {"description": "serving: ready for work"},
            503: {
                "description": "shutting down: new work is turned away (same body, ready false)",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
        },
    )
    async def health() -> JSONResponse:
        """200 while serving, 503 once shutting down."""
        cfg = pipe.config
        body = {
            "status": "ok" if batcher.accepting else "shutting down",
            "ready": batcher.accepting,
            "version": version,
            "auth": settings.api_key is not None,
            "queue": batcher.depth(),
            "stats": asdict(batcher.stats),
            "model": {
                "name": settings.model_name,
                "device": str(getattr(pipe, "device", "")),
                "dtype": str(getattr(pipe, "dtype", "")).removeprefix("torch."),
                "image_size": cfg.vqgan.resolution,
                "grid": cfg.vqgan.grid_size,
                "image_tokens": cfg.bart.image_length,
                "reranker": getattr(pipe, "scorer", None) is not None,
            },
            "defaults": {"num_images": Req.model_fields["num_images"].default}
            | cfg.sampling.to_dict(),
            "limits": {
                "max_images": settings.max_images,
                "max_batch_images": settings.max_batch_images,
                "max_queue_images": settings.max_queue,
                "max_prompt_chars": MAX_PROMPT_CHARS,
                "timeout_s": settings.timeout_s,
            },
        }
        return JSONResponse(body, status_code=200 if batcher.accepting else 503)

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        dependencies=auth,
        summary="Generate images for a prompt",
        responses=errors(400, 401, 413, 422, 429, 503, 504),
    )
    async def generate(request: Request, req: Req) -> dict[str, Any]:  # type: ignore[valid-type]
        """Make num_images images (best first when reranked), inline as base64 PNG or as URLs."""
        job = submit(req, req.num_images)
        return await render(request, req, job, await wait(job, request))

    @app.get(
        "/v1/generate/stream",
        dependencies=auth,
        summary="Generate with server-sent events: partial frames, then the result",
        response_class=StreamingResponse,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "events: accepted, progress {done, total, images}, "
                "result (the /v1/generate body) or error {status, detail}",
            },
            **errors(401, 422, 429, 503),
        },
    )
    async def generate_stream(
        request: Request,
        req: Annotated[Req, Query()],  # type: ignore[valid-type]
    ) -> StreamingResponse:
        """Stream partial images as tokens arrive (in seed order), then the final images."""
        updates = _Updates(asyncio.get_running_loop())
        job = submit(req, req.num_images, on_frame=updates.on_frame)
        job.add_done_callback(updates.on_done)

        async def events() -> AsyncIterator[bytes]:
            try:
                yield _sse("accepted", {"num_images": job.num_images, "seed": job.seed})
                last_beat = time.monotonic()
                while not job.done():
                    left = job.deadline - time.monotonic()
                    if left <= 0:
                        batcher.cancel(job, expired=True)
                        if not job.done():
                            yield _sse("error", {"status": 504, "detail": "the request timed out"})
                            return
                        break
                    frame = await updates.wait(min(15.0, left))
                    if frame is not None and not job.done():
                        images, done, total = frame
                        pngs = await anyio.to_thread.run_sync(
                            lambda imgs=images: [b64(png_bytes(im, fast=True)) for im in imgs]
                        )
                        yield _sse("progress", {"done": done, "total": total, "images": pngs})
                    elif time.monotonic() - last_beat > 14:
                        last_beat = time.monotonic()
                        yield b": waiting\n\n"
                if job.state != "done" or job.result is None:
                    status, detail = _job_failure(job)
                    yield _sse("error", {"status": status, "detail": detail})
                    return
                yield _sse("result", await render(request, req, job, job.result))
            finally:
                if not job.done():  # the client left: drop the work if it has not started
                    batcher.cancel(job)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get(
        "/v1/images/{image_id}.png",
        name="image",
        dependencies=auth,
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **errors(401, 404, 422)},
        summary="An image made earlier with response='url'",
    )
    async def image(
        image_id: Annotated[
            str, PathParam(pattern=IMAGE_ID_PATTERN, description="id from a url reply")
        ],
    ) -> Response:
        """The PNG, while it is still in the server's bounded cache."""
        data = cache.get(image_id)
        if data is None:
            raise HTTPException(404, "no such image (images are kept for a limited time)")
        return Response(data, media_type="image/png", headers={"Cache-Control": "private"})

    @app.post(
        "/generate",
        response_model=OriginalResponse,
        dependencies=auth,
        summary="The original dalle-mini demo backend protocol",
        responses=errors(400, 401, 413, 422, 429, 503, 504),
    )
    async def generate_original(request: Request, body: OriginalRequest) -> dict[str, Any]:
        """{"prompt": ...} -> {"images": [base64 PNG, ...], "version": ...}, best first."""
        req = GenerateRequest(prompt=body.prompt)  # the model's defaults
        job = submit(req, settings.original_images)
        images = await wait(job, request)
        pngs = await anyio.to_thread.run_sync(lambda: [png_bytes(g.image) for g in images])
        return {"images": [b64(p) for p in pngs], "version": version}

    @app.get(
        "/version",
        dependencies=auth,
        summary="The original demo's version call",
        responses=errors(401),
    )
    async def version_() -> dict[str, str]:
        """{"version": ...} as the original backend answered."""
        return {"version": version}

    return app
