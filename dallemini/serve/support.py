"""Small pieces of the web service: a request-body size limit, a bounded image cache, PNG encoding."""

from __future__ import annotations

import base64
import io
import json
import secrets
import threading
from collections import OrderedDict

from PIL import Image

Scope = dict
Message = dict


def png_bytes(image: Image.Image, fast: bool = False) -> bytes:
    """Encode a PIL image as PNG (fast: less compression, for partial frames)."""
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1 if fast else 6)
    return buf.getvalue()


def b64(data: bytes) -> str:
    """Base64 text of bytes."""
    return base64.b64encode(data).decode("ascii")


class ImageCache:
    """PNG files kept in memory under unguessable ids, the oldest dropped past `max_items` or `max_bytes`."""

    def __init__(self, max_items: int = 512, max_bytes: int = 256 * 2**20) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        """Store PNG bytes; returns their id."""
        key = secrets.token_urlsafe(16)
        with self._lock:
            self._items[key] = data
            self._bytes += len(data)
            while self._items and (
                len(self._items) > self.max_items or self._bytes > self.max_bytes
            ):
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
        return key

    def get(self, key: str) -> bytes | None:
        """The PNG bytes stored under `key`, or None once dropped."""
        with self._lock:
            return self._items.get(key)

    def __len__(self) -> int:
        return len(self._items)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` (declared or streamed) gets 413."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await self._reject(send)
                return
        seen = 0
        started = rejected = False

        async def limited_receive() -> Message:
            nonlocal seen, rejected
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes and not rejected:
                    # Answer 413 now; the app sees a client that went away and its replies are dropped.
                    rejected = True
                    if not started:
                        await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except Exception:
            if not rejected:
                raise

    async def _reject(self, send) -> None:
        """Send the 413 reply."""
        body = json.dumps(
            {"detail": f"request body too large (the limit is {self.max_bytes} bytes)"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
