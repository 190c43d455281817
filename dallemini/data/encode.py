"""Images -> VQGAN token shards (`dallemini encode`): batched, resumable, split over several workers.

The source's records are numbered in its fixed order; output shard k holds the rows of records
[k*S, (k+1)*S) (S = `shard_size`; one row per caption, so an image with two captions gives two
rows with the same encoding). Worker i of n encodes the shards with k % n == i, so torchrun ranks
or `--shard i/n` processes never overlap, and each shard is written whole (temp file + rename):
a re-run skips the shards that exist and redoes only the missing ones. Workers skip other
workers' records without reading or decoding them. When a worker ends and finds every shard
present, it writes `dataset.json` from the shards' own footers, so the last worker to finish
writes it, and writing it twice gives the same bytes.

The output may be an object-store URL (`s3://bucket/tokens`). There is no rename there: each
shard is one PUT (visible whole or not at all), and then a small marker `_done/part-K.parquet.json`
(the shard's footer metadata, rows and size) commits it. A re-run counts a shard as done only
when its marker is there and the object has the marker's size; a shard written but not marked is
written again. `dataset.json` is built from the markers, once every shard has one.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, InputError
from ..images import resize_center_crop
from .remote import URL, Location, as_location, check_writable, list_dir, read_many, write_bytes
from .shards import (
    DATASET_FORMAT,
    DATASET_VERSION,
    MANIFEST_NAME,
    encoding_type,
    read_shard_meta,
    shard_index,
    shard_name,
    write_json,
    write_shard,
)
from .sources import Normalizer, Record, SampleError, SkipStats, Source, decode_record, open_source

if TYPE_CHECKING:
    from ..models.vqgan import VQGAN

log = logging.getLogger(__name__)

__all__ = [
    "DONE_DIR",
    "EncodeResult",
    "build_manifest",
    "encode_dataset",
    "marker_name",
    "parse_worker",
    "worker_from_env",
]


DONE_DIR = "_done"  # object-store outputs: one commit marker per shard in this sub-prefix


def marker_name(index: int) -> str:
    """The commit marker of shard `index` in an object-store output: _done/part-00000.parquet.json."""
    return f"{DONE_DIR}/{shard_name(index)}.json"


def parse_worker(spec: str) -> tuple[int, int]:
    """'i/n' -> (i, n), checked: worker i of n (0-based)."""
    try:
        i_s, n_s = spec.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise InputError(f"--shard takes I/N (worker I of N, 0-based), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {spec}: need 0 <= I < N")
    return i, n


def worker_from_env() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them, else (0, 1)."""
    try:
        n = int(os.environ.get("WORLD_SIZE", "1"))
        i = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    return (i, n) if n >= 1 and 0 <= i < n else (0, 1)


@dataclass
class EncodeResult:
    """What one encode run did; `complete` means dataset.json now lists every shard."""

    out_dir: Location
    worker: tuple[int, int]
    shards_written: list[int] = field(default_factory=list)
    shards_existing: list[int] = field(default_factory=list)
    images: int = 0
    rows: int = 0
    skipped: SkipStats = field(default_factory=SkipStats)
    seconds: float = 0.0
    source_records: int = 0
    num_shards: int = 0
    complete: bool = False

    @property
    def images_per_s(self) -> float:
        """Images encoded per second of this run (decode + resize + VQGAN + write)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One paragraph for the CLI."""
        i, n = self.worker
        who = f"worker {i}/{n}: " if n > 1 else ""
        state = (
            f"dataset complete: {self.out_dir / MANIFEST_NAME}"
            if self.complete
            else "other shards are still missing; dataset.json is written when the last worker finishes"
        )
        return (
            f"{who}encoded {self.images} images ({self.rows} rows) in {self.seconds:.1f}s "
            f"({self.images_per_s:.1f} images/s); wrote {len(self.shards_written)} shard(s), "
            f"{len(self.shards_existing)} were already done, of {self.num_shards}; "
            f"{self.skipped.report('samples')}; {state}"
        )


def _source_id(source: Source) -> str:
    """Identity of a source that survives moving its folder: kind + file names."""
    names = "\n".join(p.name for p in source.paths)
    return f"{source.kind}:{hashlib.sha256(names.encode()).hexdigest()[:16]}"


