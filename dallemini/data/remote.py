"""Data anywhere: fsspec URLs (s3://, gs://, https://, hf://, …) and `pipe:` commands beside local paths.

A location is a local `Path` or a `URL`. Remote files go through fsspec, which imports the package
of a protocol only when it is used (s3fs, gcsfs, aiohttp for http(s), huggingface_hub for hf).

- Reading: source tars are streamed (read front to back, never fetched whole first). s3fs, gcsfs
  and huggingface_hub retry transient errors themselves; fsspec's HTTP files do not, so for
  http(s) a stream that breaks is reopened and skipped forward to where it broke, a few times
  with backoff (`RETRY`). What still fails is raised as `OSError` (`FileNotFoundError` for a 404).
- Writing: one PUT of the whole object, which S3 and GCS make visible whole or not at all.
- `pipe:CMD` (webdataset's convention) reads the bytes that the shell command writes to stdout;
  a command that exits non-zero makes the stream fail at its end, so a cut download is noticed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import fsspec  # a dependency of huggingface_hub, so always installed; each protocol's package is not

from ..errors import ConfigError, InputError
from ..extras import missing_extra
from ..files import atomic_write

log = logging.getLogger(__name__)

__all__ = [
    "RETRY",
    "URL",
    "Location",
    "RetryPolicy",
    "as_location",
    "check_writable",
    "filesystem",
    "glob_urls",
    "is_url",
    "list_dir",
    "list_files",
    "open_random",
    "open_stream",
    "read_bytes",
    "read_many",
    "write_bytes",
]

PIPE = "pipe:"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_TAR_NAME = re.compile(r"[^/\s'\"]+\.(?:tar|tgz|tar\.gz)$", re.IGNORECASE)

# protocol -> (the package fsspec needs for it, the extra that installs it, or None: pip name only)
_PACKAGES: dict[str, tuple[str, str | None]] = {
    "s3": ("s3fs", "train"),
    "s3a": ("s3fs", "train"),
    "http": ("aiohttp", "train"),
    "https": ("aiohttp", "train"),
    "gs": ("gcsfs", None),
    "gcs": ("gcsfs", None),
    "hf": ("huggingface_hub", None),
}
# Protocols whose fsspec implementation retries transient errors itself.
_OWN_RETRIES = frozenset({"s3", "s3a", "gs", "gcs", "hf"})
_READ_ONLY = frozenset({"http", "https", "hf"})
STREAM_BLOCK = 8 << 20  # bytes per ranged GET when streaming from an object store


@dataclass
class RetryPolicy:
    """How often a broken http(s) stream is reopened, and the first wait (doubled each time)."""

    attempts: int = 4
    backoff_s: float = 1.0


RETRY = RetryPolicy()


@dataclass(frozen=True, order=True)
class URL:
    """A remote file or folder: an fsspec URL (`s3://bucket/key`) or a `pipe:` command."""

    url: str

    @property
    def protocol(self) -> str:
        """'s3', 'https', 'hf', … or 'pipe'."""
        if self.is_pipe:
            return "pipe"
        m = _SCHEME.match(self.url)
        return m.group(1).lower() if m else ""

    @property
    def is_pipe(self) -> bool:
        """Whether this names a shell command whose stdout is the file."""
        return self.url.startswith(PIPE)

    @property
    def name(self) -> str:
        """The last path component (for a pipe: the last word naming a .tar, else the command)."""
        if self.is_pipe:
            try:
                words = shlex.split(self.url[len(PIPE) :])
            except ValueError:  # unbalanced quotes: the shell will say so when it runs
                words = self.url[len(PIPE) :].split()
            for word in reversed(words):
                m = _TAR_NAME.search(word)
                if m:
                    return m.group(0).rsplit("/", 1)[-1]
            return self.url
        return self.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        """The name's last suffix, as `Path.suffix` gives it ('.tar', '.gz', …)."""
        return PurePosixPath(self.name).suffix

    def __truediv__(self, child: str) -> URL:
        return URL(f"{self.url.rstrip('/')}/{child}")

    def __str__(self) -> str:
        return self.url


Location = Path | URL


def is_url(name: object) -> bool:
    """Whether `name` is a URL (`scheme://…` other than file://) or a `pipe:` command."""
    if isinstance(name, URL):
        return True
    if not isinstance(name, str):
        return False
    if name.startswith(PIPE):
        return True
    m = _SCHEME.match(name)
    return bool(m) and m.group(1).lower() != "file"


