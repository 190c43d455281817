"""Small pieces of the web service: a request-body size limit, bounded image stores, PNG encoding."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

from PIL import Image

from ..errors import ConfigError
from ..files import atomic_write

Scope = dict
Message = dict
log = logging.getLogger("dallemini.serve")

# What secrets.token_urlsafe(16) makes: 22 characters of the URL-safe base64 alphabet.
IMAGE_ID = re.compile(r"[A-Za-z0-9_-]{22}")
STALE_TEMP_S = 600.0  # a temp file this old was left by a writer that died; it is removed


def png_bytes(image: Image.Image, fast: bool = False) -> bytes:
    """Encode a PIL image as PNG (fast: less compression, for partial frames)."""
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1 if fast else 6)
    return buf.getvalue()


# An init image's largest side: anything bigger is cut down to the model's resolution anyway.
MAX_INIT_SIDE = 4096


def decode_image(text: str) -> Image.Image:
    """A base64 PNG, JPEG or WebP file as an RGB image; ValueError saying what is wrong."""
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError as e:
        raise ValueError("init_image is not valid base64") from e
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG", "WEBP"]) as im:
            if max(im.size) > MAX_INIT_SIDE:
                raise ValueError(
                    f"init_image is {im.size[0]}x{im.size[1]} px; at most {MAX_INIT_SIDE}"
                )
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError("init_image is not a PNG, JPEG or WebP image") from e


def b64(data: bytes) -> str:
    """Base64 text of bytes."""
    return base64.b64encode(data).decode("ascii")


def new_image_id() -> str:
    """A new unguessable image id."""
    return secrets.token_urlsafe(16)


def valid_image_id(key: str) -> bool:
    """Whether `key` has the exact shape of an id that `new_image_id` makes."""
    return IMAGE_ID.fullmatch(key) is not None


class ImageStore(Protocol):
    """Where PNG files made for response="url" are kept: put returns an id, get gives them back."""

    def put(self, data: bytes) -> str:
        """Store PNG bytes; returns their id."""
        ...

    def get(self, key: str) -> bytes | None:
        """The PNG bytes stored under `key`, or None (never stored, dropped, or not an id)."""
        ...

    def __len__(self) -> int: ...


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
        key = new_image_id()
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


def open_image_dir(path: str | os.PathLike[str]) -> Path:
    """Create the directory if needed and check that files can be written there; ConfigError if not."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"image store {path}: cannot create the directory ({e.strerror or e}); "
            "give a directory this process can create or write"
        ) from e
    probe = path / f".probe-{os.getpid()}-{new_image_id()}"
    try:
        atomic_write(probe, lambda tmp: tmp.write_bytes(b"probe"))
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"image store {path}: cannot write files there ({e.strerror or e}); "
            "give a directory this process can write"
        ) from e
    return path


class ImageDir:
    """PNG files in a directory that several servers may share: each written whole under an
    unguessable id, the oldest (by modification time) deleted past `max_items`."""

    def __init__(self, path: str | os.PathLike[str], max_items: int = 512) -> None:
        self.path = open_image_dir(path)
        self.max_items = max_items
        self._lock = threading.Lock()  # one prune at a time in this process

    def _file(self, key: str) -> Path:
        return self.path / f"{key}.png"

    def put(self, data: bytes) -> str:
        """Write PNG bytes whole (temp file, fsync, rename); returns their id."""
        key = new_image_id()
        atomic_write(self._file(key), lambda tmp: tmp.write_bytes(data))
        self.prune()
        return key

    def get(self, key: str) -> bytes | None:
        """The PNG bytes stored under `key` by any server sharing the directory, or None; a
        string that is not an id is None without touching the file system."""
        if not valid_image_id(key):
            return None
        try:
            return self._file(key).read_bytes()
        except FileNotFoundError:
            return None

    def _scan(self) -> tuple[list[tuple[int, str]], list[str]]:
        """(mtime in ns, name) of every image file, and the temp files left by writers that died."""
        images, stale = [], []
        oldest_temp = time.time() - STALE_TEMP_S
        with os.scandir(self.path) as entries:
            for entry in entries:
                name = entry.name
                try:
                    if name.endswith(".png") and valid_image_id(name[:-4]):
                        images.append((entry.stat().st_mtime_ns, name))
                    elif (
                        name.startswith(".")
                        and ".png.tmp-" in name
                        and entry.stat().st_mtime < oldest_temp
                    ):
                        stale.append(name)
                except FileNotFoundError:  # another server deleted it meanwhile
                    continue
        return images, stale

    def prune(self) -> None:
        """Delete the oldest images past `max_items`; files another server deleted first are skipped,
        and a file that cannot be deleted is logged, not raised (the image at hand was stored)."""
        with self._lock:
            images, stale = self._scan()
            images.sort()
            doomed = [name for _, name in images[: max(0, len(images) - self.max_items)]]
            for name in doomed + stale:
                try:
                    (self.path / name).unlink(missing_ok=True)
                except OSError as e:
                    log.warning("image store: cannot delete %s: %s", self.path / name, e)

    def __len__(self) -> int:
        return len(self._scan()[0])


def image_store(directory: str | os.PathLike[str] | None, max_items: int) -> ImageStore:
    """The store of a server: files in `directory` (shared by replicas), else memory."""
    if directory is None:
        return ImageCache(max_items)
    return ImageDir(directory, max_items)


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
