"""The routes, one APIRouter per concern: the web page and health, the JSON API, the original demo's protocol.

No `from __future__ import annotations` here: FastAPI reads the route functions' annotations at run
time, and the request model they take (`service.Req`, bounded by the server's settings) is made per
app, so the routers are made per app too.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from .batcher import Job
from .errors import job_failure
from .metrics import CONTENT_TYPE
from .schemas import GenerateRequest, GenerateResponse, OriginalRequest, OriginalResponse
from .service import Service, Updates, encode_pngs
from .support import b64, png_bytes

STATIC = Path(__file__).parent / "static"
# Image ids are URL-safe base64 (support.IMAGE_ID): other characters are 422; the store answers
# None (404) for anything not exactly an id, before any file is looked at.
IMAGE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
GENERATION_ERRORS = (400, 401, 413, 422, 429, 503, 504)  # what a request for images may meet


def _generation_post(
    router: APIRouter, service: Service, path: str, model: type, summary: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """router.post for a route that makes images and answers with `model`."""
    return router.post(
        path, response_model=model, summary=summary, responses=service.errors(*GENERATION_ERRORS)
    )


def _rid(request: Request) -> str | None:
    """The request's id (access.RequestIds), for the logs of its job."""
    return getattr(request.state, "request_id", None)


def _sse(event: str, data: object) -> bytes:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stream_events(
    service: Service, request: Request, req: GenerateRequest, job: Job, updates: Updates
) -> AsyncIterator[bytes]:
    """The events of a streamed job: accepted, progress frames (and heartbeats), then result or error."""
    try:
        accepted = {
            "num_images": job.num_images,
            "seed": job.seed,
            "unknown_words": service.unknown_words(req.prompt),
            "read_as": service.read_as(req.prompt),
        }
        yield _sse("accepted", accepted)
        last_beat = time.monotonic()
        while not job.done():
            left = job.deadline - time.monotonic()
            if left <= 0:
                service.batcher.cancel(job, expired=True)
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
            status, detail = job_failure(job)
            yield _sse("error", {"status": status, "detail": detail})
            return
        yield _sse("result", await service.render(request, req, job, job.result))
    finally:
        if not job.done():  # the client left: drop the work if it has not started
            service.batcher.cancel(job)


def _event_stream(service: Service, request: Request, req: GenerateRequest) -> StreamingResponse:
    """Submit a streamed request and answer with its events."""
    updates = Updates(asyncio.get_running_loop())
    job = service.submit(req, req.num_images, on_frame=updates.on_frame, request_id=_rid(request))
    job.add_done_callback(updates.on_done)
    return StreamingResponse(
        _stream_events(service, request, req, job, updates),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def page_router(service: Service) -> APIRouter:
    """GET / (the web page) and GET /health."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        """The web page."""
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @router.get(
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
        body = service.health()
        return JSONResponse(body, status_code=200 if service.batcher.accepting else 503)

    @router.get(
        "/metrics",
        summary="Prometheus metrics: queue, requests by outcome, images, request latency",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
    )
    async def metrics() -> Response:
        """The server's metrics in the Prometheus text exposition format."""
        return Response(service.metrics.text(), media_type=CONTENT_TYPE)

    return router


def api_router(service: Service) -> APIRouter:
    """The JSON API (behind the API key when there is one): generate, stream, fetch an image."""
    router = APIRouter(dependencies=service.auth)
    Req = service.Req
    errors = service.errors

    @_generation_post(
        router, service, "/v1/generate", GenerateResponse, "Generate images for a prompt"
    )
    async def generate(request: Request, req: Req) -> dict[str, Any]:  # type: ignore[valid-type]
        """Make num_images images (best first when reranked), inline as base64 PNG or as URLs."""
        with service.metrics.timed("/v1/generate"):
            job = service.submit(req, req.num_images, request_id=_rid(request))
            return await service.render(request, req, job, await service.wait(job, request))

    @router.get(
        "/v1/generate/stream",
        summary="Generate with server-sent events: partial frames, then the result",
        response_class=StreamingResponse,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "events: accepted {num_images, seed, unknown_words, read_as}, progress "
                "{done, total, images}, result (the /v1/generate body) or error {status, detail}",
            },
            **errors(401, 422, 429, 503),
        },
    )
    async def generate_stream(
        request: Request,
        req: Annotated[service.Query, Query()],  # type: ignore[name-defined]
    ) -> StreamingResponse:
        """Stream partial images as tokens arrive (in seed order), then the final images."""
        return _event_stream(service, request, req)

    @router.post(
        "/v1/generate/stream",
        summary="Generate with server-sent events, the request as a JSON body",
        response_class=StreamingResponse,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "the events of GET /v1/generate/stream",
            },
            **errors(400, 401, 413, 422, 429, 503),
        },
    )
    async def generate_stream_post(request: Request, req: Req) -> StreamingResponse:  # type: ignore[valid-type]
        """GET /v1/generate/stream with the /v1/generate body (an init_image fits here)."""
        return _event_stream(service, request, req)

    @router.get(
        "/v1/images/{image_id}.png",
        name="image",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **errors(401, 404, 422)},
        summary="An image made earlier with response='url'",
    )
    async def image(
        image_id: Annotated[
            str, PathParam(pattern=IMAGE_ID_PATTERN, description="id from a url reply")
        ],
    ) -> Response:
        """The PNG, while it is still in the server's bounded store (memory or a shared directory)."""
        data = await anyio.to_thread.run_sync(service.cache.get, image_id)
        if data is None:
            raise HTTPException(404, "no such image (images are kept for a limited time)")
        return Response(data, media_type="image/png", headers={"Cache-Control": "private"})

    return router


def original_router(service: Service) -> APIRouter:
    """The original dalle-mini demo backend's calls (behind the API key when there is one)."""
    router = APIRouter(dependencies=service.auth)
    summary = "The original dalle-mini demo backend protocol"

    @_generation_post(router, service, "/generate", OriginalResponse, summary)
    async def generate_original(request: Request, body: OriginalRequest) -> dict[str, Any]:
        """{"prompt": ...} -> {"images": [base64 PNG, ...], "version": ...}, best first."""
        req = GenerateRequest(prompt=body.prompt)  # the model's defaults
        with service.metrics.timed("/generate"):
            job = service.submit(req, service.settings.original_images, request_id=_rid(request))
            pngs = await encode_pngs(await service.wait(job, request))
        return {"images": [b64(p) for p in pngs], "version": service.version}

    @router.get(
        "/version",
        summary="The original demo's version call",
        responses=service.errors(401),
    )
    async def version_() -> dict[str, str]:
        """{"version": ...} as the original backend answered."""
        return {"version": service.version}

    return router


def routers(service: Service) -> list[APIRouter]:
    """Every router of the app, in the order their routes are matched."""
    return [page_router(service), api_router(service), original_router(service)]