def as_location(name: str | os.PathLike[str] | URL) -> Location:
    """A `URL` for URLs and `pipe:` commands, else a local `Path` (file:// is local)."""
    if isinstance(name, URL):
        return name
    if isinstance(name, str) and is_url(name):
        return URL(name)
    text = os.fspath(name)
    if text.lower().startswith("file://"):
        text = text[len("file://") :]
    return Path(text)


def _options(protocol: str) -> dict[str, Any]:
    """Storage options beyond fsspec's own config (~/.config/fsspec, FSSPEC_<PROTOCOL>_<OPTION>)."""
    if protocol in ("s3", "s3a"):
        # botocore reads AWS_ENDPOINT_URL(_S3) itself; passing it also keys fsspec's instance cache
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # listings are read afresh each time: another worker may have written shards since
        options: dict[str, Any] = {"use_listings_cache": False}
        return options | ({"endpoint_url": endpoint} if endpoint else {})
    return {}


def filesystem(url: URL) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL; a missing package is one line naming what to install."""
    if url.is_pipe:
        raise InputError(f"{url}: a pipe: command is a stream, not a file system")
    protocol = url.protocol
    try:
        return fsspec.core.url_to_fs(url.url, **_options(protocol))
    except ImportError as e:
        package, extra = _PACKAGES.get(protocol, (e.name or "its fsspec package", None))
        if extra is not None:
            raise missing_extra(f"reading {protocol}:// URLs", extra) from e
        raise ConfigError(
            f"reading {protocol}:// URLs needs {package}: pip install {package}"
        ) from e
    except ValueError as e:  # an unknown protocol
        raise InputError(f"{url}: {e}") from e


def _full(fs: Any, path: str) -> str:
    """The URL of a path that `fs` listed."""
    return fs.unstrip_protocol(path)


def glob_urls(url: URL) -> list[URL]:
    """The files a glob URL matches, sorted."""
    fs, path = filesystem(url)
    fs.invalidate_cache()
    found = fs.glob(path, detail=True)
    return sorted(URL(_full(fs, p)) for p, info in found.items() if info.get("type") != "directory")


def list_files(url: URL) -> list[URL]:
    """Every file under a folder URL (an object-store prefix: recursive), sorted; [] when none."""
    fs, path = filesystem(url)
    fs.invalidate_cache()
    try:
        found = fs.find(path.rstrip("/"))
    except FileNotFoundError:
        return []
    return sorted(URL(_full(fs, p)) for p in found)


def list_dir(url: URL) -> dict[str, int]:
    """name -> size of the files directly in a folder URL ({} when it holds none), read afresh."""
    fs, path = filesystem(url)
    fs.invalidate_cache()
    try:
        entries = fs.ls(path.rstrip("/"), detail=True)
    except FileNotFoundError:
        return {}
    return {
        e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
        for e in entries
        if e.get("type") == "file"
    }


def _transient(error: BaseException) -> bool:
    """Whether reopening a stream could help: dropped connections and server errors, not 404/403."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    status = getattr(error, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    if isinstance(error, (OSError, TimeoutError, EOFError)):
        return True
    # aiohttp's payload and connection errors are not OSErrors
    return type(error).__module__.split(".")[0] in ("aiohttp", "fsspec")


