"""Caption–image sources: an image folder with `.txt` captions, webdataset `.tar` shards, Parquet files.

Every source yields `Record`s in one deterministic order (sorted files, then the order inside each
file). A record carries its raw captions and a lazy loader for the image bytes, so that a process
that only wants some records (one encode worker of several) never reads or decodes the others.
`decode_record` turns a record into normalized captions and an RGB image, or into a skip reason
that `SkipStats` counts; iterating a `Source` does both and reports what it skipped at the end.

Layouts read:
- folder: `dir/**/name.{jpg,png,webp,…}` with `dir/**/name.txt` beside it (img2dataset's "files"
  output, or any hand-made folder). By default each non-empty line of the `.txt` is one caption.
- tar: webdataset shards as img2dataset writes them: `key.jpg|png|webp` + `key.txt` + `key.json`
  (the `.json` "caption" field is used when there is no `.txt`). Uncompressed tars are read lazily.
- parquet: one row per image with an image-bytes column (binary, or a struct with a `bytes` field
  as Hugging Face `datasets` writes it) and a caption column (string or list of strings).

Tars and Parquet files may also be URLs (`s3://bucket/shards/{00000..00099}.tar`, `https://…`,
`hf://datasets/…`, or a `pipe:` command; see `remote`). Remote tars are streamed; one that is
missing (404) or breaks off is counted as a skip under its file name, like a damaged local file.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import glob
import io
import itertools
import json
import logging
import os
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from braceexpand import braceexpand
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DalleMiniError, InputError
from ..extras import needs_extra
from ..text import TextNormalizer
from .remote import (
    URL,
    Location,
    filesystem,
    glob_urls,
    is_url,
    list_files,
    open_random,
    open_stream,
    read_bytes,
)

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "FolderSource",
    "ParquetSource",
    "Record",
    "Sample",
    "SampleError",
    "SkipStats",
    "Source",
    "TarSource",
    "decode_caption",
    "decode_image",
    "decode_record",
    "open_source",
    "prepare_captions",
    "to_rgb",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    "jpg",
    "jpeg",
    "png",
    "webp",
    "bmp",
    "gif",
    "tif",
    "tiff",
)
# Column names tried, in order, when a Parquet source is not told which to use.
IMAGE_COLUMNS: tuple[str, ...] = ("jpg", "png", "webp", "image", "img", "image_bytes", "bytes")
CAPTION_COLUMNS: tuple[str, ...] = ("txt", "caption", "text", "prompt", "captions")

Normalizer = Callable[[str], str]
CaptionLines = Literal["split", "join"]

# Skip reasons, in report order.
REASONS: tuple[str, ...] = (
    "empty_caption",
    "missing_caption",
    "missing_image",
    "undecodable",
    "truncated",
    "too_large",
    "corrupt",
    "unreadable_file",
    "missing_file",
)


class SampleError(Exception):
    """One sample cannot be used; `reason` is one of `REASONS` (counted, never fatal)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SkipStats:
    """Counts of skipped samples per reason plus a few offending keys each, so that no skip is silent."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, key: str, n: int = 1) -> None:
        """Count `n` skips of `key` for `reason`."""
        self.counts[reason] = self.counts.get(reason, 0) + n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples and key not in ex:
            ex.append(key)

    def merge(self, other: SkipStats) -> None:
        """Add another tally to this one (e.g. the per-shard tallies of an encode)."""
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            for key in other.examples.get(reason, []):
                if len(ex) < self.max_examples and key not in ex:
                    ex.append(key)

    @property
    def total(self) -> int:
        """Number of skips over all reasons."""
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form with reasons in a fixed order (so manifests are byte-for-byte reproducible)."""
        order = sorted(self.counts, key=lambda r: (REASONS.index(r) if r in REASONS else 99, r))
        return {
            "total": self.total,
            "counts": {r: self.counts[r] for r in order},
            "examples": {r: list(self.examples.get(r, [])) for r in order},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipStats:
        """Inverse of `to_dict`."""
        return cls(
            counts={str(k): int(v) for k, v in (data.get("counts") or {}).items()},
            examples={str(k): list(v) for k, v in (data.get("examples") or {}).items()},
        )

    def report(self, what: str = "samples") -> str:
        """One human line, e.g. 'skipped 3 samples: 2 truncated (a.jpg, b.jpg), 1 empty_caption (c.png)'."""
        if not self:
            return f"skipped 0 {what}"
        parts = []
        for reason, n in self.to_dict()["counts"].items():
            ex = ", ".join(self.examples.get(reason, []))
            more = ", …" if n > len(self.examples.get(reason, [])) else ""
            parts.append(f"{n} {reason} ({ex}{more})")
        return f"skipped {self.total} {what}: " + "; ".join(parts)


@dataclass
class Record:
    """One raw sample of a source: key, raw captions, and a lazy loader of the image bytes.

    `problem` is set when the sample is known bad before decoding (e.g. a tar entry with no image).
    """

    key: str
    captions: tuple[str, ...]
    loader: Callable[[], bytes] | None = None
    problem: str | None = None

    def read_bytes(self) -> bytes:
        """The encoded image file's bytes; raises `SampleError` when they cannot be read."""
        if self.problem is not None:
            raise SampleError(self.problem)
        if self.loader is None:
            raise SampleError("missing_image")
        try:
            return self.loader()
        except SampleError:
            raise
        except Exception as e:  # an unreadable file must not stop a long run
            raise SampleError("unreadable_file", f"{type(e).__name__}: {e}") from e

    def image(self, draft_size: int | None = None) -> Image.Image:
        """The decoded RGB image (see `decode_image`)."""
        return decode_image(self.read_bytes(), draft_size=draft_size)


@dataclass
class Sample:
    """A usable sample: key, normalized non-empty captions (at least one) and an RGB image."""

    key: str
    captions: tuple[str, ...]
    image: Image.Image

    @property
    def caption(self) -> str:
        """The first caption."""
        return self.captions[0]


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB version of any Pillow image: alpha (incl. palette transparency) composited on white, 16-bit scaled."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        arr = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif img.mode == "1":
        img = img.convert("L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, *, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to an upright RGB image; raises `SampleError` (never anything else) when unusable.

    `img.load()` runs here so truncated files fail now, not later. With `draft_size`, JPEGs are
    decoded at the smallest DCT scale whose shorter side is still >= 2 x `draft_size` (much faster
    for large photos; the resize after it still antialiases).
    """
    if not data:
        raise SampleError("missing_image", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (2 * draft_size, 2 * draft_size))
            img.load()
    except Image.DecompressionBombError as e:
        raise SampleError("too_large", str(e)) from e
    except UnidentifiedImageError as e:
        raise SampleError("undecodable", str(e)) from e
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise SampleError(reason, str(e)) from e
    except Exception as e:  # Pillow plugins raise SyntaxError, ValueError, struct.error, …
        raise SampleError("corrupt", f"{type(e).__name__}: {e}") from e
    if img.width < 1 or img.height < 1:
        raise SampleError("corrupt", f"size {img.width}x{img.height}")
    with contextlib.suppress(Exception):  # a broken EXIF block is not worth losing the picture
        img = ImageOps.exif_transpose(img) or img
    try:
        return to_rgb(img)
    except Exception as e:
        raise SampleError("corrupt", f"cannot convert mode {img.mode} to RGB: {e}") from e


def prepare_captions(captions: Iterable[str], normalizer: Normalizer | None) -> tuple[str, ...]:
    """Normalize captions and drop those with no words left (the normalized text keeps its leading space)."""
    out = []
    for c in captions:
        if not isinstance(c, str):
            continue
        text = normalizer(c) if normalizer is not None else c.strip()
        if text.strip():
            out.append(text)
    return tuple(out)


def decode_record(
    record: Record,
    normalizer: Normalizer | None,
    *,
    draft_size: int | None = None,
) -> Sample:
    """Record -> Sample with normalized captions and a decoded image; raises `SampleError` with the skip reason.

    Captions are checked first, so a sample with no usable caption is never decoded.
    """
    if record.problem is not None:
        raise SampleError(record.problem)
    if not record.captions:
        raise SampleError("missing_caption")
    captions = prepare_captions(record.captions, normalizer)
    if not captions:
        raise SampleError("empty_caption")
    return Sample(record.key, captions, record.image(draft_size))


def _split_caption_text(text: str, lines: CaptionLines) -> tuple[str, ...]:
    """Caption text -> captions; a blank text gives one empty caption (reported as empty, not missing)."""
    if lines == "split":
        return tuple(line for line in text.splitlines() if line.strip()) or ("",)
    joined = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return (joined,) if joined else ("",)


def _resolve_normalizer(normalizer: Normalizer | Literal["default"] | None) -> Normalizer | None:
    if normalizer == "default":
        return TextNormalizer()
    if normalizer is not None and not callable(normalizer):
        raise InputError(f"normalizer must be a callable, 'default' or None, got {normalizer!r}")
    return normalizer  # type: ignore[return-value]


def _sorted_paths(paths: Iterable[str | os.PathLike[str] | URL]) -> list[Location]:
    """The files or URLs of a multi-file source in the order it reads them (sorted by path)."""
    return sorted((p if isinstance(p, URL) else Path(p) for p in paths), key=str)


class Source:
    """Base of all sources: `records()` in a fixed order; iterating yields decoded `Sample`s and counts skips.

    `stats` holds the skips of the last full iteration, which is also logged when it ends.
    """

    kind: str = "source"

    def __init__(
        self,
        paths: Sequence[Location],
        *,
        normalizer: Normalizer | Literal["default"] | None = "default",
        description: str | None = None,
    ) -> None:
        self.paths = list(paths)
        self.normalizer = _resolve_normalizer(normalizer)
        self.description = description or ", ".join(str(p) for p in self.paths)
        self.stats = SkipStats()

    def records(self) -> Iterator[Record]:
        """Every raw sample, good or bad, in the source's deterministic order."""
        raise NotImplementedError

    def count_hint(self) -> int | None:
        """Number of records when cheap to know (for progress bars), else None."""
        return None

    def indexed_records(self, wanted: Callable[[int], bool]) -> Iterator[tuple[int, Record]]:
        """(number, record) in order, numbered 0, 1, ...; a source that knows how many records each
        of its files holds may leave out files none of whose numbers is `wanted` (unread)."""
        del wanted  # every record is read here
        return enumerate(self.records())

    def record_total(self) -> int | None:
        """How many numbers `indexed_records` spans, when the source knows it ahead (else None)."""
        return None

    def __iter__(self) -> Iterator[Sample]:
        """Decoded samples; bad ones are skipped, counted in `stats` and reported when the iteration ends."""
        self.stats = SkipStats()
        n = 0
        for record in self.records():
            try:
                sample = decode_record(record, self.normalizer)
            except SampleError as e:
                self.stats.add(e.reason, record.key)
                continue
            n += 1
            yield sample
        level = logging.WARNING if self.stats else logging.INFO
        log.log(level, "%s: read %d samples, %s", self.description, n, self.stats.report())

    def pairs(self) -> Iterator[tuple[str, Image.Image]]:
        """(caption, image) pairs: one per caption, so an image with two captions comes twice."""
        for sample in self:
            for caption in sample.captions:
                yield caption, sample.image

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"


def _read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class FolderSource(Source):
    """Images anywhere under a folder, each captioned by the `.txt` file with the same stem beside it."""

    kind = "folder"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        normalizer: Normalizer | Literal["default"] | None = "default",
        caption_lines: CaptionLines = "split",
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"{root} is not a folder")
        super().__init__([root], normalizer=normalizer, description=str(root))
        self.root = root
        self.caption_lines = caption_lines
        self._images: list[Path] | None = None

    def image_paths(self) -> list[Path]:
        """All image files under the root, sorted by relative POSIX path (hidden entries ignored)."""
        if self._images is None:
            found = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
                    if ext in IMAGE_EXTENSIONS and not name.startswith("."):
                        found.append(Path(dirpath) / name)
            found.sort(key=lambda p: p.relative_to(self.root).as_posix())
            self._images = found
        return self._images

    def count_hint(self) -> int | None:
        return len(self.image_paths())

    def records(self) -> Iterator[Record]:
        for path in self.image_paths():
            key = path.relative_to(self.root).as_posix()
            txt = path.with_suffix(".txt")
            loader = functools.partial(_read_file, path)
            try:
                text = decode_caption(txt.read_bytes(), txt.relative_to(self.root).as_posix())
            except FileNotFoundError:  # an image without a caption, still usable on its own
                yield Record(key, (), loader=loader)
                continue
            except OSError:
                yield Record(key, (), problem="unreadable_file")
                continue
            yield Record(key, _split_caption_text(text, self.caption_lines), loader=loader)


_LEGACY_WARNINGS = 10  # captions read as cp1252/latin-1 that are logged as warnings, per process
_legacy_captions = itertools.count()


def decode_caption(data: bytes, key: str = "") -> str:
    """Caption bytes -> text: UTF-8 (a BOM dropped), else Windows-1252, else Latin-1, with a warning.

    Latin-1 decodes any bytes, so a caption is never lost; 'caf\\xe9' reads as 'café', not 'caf'.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        text, encoding = data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        text, encoding = data.decode("latin-1"), "latin-1"
    n = next(_legacy_captions)
    level = logging.WARNING if n < _LEGACY_WARNINGS else logging.DEBUG
    more = " (further ones are logged at debug level)" if n == _LEGACY_WARNINGS - 1 else ""
    log.log(level, "%s: caption is not UTF-8; read it as %s%s", key or "caption", encoding, more)
    return text


def _json_caption(data: bytes, key: str = "") -> str | None:
    try:
        meta = json.loads(decode_caption(data, key))
    except ValueError:
        return None
    cap = meta.get("caption") if isinstance(meta, dict) else None
    return cap if isinstance(cap, str) else None


def _read_range(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise SampleError("truncated", f"tar member has {len(data)} of {size} bytes")
    return data


class TarSource(Source):
    """webdataset shards: consecutive tar members sharing a key (`dir/key.ext`) form one sample.

    Local uncompressed tars are read lazily (images by offset, when wanted); URLs and compressed
    tars are streamed front to back.
    """

    kind = "tar"

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str] | URL],
        *,
        normalizer: Normalizer | Literal["default"] | None = "default",
        caption_lines: CaptionLines = "join",
        description: str | None = None,
    ) -> None:
        super().__init__(_sorted_paths(paths), normalizer=normalizer, description=description)
        self.caption_lines = caption_lines

    def records(self) -> Iterator[Record]:
        for path in self.paths:
            yield from self._tar_records(path)

    @functools.cached_property
    def _stats_counts(self) -> list[int] | None:
        """Records per tar from img2dataset's `NNNNN_stats.json` beside each ("successes"), when
        every tar has one; else None."""
        sidecars = [_stats_sidecar(p) for p in self.paths]
        if not sidecars or any(s is None for s in sidecars):
            return None
        # Every worker must number alike: a sidecar that is missing means "no counts", but one that
        # cannot be read now (a network error after retries) stops the run rather than renumber it.
        with cf.ThreadPoolExecutor(max_workers=16) as pool:
            found = list(pool.map(_read_sidecar, sidecars))
        if any(data is None for data in found):
            return None
        counts = []
        for side, data in zip(sidecars, found, strict=True):
            try:
                n = json.loads(data)["successes"]
            except (KeyError, ValueError, TypeError):
                return None
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                log.warning("%s: 'successes' is not a count; records are numbered as read", side)
                return None
            counts.append(n)
        return counts

    def count_hint(self) -> int | None:
        return self.record_total()

    def record_total(self) -> int | None:
        counts = self._stats_counts
        return None if counts is None else sum(counts)

    def indexed_records(self, wanted: Callable[[int], bool]) -> Iterator[tuple[int, Record]]:
        """With img2dataset's per-tar counts, tar t's records are numbered from the sum of the
        counts before it, and a tar with no wanted number is never opened (nor downloaded); a tar
        holding more records than its count says has the rest skipped ("beyond_stats")."""
        counts = self._stats_counts
        if counts is None:
            yield from enumerate(self.records())
            return
        start = 0
        for path, count in zip(self.paths, counts, strict=True):
            if any(wanted(i) for i in range(start, start + count)):
                for j, record in enumerate(self._tar_records(path)):
                    if j < count:
                        yield start + j, record
                    else:
                        yield start + count - 1, Record(record.key, (), problem="beyond_stats")
            start += count

    def _tar_records(self, path: Location) -> Iterator[Record]:
        # uncompressed local tars: members can be read later by offset
        lazy = isinstance(path, Path) and path.suffix == ".tar"
        stream = None
        try:
            if isinstance(path, URL):
                stream = open_stream(path)
                tf = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 (closed below)
            else:
                tf = tarfile.open(path, "r:" if lazy else "r|*")  # noqa: SIM115 (closed below)
        except FileNotFoundError as e:
            log.warning("%s is missing: %s", path, e)
            if stream is not None:
                stream.close()
            yield Record(path.name, (), problem="missing_file")
            return
        except DalleMiniError:
            raise
        except Exception as e:  # tarfile, OS and network errors alike: this file is skipped
            log.warning("cannot open %s: %s", path, e)
            if stream is not None:
                stream.close()
            yield Record(path.name, (), problem="unreadable_file")
            return
        with contextlib.closing(stream or io.BytesIO()), tf:
            yield from self._members(path, tf, lazy)

    def _members(self, path: Location, tf: tarfile.TarFile, lazy: bool) -> Iterator[Record]:
        group: dict[str, Any] = {}
        current: str | None = None
        while True:
            try:
                member = tf.next()
            except (tarfile.TarError, OSError, EOFError) as e:
                log.warning("%s is damaged after %r: %s", path, current, e)
                if current is not None:  # its members may be cut short: not to be trusted
                    yield Record(f"{path.name}/{current}", (), problem="truncated")
                    current = None
                yield Record(f"{path.name}@{tf.offset}", (), problem="unreadable_file")
                break
            if member is None:
                break
            if not member.isfile():
                continue
            dirname, _, base = member.name.rpartition("/")
            if base.startswith(".") or "." not in base:
                continue
            stem, ext = base.split(".", 1)
            key = f"{dirname}/{stem}" if dirname else stem
            if key != current:
                if current is not None:
                    yield self._make_record(path, current, group)
                current, group = key, {}
            ext = ext.lower()
            if lazy and ext in IMAGE_EXTENSIONS:
                group[ext] = (member.offset_data, member.size)
            else:
                try:
                    f = tf.extractfile(member)
                    group[ext] = f.read() if f is not None else b""
                except (tarfile.TarError, OSError, EOFError):
                    group[ext] = None
        if current is not None:
            yield self._make_record(path, current, group)

    def _make_record(self, path: Location, key: str, group: dict[str, Any]) -> Record:
        full_key = f"{path.name}/{key}"
        text: str | None = None
        if isinstance(group.get("txt"), bytes):
            text = decode_caption(group["txt"], f"{full_key}.txt")
        elif isinstance(group.get("json"), bytes):
            text = _json_caption(group["json"], f"{full_key}.json")
        captions = _split_caption_text(text, self.caption_lines) if text is not None else ()
        for ext in IMAGE_EXTENSIONS:
            if ext not in group:
                continue
            item = group[ext]
            if item is None:
                return Record(full_key, captions, problem="truncated")
            if isinstance(item, bytes):
                return Record(full_key, captions, loader=lambda b=item: b)
            offset, size = item
            assert isinstance(path, Path)  # only local tars are read lazily
            return Record(
                full_key, captions, loader=lambda o=offset, s=size: _read_range(path, o, s)
            )
        return Record(full_key, captions, problem="missing_image")


def _stats_sidecar(path: Location) -> Location | None:
    """img2dataset's `NNNNN_stats.json` beside a `NNNNN.tar` (a URL's is not checked here)."""
    name = path.name
    if not name.endswith(".tar"):
        return None
    side = name[: -len(".tar")] + "_stats.json"
    if isinstance(path, Path):
        found = path.with_name(side)
        return found if found.is_file() else None
    if path.is_pipe:
        return None
    return URL(path.url.split("?", 1)[0].rsplit("/", 1)[0] + "/" + side)


def _read_sidecar(side: Location) -> bytes | None:
    """A stats sidecar's bytes; None when it does not exist, InputError when it cannot be read."""
    try:
        return read_bytes(side)
    except FileNotFoundError:
        return None
    except OSError as e:  # after the retries: renumbering now could overlap another worker's shards
        raise InputError(f"cannot read {side} now ({e}); run again when it can be read") from e


