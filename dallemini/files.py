"""Files written whole or not at all: a unique temp file beside the target, fsync, then a rename."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temp_name(path: Path) -> Path:
    """A unique hidden temp name beside `path` (`.NAME.tmp-PID-RANDOM`), renamed over `path` when complete."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_replace(tmp: Path, path: Path) -> None:
    """Rename `tmp` over `path`, and make the rename itself durable where the OS allows."""
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temp file, which is synced and renamed over `path`: readers see the old
    file or the new one, never half."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        fsync_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write indented JSON whole or not at all."""
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