class _ReopeningReader(io.RawIOBase):
    """A remote file read front to back; a transient error reopens it and skips to where it broke."""

    def __init__(self, url: URL, opener: Callable[[], IO[bytes]], attempts: int) -> None:
        super().__init__()
        self.url = url
        self._opener = opener
        self._attempts = max(1, attempts)
        self._pos = 0
        self._file: IO[bytes] | None = None
        self._retry(lambda: None)  # open now: a missing file is known before the first read

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        f = self._opener()
        skip = self._pos
        while skip:  # servers need not honour ranges: read up to where the last stream broke
            got = len(f.read(min(skip, 1 << 20)))
            if not got:
                f.close()
                raise EOFError(f"{self.url} now has fewer than {self._pos} bytes")
            skip -= got
        self._file = f

    def _retry(self, op: Callable[[], Any]) -> Any:
        for attempt in range(self._attempts):
            try:
                if self._file is None:
                    self._reopen()
                return op()
            except Exception as e:
                if not _transient(e):
                    if isinstance(e, OSError):
                        raise
                    raise OSError(f"{self.url}: {type(e).__name__}: {e}") from e
                self._drop()
                if attempt + 1 == self._attempts:
                    raise OSError(
                        f"{self.url}: {type(e).__name__}: {e} (gave up after {self._attempts} "
                        f"attempt(s), at byte {self._pos})"
                    ) from e
                wait = RETRY.backoff_s * 2**attempt
                log.warning("%s: %s at byte %d; retrying in %.1fs", self.url, e, self._pos, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            # closing a broken connection may fail too; it is gone either way
            with contextlib.suppress(Exception):
                f.close()

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")

        def read() -> int:
            assert self._file is not None
            data = self._file.read(len(view))
            view[: len(data)] = data
            return len(data)

        n = self._retry(read)
        self._pos += n
        return n

    def close(self) -> None:
        self._drop()
        super().close()


class _PipeReader(io.RawIOBase):
    """stdout of a shell command; a non-zero exit status is an OSError at the end of the stream."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command
        # shell=True: the user wrote the command, as webdataset's pipe: URLs are written
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        assert self._proc.stdout is not None
        n = self._proc.stdout.readinto(buffer)
        if not n:
            status = self._proc.wait()
            if status:
                raise OSError(f"pipe command {self.command!r} exited with status {status}")
        return n or 0

    def close(self) -> None:
        if (
            self._proc.poll() is None
        ):  # the reader stopped early: the command's output is not needed
            self._proc.kill()
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        super().close()


def open_stream(location: Location) -> IO[bytes]:
    """A buffered front-to-back reader of a file, URL or pipe (see module doc for retries)."""
    if isinstance(location, Path):
        return open(location, "rb")
    if location.is_pipe:
        return io.BufferedReader(_PipeReader(location.url[len(PIPE) :]), 1 << 20)
    fs, path = filesystem(location)
    if location.protocol in ("http", "https"):
        # block_size=0: one streaming GET (a plain server need not support ranges)
        def opener() -> IO[bytes]:
            return fs.open(path, "rb", block_size=0)

        attempts = RETRY.attempts
    else:

        def opener() -> IO[bytes]:
            return fs.open(path, "rb", block_size=STREAM_BLOCK, cache_type="readahead")

        attempts = 1 if location.protocol in _OWN_RETRIES else RETRY.attempts
    return io.BufferedReader(_ReopeningReader(location, opener, attempts), 1 << 20)


def open_random(location: Location) -> IO[bytes]:
    """A seekable reader (Parquet footers are read from the end): a local file or an fsspec file."""
    if isinstance(location, Path):
        return open(location, "rb")
    fs, path = filesystem(location)
    return fs.open(path, "rb")


def read_bytes(location: Location) -> bytes:
    """The whole content of a file or URL; `FileNotFoundError` when it does not exist."""
    if isinstance(location, Path):
        return location.read_bytes()
    if location.is_pipe or location.protocol not in _OWN_RETRIES:
        with open_stream(location) as f:
            return f.read()
    fs, path = filesystem(location)
    return fs.cat_file(path)  # one GET, retried by the store's own client


def read_many(locations: list[URL]) -> dict[URL, bytes]:
    """The contents of several small files under one URL root, fetched concurrently; missing ones are left out."""
    if not locations:
        return {}
    fs, _ = filesystem(locations[0])
    paths = {filesystem(u)[1]: u for u in locations}
    got = fs.cat(list(paths), on_error="omit")
    return {paths[p]: data for p, data in got.items() if p in paths}


def check_writable(location: Location) -> None:
    """Raise `InputError` early for a destination that cannot take files (read-only URL, no bucket)."""
    if isinstance(location, Path):
        return
    if location.is_pipe or location.protocol in _READ_ONLY:
        raise InputError(
            f"cannot write to {location}: {location.protocol} URLs are read-only here; write to a "
            f"local folder or an object store (s3://, gs://)"
        )
    fs, path = filesystem(location)
    if location.protocol in ("s3", "s3a"):
        bucket = path.split("/", 1)[0]
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise InputError(f"{location}: bucket {bucket!r} does not exist") from None
        except Exception:  # e.g. no permission to look at the bucket: the writes will tell
            pass


def write_bytes(location: Location, data: bytes) -> None:
    """Write a file whole or not at all: locally temp file + rename, remotely a single PUT."""
    if isinstance(location, Path):
        atomic_write(location, lambda tmp: tmp.write_bytes(data))
        return
    if location.is_pipe or location.protocol in _READ_ONLY:
        check_writable(location)  # raises: nothing can be written there
    fs, path = filesystem(location)
    fs.pipe_file(path, data)  # one PUT (a multipart upload past 50 MB, which S3 also shows whole)