def _parquet() -> Any:
    """The pyarrow.parquet module, imported when a Parquet source is read."""
    with needs_extra("reading Parquet files"):
        # optional extra [train]: only Parquet sources need pyarrow
        import pyarrow.parquet as pq
    return pq


@contextlib.contextmanager
def _open_parquet(path: Location) -> Iterator[Any]:
    """A pyarrow ParquetFile of a local file or a URL (read by ranges: footer first), closed after."""
    pq = _parquet()
    with contextlib.ExitStack() as stack:
        source = path if isinstance(path, Path) else stack.enter_context(open_random(path))
        pf = pq.ParquetFile(source)
        stack.callback(pf.close)
        yield pf


class ParquetSource(Source):
    """Parquet files with one image per row: image bytes column + caption column (+ optional `key`)."""

    kind = "parquet"

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str] | URL],
        *,
        image_column: str | None = None,
        caption_column: str | None = None,
        key_column: str | None = "key",
        normalizer: Normalizer | Literal["default"] | None = "default",
        caption_lines: CaptionLines = "join",
        batch_rows: int = 256,
        description: str | None = None,
    ) -> None:
        super().__init__(_sorted_paths(paths), normalizer=normalizer, description=description)
        if not self.paths:
            raise InputError("no Parquet files given")
        with _open_parquet(self.paths[0]) as pf:
            names = pf.schema_arrow.names
        self.image_column = image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
        self.caption_column = caption_column or next(
            (c for c in CAPTION_COLUMNS if c in names), None
        )
        for what, col, options in (
            ("image", self.image_column, IMAGE_COLUMNS),
            ("caption", self.caption_column, CAPTION_COLUMNS),
        ):
            if col is None or col not in names:
                raise InputError(
                    f"{self.paths[0]} has no {what} column "
                    f"({'column ' + repr(col) + ' not found' if col else 'tried ' + ', '.join(options)}); "
                    f"its columns are {names}. Pass --{what}-column NAME"
                    + (
                        " (img2dataset's webdataset output keeps images in the .tar files, not the .parquet)"
                        if what == "image"
                        else ""
                    )
                )
        self.key_column = key_column if key_column in names else None
        self.caption_lines = caption_lines
        self.batch_rows = batch_rows

    def count_hint(self) -> int | None:
        try:
            if any(isinstance(p, URL) for p in self.paths):
                return None  # a footer fetch per file is not cheap
            return sum(_parquet().ParquetFile(p).metadata.num_rows for p in self.paths)
        except Exception:
            return None

    def _captions(self, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            return _split_caption_text(value, self.caption_lines)
        if isinstance(value, (list, tuple)):
            return tuple(v for v in value if isinstance(v, str))
        return ()

    def records(self) -> Iterator[Record]:
        columns = [self.image_column, self.caption_column]
        if self.key_column:
            columns.append(self.key_column)
        for path in self.paths:
            yield from self._file_records(path, columns)

    def _file_records(self, path: Location, columns: list[Any]) -> Iterator[Record]:
        row = 0
        try:
            with _open_parquet(path) as pf:
                missing = [c for c in columns if c not in pf.schema_arrow.names]
                if missing:
                    raise InputError(f"{path} lacks column(s) {missing}")
                for batch in pf.iter_batches(batch_size=self.batch_rows, columns=columns):
                    images = batch.column(self.image_column).to_pylist()
                    captions = batch.column(self.caption_column).to_pylist()
                    keys = (
                        batch.column(self.key_column).to_pylist()
                        if self.key_column
                        else [None] * len(images)
                    )
                    for img, cap, k in zip(images, captions, keys, strict=True):
                        key = f"{path.name}/{k if k is not None else row}"
                        row += 1
                        if isinstance(img, dict):  # HF datasets' Image feature: {bytes, path}
                            img = img.get("bytes")
                        caps = self._captions(cap)
                        if not img:
                            yield Record(key, caps, problem="missing_image")
                        else:
                            yield Record(key, caps, loader=lambda b=img: bytes(b))
        except InputError:
            raise
        except FileNotFoundError as e:
            log.warning("%s is missing: %s", path, e)
            yield Record(path.name, (), problem="missing_file")
        except Exception as e:  # a damaged file: keep what was read, note the rest
            log.warning("%s is damaged after row %d: %s", path, row, e)
            yield Record(f"{path.name}@{row}", (), problem="unreadable_file")


_FILE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".parquet")


