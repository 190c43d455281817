"""A request id on every response (`X-Request-ID`: the client's own when it sends a sane one) and one
JSON access-log line per request on the `dallemini.access` logger, carrying the same id."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from typing import Any

log = logging.getLogger("dallemini.access")
HEADER = b"x-request-id"
_SANE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class RequestIds:
    """ASGI middleware: request ids and access-log lines (ours: plain ASGI, so streams pass through)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(HEADER, b"").decode("latin-1")
        rid = given if _SANE.fullmatch(given) else secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = rid
        start, status = time.perf_counter(), 500

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (HEADER, rid.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            client = scope.get("client") or ("", 0)
            record = {
                "request_id": rid,
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": status,
                "seconds": round(time.perf_counter() - start, 4),
                "client": client[0],
            }
            log.info(json.dumps(record))
