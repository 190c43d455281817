"""The web service: the FastAPI app with the HTTP API, the original demo's backend protocol and the web page.

The pieces: settings.py (ServeSettings and its check), service.py (the state the routes share, held
on `app.state.service`), routes.py (the routers), errors.py and security.py (error replies, API key).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..pipeline import TextToImage
from .access import RequestIds
from .errors import on_invalid
from .routes import STATIC, routers
from .service import Service
from .settings import ServeSettings
from .support import BodyLimit

log = logging.getLogger("dallemini.serve")
API_KEY_ENV = "DALLEMINI_API_KEY"
LEFTOVER_GRACE_S = 2.0  # after the drain: how long work nobody waits for may still finish

__all__ = ["API_KEY_ENV", "STATIC", "ServeSettings", "create_app"]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the batcher's worker; on shutdown finish every accepted job before it stops."""
    service: Service = app.state.service
    service.batcher.start()
    log.info("serving %s", service.version)
    yield
    # Graceful shutdown: uvicorn has waited (at most drain_timeout_s) for the requests in flight,
    # so what is left has no client waiting (cut at the deadline, or gone): a short grace, then
    # whatever is still unfinished is logged by request id, and the process exits.
    closed = await anyio.to_thread.run_sync(service.batcher.close, LEFTOVER_GRACE_S)
    if not closed:
        n = service.batcher.abandon("the server shut down before it was finished")
        log.warning("shut down with %d unfinished requests (logged above)", n)


def _pipeline(
    pipe_or_path: TextToImage | str | os.PathLike, settings: ServeSettings, load: dict[str, Any]
) -> TextToImage:
    """The pipeline, loaded from a model directory when given a path (which then names the model)."""
    if not isinstance(pipe_or_path, (str, os.PathLike)):
        return pipe_or_path
    pipe = TextToImage.from_pretrained(pipe_or_path, **load)
    if settings.model_name == "model":
        settings.model_name = Path(pipe_or_path).name
    return pipe


def create_app(
    pipe_or_path: TextToImage | str | os.PathLike,
    settings: ServeSettings | None = None,
    **load: Any,
) -> FastAPI:
    """The FastAPI app serving a pipeline (or a model directory loaded with `load`: device, dtype, clip)."""
    settings = settings or ServeSettings()
    settings.check()
    service = Service(_pipeline(pipe_or_path, settings, load), settings)
    app = FastAPI(
        title="dallemini",
        version=__version__,
        summary="DALL·E Mini text-to-image service",
        lifespan=_lifespan,
    )
    app.state.service = service
    app.state.batcher, app.state.pipe = service.batcher, service.pipe
    app.state.settings, app.state.cache = settings, service.cache
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIds)  # outermost: every answer has an id, 413s included
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for router in routers(service):
        app.include_router(router)
    return app