class _Progress:
    """tqdm bar on a TTY, a log line every `every` seconds otherwise, nothing when disabled."""

    def __init__(
        self, enabled: bool | None, total: int | None, desc: str, every: float = 15.0
    ) -> None:
        self.enabled = enabled if enabled is not None else True
        tty = sys.stderr.isatty()
        self.bar = None
        self.start = self.last = time.perf_counter()
        self.every = every
        self.n = 0
        self.skipped = 0
        self.total = total
        self.desc = desc
        if self.enabled and tty:
            self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)

    def update(self, images: int, skipped: int) -> None:
        self.n += images
        self.skipped = skipped
        if self.bar is not None:
            self.bar.update(images)
            self.bar.set_postfix(skipped=skipped, refresh=False)
        elif self.enabled and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            rate = self.n / max(self.last - self.start, 1e-9)
            total = f"/{self.total}" if self.total else ""
            print(
                f"{self.desc}: {self.n}{total} images, {rate:.1f} images/s, {skipped} skipped",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _prepare(
    record: Record, normalizer: Normalizer | None, size: int
) -> tuple[tuple[str, ...], np.ndarray] | SampleError:
    """Decode, normalize and resize one record in a worker thread; errors are returned, not raised."""
    try:
        sample = decode_record(record, normalizer, draft_size=size)
        img = resize_center_crop(sample.image, size)
        return sample.captions, np.asarray(img, dtype=np.uint8)
    except SampleError as e:
        return e
    except Exception as e:  # never let one sample stop the run
        return SampleError("corrupt", f"{type(e).__name__}: {e}")


def _marked_shards(out: URL) -> dict[int, dict[str, Any]]:
    """Object-store output: metadata (with rows) of the shards whose marker is there and whose
    object has the size the marker records; shards written but never marked are left out."""
    objects = list_dir(out)
    names = {}
    for name in list_dir(out / DONE_DIR):
        k = shard_index(name.removesuffix(".json"))
        if k is not None and name.endswith(".json"):
            names[out / marker_name(k)] = k
    done: dict[int, dict[str, Any]] = {}
    for url, data in read_many(list(names)).items():
        k = names[url]
        try:
            meta = json.loads(data)
        except ValueError:
            log.warning("%s is not valid JSON: shard %d will be encoded again", url, k)
            continue
        if objects.get(shard_name(k)) != meta.get("bytes"):
            log.warning(
                "%s: %s is missing or not the object its marker describes; encoding it again",
                out,
                shard_name(k),
            )
            continue
        done[k] = meta
    return done


def _check_settings(out: Location, name: str, meta: dict[str, Any], expect: dict[str, Any]) -> None:
    """ConfigError when a finished shard was made with other settings than this run's."""
    for key, value in expect.items():
        if meta.get(key) != value:
            raise ConfigError(
                f"{out} already holds {name} made with {key}={meta.get(key)!r}, but this run has "
                f"{key}={value!r}; encode into a new folder, or use the same settings to resume"
            )


def _scan_existing(out: Location, expect: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Footer metadata of the shards already in `out`, checked against this run's settings."""
    if isinstance(out, URL):
        done = _marked_shards(out)
        for k, meta in done.items():
            _check_settings(out, shard_name(k), meta, expect)
        return done
    done: dict[int, dict[str, Any]] = {}
    for p in sorted(out.iterdir()):
        k = shard_index(p.name)
        if k is None:
            continue
        try:
            rows, meta = read_shard_meta(p)
        except Exception as e:
            raise InputError(
                f"{p} is not a readable Parquet shard ({e}); it was not written by dallemini "
                f"(ours appear whole or not at all). Delete it and re-run"
            ) from e
        _check_settings(out, p.name, meta, expect)
        meta["rows"] = rows
        done[k] = meta
    return done


def _shard_metas(out: Location) -> dict[int, dict[str, Any]]:
    """Metadata (with rows) of every finished shard: local footers, or object-store markers."""
    if isinstance(out, URL):
        return _marked_shards(out)
    metas: dict[int, dict[str, Any]] = {}
    for p in out.iterdir():
        k = shard_index(p.name)
        if k is not None:
            rows, meta = read_shard_meta(p)
            meta["rows"] = rows
            metas[k] = meta
    return metas


def build_manifest(
    out_dir: str | os.PathLike[str] | URL,
    source_records: int,
    defaults: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """dataset.json's content rebuilt from the shard footers (object store: their markers), or
    None while shards are missing.

    Raises `ConfigError` when the shards present do not tile [0, source_records) (the source
    changed between runs).
    """
    out = as_location(out_dir)
    metas = _shard_metas(out)
    if not metas and source_records:
        return None
    size = int(next(iter(metas.values()))["shard_size"]) if metas else 1
    num = -(-source_records // size)
    for k, meta in sorted(metas.items()):
        first, end = k * size, min((k + 1) * size, source_records)
        if k >= num or meta.get("first_record") != first or meta.get("end_record") != end:
            raise ConfigError(
                f"{out / shard_name(k)} covers source records [{meta.get('first_record')}, "
                f"{meta.get('end_record')}) but the source now has {source_records} records "
                f"(expected [{first}, {end})); the source changed since: encode into a new folder"
            )
    if any(k not in metas for k in range(num)):
        return None
    stats = SkipStats()
    shards = []
    for k in range(num):
        m = metas[k]
        s = SkipStats.from_dict(m.get("skipped") or {})
        stats.merge(s)
        shards.append(
            {
                "file": shard_name(k),
                "rows": m["rows"],
                "images": m["images"],
                "first_record": m["first_record"],
                "end_record": m["end_record"],
                "skipped": s.total,
            }
        )
    first = metas[0] if metas else dict(defaults or {})
    return {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "complete": True,
        "source": first.get("source"),
        "source_kind": first.get("source_kind"),
        "vqgan_fingerprint": first.get("vqgan_fingerprint"),
        "vqgan": first.get("vqgan"),
        "image_size": first.get("image_size"),
        "grid_size": first.get("grid_size"),
        "n_embed": first.get("n_embed"),
        "encoding_dtype": first.get("encoding_dtype"),
        "captions_normalized": first.get("captions_normalized"),
        "columns": ["key", "caption", "encoding"],
        "shard_size": first.get("shard_size"),
        "source_records": source_records,
        "images": sum(s["images"] for s in shards),
        "count": sum(s["rows"] for s in shards),
        "shards": shards,
        "skipped": stats.to_dict(),
    }


def check_has_records(source: Source) -> None:
    """Raise InputError when the source cheaply shows it holds no records (an empty folder)."""
    if source.count_hint() == 0:
        what = "no images" if source.kind == "folder" else "no records"
        raise InputError(f"{source.description} holds {what}: there is nothing to encode")


def _worker(worker: tuple[int, int] | None) -> tuple[int, int]:
    """(i, n) checked: the given worker, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    wi, wn = worker if worker is not None else worker_from_env()
    if wn < 1 or not 0 <= wi < wn:
        raise ConfigError(f"worker must be (i, n) with 0 <= i < n, got {(wi, wn)}")
    return wi, wn


def _code_layout(cfg: Any, image_size: int | None) -> tuple[int, int, pa.DataType]:
    """(image size, token grid side, Arrow type of an encoding) for this VQGAN config."""
    if getattr(cfg, "decoder_only", False):
        raise ConfigError("this VQGAN has no encoder (decoder-only checkpoint); load a full VQGAN")
    size = int(image_size or cfg.resolution)
    factor = cfg.downsample_factor
    if size % factor:
        raise ConfigError(
            f"image_size {size} must be a multiple of the VQGAN's downsampling factor {factor}"
        )
    grid = size // factor
    return size, grid, encoding_type(cfg.n_embed, grid * grid)


def _run_metadata(
    source: Source, cfg: Any, size: int, grid: int, etype: pa.DataType, shard_size: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings a resumed run must share with the shards present, every shard's footer metadata)."""
    expect = {
        "format": DATASET_FORMAT,
        "vqgan_fingerprint": cfg.fingerprint(),
        "image_size": size,
        "shard_size": shard_size,
        "source_id": _source_id(source),
        "captions_normalized": source.normalizer is not None,
    }
    shard_meta = {
        **expect,
        "version": DATASET_VERSION,
        "vqgan": cfg.to_dict(),
        "grid_size": grid,
        "n_embed": cfg.n_embed,
        "encoding_dtype": str(etype.value_type),
        "source": source.description,
        "source_kind": source.kind,
    }
    return expect, shard_meta


def _remove_temp_shards(out: Location, wi: int, wn: int) -> None:
    """Delete the temp files of this worker's shards that a killed run left behind."""
    if isinstance(out, URL):
        return  # nothing is written under a temp name there
    for p in out.iterdir():
        if p.name.startswith(".part-") and ".parquet.tmp-" in p.name:
            k = shard_index(p.name[1:].split(".tmp-")[0])
            if k is not None and k % wn == wi:
                p.unlink(missing_ok=True)


def _records_to_do(
    source: Source, shard_size: int, wi: int, wn: int, done: dict[int, Any]
) -> int | None:
    """How many records this worker will encode, when the source knows its size cheaply."""
    hint = source.count_hint()
    if hint is None:
        return None
    return sum(
        min(shard_size, hint - k * shard_size)
        for k in range(-(-hint // shard_size))
        if k % wn == wi and k not in done
    )


class _EncodeRun:
    """One worker's pass over the source: decode in threads, encode in batches, write its shards.

    The work list interleaves ('rec', key, future) for each of this worker's records with
    ('end', k, end_record) after each of its shards; at most `window` items are in flight.
    """

    def __init__(
        self,
        source: Source,
        vqgan: VQGAN,
        out: Location,
        shard_meta: dict[str, Any],
        result: EncodeResult,
        bar: _Progress,
        *,
        batch_size: int,
        shard_size: int,
        size: int,
        done: dict[int, Any],
        threads: int | None,
    ) -> None:
        self.source, self.vqgan, self.out, self.shard_meta = source, vqgan, out, shard_meta
        self.result, self.bar = result, bar
        self.batch_size, self.shard_size, self.size, self.done = batch_size, shard_size, size, done
        self.device = next(vqgan.parameters()).device
        self.n_threads = threads or min(8, os.cpu_count() or 1)
        self.window = max(2 * batch_size, 4 * self.n_threads)
        self.code_length = int(shard_meta["grid_size"]) ** 2
        self.total = 0  # records in the source, known once the work list is exhausted
        self.keys: list[str] = []
        self.caps: list[str] = []
        self.codes: list[np.ndarray] = []
        self.batch: list[tuple[str, tuple[str, ...], np.ndarray]] = []
        self.images = 0
        self.stats = SkipStats()

    def _mine(self, k: int) -> bool:
        wi, wn = self.result.worker
        return k % wn == wi and k not in self.done

    def _work(self, pool: cf.ThreadPoolExecutor) -> Iterator[tuple[Any, ...]]:
        """('rec', key, future) for my records and ('end', k, end_record) after each of my shards."""
        size = self.shard_size
        known = self.source.record_total()  # numbers may skip files no shard of mine needs
        wanted = lambda i: self._mine(i // size)  # noqa: E731
        at_k = -1  # the shard of the last number seen
        idx = -1
        for idx, record in self.source.indexed_records(wanted):
            k = idx // size
            if k != at_k:  # every shard passed since (even one with no records) ends here
                yield from self._ends(at_k, k)
                at_k = k
            if self._mine(k):
                job = pool.submit(_prepare, record, self.source.normalizer, self.size)
                yield ("rec", record.key, job)
        self.total = known if known is not None else idx + 1
        yield from self._ends(at_k, -(-self.total // size))

    def _ends(self, first: int, stop: int) -> Iterator[tuple[Any, ...]]:
        """('end', k, end_record) for my shards first..stop-1 (the last one ends at the total)."""
        for k in range(max(first, 0), stop):
            if self._mine(k):
                end = (k + 1) * self.shard_size
                yield ("end", k, min(end, self.total) if self.total else end)

    def _run_batch(self) -> None:
        batch = self.batch
        if not batch:
            return
        x = torch.from_numpy(np.stack([b[2] for b in batch])).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode():
            z = self.vqgan.encode(x).reshape(len(batch), -1).cpu().numpy()
        for (key, captions, _), row in zip(batch, z, strict=True):
            for c in captions:
                self.keys.append(key)
                self.caps.append(c)
                self.codes.append(row)
        self.images += len(batch)
        self.bar.update(len(batch), self.result.skipped.total + self.stats.total)
        batch.clear()

    def _finish_shard(self, k: int, end: int) -> None:
        self._run_batch()
        if self.codes:
            arr = np.stack(self.codes)
        else:
            arr = np.zeros((0, self.code_length), dtype=np.int64)
        meta = {
            **self.shard_meta,
            "shard": k,
            "first_record": k * self.shard_size,
            "end_record": end,
            "images": self.images,
            "skipped": self.stats.to_dict(),
        }
        n_embed = self.shard_meta["n_embed"]
        path = self.out / shard_name(k)
        size = write_shard(path, self.keys, self.caps, arr, n_embed=n_embed, metadata=meta)
        if isinstance(self.out, URL):  # the commit point: the shard is done once this exists
            marker = {**meta, "rows": len(self.keys), "bytes": size}
            write_bytes(self.out / marker_name(k), json.dumps(marker, sort_keys=True).encode())
        result = self.result
        result.shards_written.append(k)
        result.images += self.images
        result.rows += len(self.keys)
        result.skipped.merge(self.stats)
        self.keys.clear()
        self.caps.clear()
        self.codes.clear()
        self.images, self.stats = 0, SkipStats()

    def _handle(self, item: tuple[Any, ...]) -> None:
        if item[0] == "end":
            self._finish_shard(item[1], item[2])
            return
        _, key, fut = item
        res = fut.result()
        if isinstance(res, SampleError):
            self.stats.add(res.reason, key)
            self.bar.update(0, self.result.skipped.total + self.stats.total)
        else:
            self.batch.append((key, res[0], res[1]))
            if len(self.batch) >= self.batch_size:
                self._run_batch()

    def run(self) -> int:
        """Encode and write this worker's shards; returns the number of records in the source."""
        was_training = self.vqgan.training
        self.vqgan.eval()
        pool = cf.ThreadPoolExecutor(max_workers=self.n_threads, thread_name_prefix="encode-decode")
        pending: collections.deque[tuple[Any, ...]] = collections.deque()
        try:
            for item in self._work(pool):
                pending.append(item)
                if item[0] == "end":  # a shard is complete: write it now
                    while pending:
                        self._handle(pending.popleft())
                while len(pending) > self.window:
                    self._handle(pending.popleft())
            while pending:
                self._handle(pending.popleft())
        finally:
            for item in pending:
                if item[0] == "rec":
                    item[2].cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            self.bar.close()
            self.vqgan.train(was_training)
        return self.total


def encode_dataset(
    source: Source | str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | URL,
    vqgan: VQGAN,
    *,
    batch_size: int = 32,
    shard_size: int = 10_000,
    worker: tuple[int, int] | None = None,
    image_size: int | None = None,
    threads: int | None = None,
    normalizer: Normalizer | Literal["default"] | None = "default",
    progress: bool | None = None,
) -> EncodeResult:
    """Encode every (captions, image) record of `source` into Parquet token shards in `out_dir`, a
    folder or an object-store URL (see module doc).

    `vqgan` is used on the device and dtype it is on. `worker=(i, n)` encodes only shards
    k % n == i (default: torchrun's RANK/WORLD_SIZE, else all). `shard_size` counts source
    records per shard. `image_size` defaults to the VQGAN's resolution. `threads` decode images
    in parallel (default: CPU count, at most 8). `normalizer` applies when `source` is a path.
    `progress`: None shows a bar on a TTY and log lines otherwise; False is silent.
    """
    if batch_size < 1 or shard_size < 1:
        raise ConfigError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    wi, wn = _worker(worker)
    if not isinstance(source, Source):
        source = open_source(source, normalizer=normalizer)
    size, grid, etype = _code_layout(vqgan.config, image_size)
    check_has_records(source)
    out = as_location(out_dir)
    if isinstance(out, Path):
        out.mkdir(parents=True, exist_ok=True)
    else:
        check_writable(out)
    expect, shard_meta = _run_metadata(source, vqgan.config, size, grid, etype, shard_size)
    done = _scan_existing(out, expect)
    _remove_temp_shards(out, wi, wn)
    todo = _records_to_do(source, shard_size, wi, wn, done)
    result = EncodeResult(out, (wi, wn), shards_existing=sorted(k for k in done if k % wn == wi))
    bar = _Progress(progress, todo, f"encode {wi}/{wn}" if wn > 1 else "encode")
    run = _EncodeRun(
        source,
        vqgan,
        out,
        shard_meta,
        result,
        bar,
        batch_size=batch_size,
        shard_size=shard_size,
        size=size,
        done=done,
        threads=threads,
    )
    start = time.perf_counter()
    total = run.run()
    if total == 0:
        raise InputError(f"{source.description} holds no records: there is nothing to encode")
    result.seconds = time.perf_counter() - start
    result.source_records = total
    result.num_shards = -(-total // shard_size)
    manifest = build_manifest(out, total, shard_meta)
    if manifest is not None:
        write_json(out / MANIFEST_NAME, manifest)
        result.complete = True
    level = logging.WARNING if result.skipped else logging.INFO
    log.log(level, "%s", result.summary())
    return result
