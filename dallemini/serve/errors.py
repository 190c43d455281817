"""How the web service answers errors: 422 in one readable shape, HTTP statuses for failed jobs, OpenAPI entries."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..errors import DalleMiniError
from .batcher import Job, JobAbandoned, JobCancelled, JobTimeout
from .schemas import ErrorOut, InvalidOut


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error replies (422 in this service's own shape)."""
    return {c: {"model": InvalidOut if c == 422 else ErrorOut} for c in codes}


def invalid(loc: str, msg: str) -> RequestValidationError:
    """A 422 for one field, answered like pydantic's own validation errors."""
    return RequestValidationError([{"loc": ("body", loc), "msg": msg, "type": "value_error"}])


def validation_message(exc: RequestValidationError) -> JSONResponse:
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


async def on_invalid(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler for request validation errors."""
    assert isinstance(exc, RequestValidationError)
    return validation_message(exc)


def job_failure(job: Job) -> tuple[int, str]:
    """HTTP status and message for a job that did not produce images."""
    e = job.error
    if isinstance(e, JobTimeout):
        return 504, "the request timed out"
    if isinstance(e, JobCancelled):
        return 499, "the request was cancelled"
    if isinstance(e, JobAbandoned):
        return 503, str(e)
    if isinstance(e, DalleMiniError):
        return 422, str(e)
    return 500, f"generation failed: {type(e).__name__}"


def job_error(job: Job) -> HTTPException | RequestValidationError:
    """The exception to answer a failed job with."""
    status, detail = job_failure(job)
    return invalid("prompt", detail) if status == 422 else HTTPException(status, detail)