def _expand_url(url: URL) -> list[Location]:
    """A URL naming a file (kept as it is: a missing one is counted when read), a glob, or a folder/prefix."""
    if url.is_pipe:
        return [url]
    filesystem(url)  # a protocol whose package is missing fails here, before any work
    magic = "*[" if url.protocol in ("http", "https") else "*?["  # ? starts an http query
    if any(c in url.url for c in magic):
        matches: list[Location] = list(glob_urls(url))
        if not matches:
            raise InputError(f"no files match {url}")
        return matches
    if url.name.lower().endswith(_FILE_SUFFIXES):
        return [url]
    found: list[Location] = list(list_files(url))
    if not found:
        raise InputError(f"{url} holds no files (or does not exist)")
    return found


def _expand(
    path_or_glob: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> list[Location]:
    """Paths of a path, a glob, a brace pattern (`shards/{00000..00099}.tar`, `{a,b}.tar`), a `::`
    separated list (webdataset's spelling), or a list of any of them; a missing local file is an
    error. URLs expand the same way (a folder URL to every file under it)."""
    items = (
        [path_or_glob] if isinstance(path_or_glob, (str, os.PathLike)) else list(path_or_glob)  # type: ignore[arg-type]
    )
    names = [
        expanded
        for item in items
        for part in os.fspath(item).split("::")
        for expanded in braceexpand(part)
    ]
    out: list[Location] = []
    for s in names:
        if is_url(s):
            out.extend(_expand_url(URL(s)))
        elif glob.has_magic(s):
            matches = sorted(glob.glob(s, recursive=True))
            if not matches:
                raise InputError(f"no files match {s!r}")
            out.extend(Path(m) for m in matches)
        elif not os.path.exists(s):
            raise InputError(f"{s} does not exist")
        else:
            out.append(Path(s))
    return out


def _files_with(paths: list[Location], suffixes: tuple[str, ...]) -> list[Location]:
    found: list[Location] = []
    for p in paths:
        if isinstance(p, URL):  # a pipe: is a tar stream, whatever its name
            if p.name.lower().endswith(suffixes) or (p.is_pipe and ".tar" in suffixes):
                found.append(p)
        elif p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                found.extend(
                    Path(dirpath) / n
                    for n in filenames
                    if n.lower().endswith(suffixes) and not n.startswith(".")
                )
        elif p.name.lower().endswith(suffixes):
            found.append(p)
    return sorted(found, key=str)


def open_source(
    path_or_glob: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    kind: Literal["auto", "folder", "tar", "parquet"] = "auto",
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    normalizer: Normalizer | Literal["default"] | None = "default",
    caption_lines: CaptionLines | None = None,
) -> Source:
    """Open a caption–image source; `kind="auto"` picks tar, else parquet, else image folder by what it finds.

    `path_or_glob` is a folder, a file, a glob (`data/*.tar`), a URL (`s3://b/{00000..00009}.tar`,
    `https://…/x.tar`, `hf://datasets/…`, an object-store prefix, `pipe:CMD`) or a list of them. A folder holding
    `.tar` files is read as webdataset shards (img2dataset puts `.parquet` metadata beside them,
    which is then ignored); one holding `.parquet` files (and no tars) as Parquet; otherwise as
    an image folder. `normalizer` is applied to every caption: "default" is dalle-mini's
    `TextNormalizer`, None keeps captions as they are (stripped). `caption_lines`: "split" makes
    each line of a caption text its own caption (folder default), "join" joins them (tar/parquet
    default).
    """
    if kind not in ("auto", "folder", "tar", "parquet"):
        raise InputError(f"unknown source kind {kind!r}; use auto, folder, tar or parquet")
    paths = _expand(path_or_glob)
    desc = ", ".join(
        str(p) if isinstance(p, URL) else os.fspath(p)
        for p in ([path_or_glob] if isinstance(path_or_glob, (str, os.PathLike)) else path_or_glob)
    )
    tars = _files_with(paths, (".tar", ".tar.gz", ".tgz"))
    parquets = _files_with(paths, (".parquet",))
    if kind == "auto":
        if tars:
            kind = "tar"
        elif parquets:
            kind = "parquet"
        elif len(paths) == 1 and isinstance(paths[0], Path) and paths[0].is_dir():
            kind = "folder"
        else:
            raise InputError(
                f"cannot tell what {desc} is: expected an image folder, .tar shards or .parquet files"
            )
    if kind == "folder":
        if len(paths) != 1 or not isinstance(paths[0], Path) or not paths[0].is_dir():
            raise InputError(
                f"a folder source takes exactly one local folder, got {desc} "
                f"(URLs are read as .tar shards or .parquet files)"
            )
        return FolderSource(paths[0], normalizer=normalizer, caption_lines=caption_lines or "split")
    if kind == "tar":
        if not tars:
            raise InputError(f"no .tar files in {desc}")
        return TarSource(
            tars, normalizer=normalizer, caption_lines=caption_lines or "join", description=desc
        )
    if not parquets:
        raise InputError(f"no .parquet files in {desc}")
    return ParquetSource(
        parquets,
        image_column=image_column,
        caption_column=caption_column,
        normalizer=normalizer,
        caption_lines=caption_lines or "join",
        description=desc,
    )
