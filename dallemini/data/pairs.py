"""A resumable, rank-aware stream of (caption, image) batches read straight from a caption–image source.

`PairDataset` is what the trainers that learn from pixels use (the small CLIP, the VQGAN): it takes any
`Source` (`open_source`: image folder, webdataset tars, Parquet) and yields `PairBatch`es of captions,
float pixels in [0, 1] (decoded, `resize_center_crop`ped to `image_size`) and item indices.

- Index: the source's records are listed once, in its fixed order (only those numbered `start`
  to `stop - 1` there, when given: e.g. the first N held out for evaluation, counted before any
  are dropped). Records that are known bad before decoding (no image; no usable caption, unless
  `require_captions=False`, which keeps them with the caption "") are dropped there and counted in
  `index_stats`. Image loaders stay lazy (folder files, uncompressed tar members by offset);
  Parquet and compressed tar sources keep their encoded image bytes in memory, as their
  `records()` do, unless `shuffle_buffer` is set (below).
- Items: one per record (`captions="random"`: a caption drawn per epoch from (seed, epoch, item);
  `"first"`: always its first caption) or one per caption (`"all"`: an image with two captions is
  two items, which share `record`).
- Order: epoch e is a permutation of the items drawn from (seed, e) (or the source order without
  `shuffle`); all ranks draw the same one, and rank r of w takes every w-th item from position r.
- Streaming (`shuffle_buffer=N`, for sources larger than memory): the index keeps only keys and
  captions, and each epoch reads the source again. Rank r takes items r, r + w, ... of the source
  order and shuffles them through a buffer of N items drawn from (seed, epoch, r), as
  `ShardDataset` does: a local shuffle (a full one when N covers the rank's items; 0 keeps the
  source order), with about N records' bytes held at a time.
- Either way the order is a pure function of the settings, and the saved position is just (epoch,
  items of this rank's list used so far): resuming skips that many items without decoding them and
  goes on with exactly the batches an uninterrupted run would have made.
- Images that fail to decode are skipped and counted in `stats` (by reason, with example keys);
  the batch is filled from the next items. Decoding is a pure function of the file, so a resumed
  run skips the same ones. An epoch's skips are logged at its end: as a warning the first time
  (and when a reason is counted more often than before), then at debug level, as the same files
  fail every epoch. With `workers > 0` a thread pool decodes ahead, in the same order.
- Ranks may end an epoch after different numbers of batches (skips differ); training streams
  (`epochs=None`) never run dry, so data-parallel ranks still take one batch per step each.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, InputError
from ..images import resize_center_crop
from .remote import URL
from .shards import RankSplitBatches
from .sources import (
    ParquetSource,
    Record,
    SampleError,
    SkipStats,
    Source,
    TarSource,
    prepare_captions,
)

log = logging.getLogger(__name__)

__all__ = ["CAPTION_MODES", "PairBatch", "PairDataset", "PairItem", "to_pixels"]

CAPTION_MODES = ("random", "first", "all")
STATE_VERSION = 1

# (image, per-item generator) -> [3, size, size] float pixels in [0, 1]
Transform = Callable[[Image.Image, np.random.Generator], torch.Tensor]


class PairBatch(NamedTuple):
    """A batch: captions (normalized), pixels [B, 3, S, S] float32 in [0, 1], and the items' record numbers.

    Two entries with the same `record` show the same image (`captions="all"`).
    """

    captions: list[str]
    pixels: torch.Tensor
    record: torch.Tensor


@dataclass(frozen=True)
class PairItem:
    """One usable record of the index: its key, normalized captions and image loader.

    `record` is None when streaming (`shuffle_buffer`): the image is read from the source each epoch.
    """

    key: str
    captions: tuple[str, ...]
    record: Record | None


def to_pixels(img: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> [3, size, size] float32 in [0, 1] after `resize_center_crop`."""
    arr = np.asarray(resize_center_crop(img.convert("RGB"), size), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)


def _seed(*parts: int) -> list[int]:
    return [int(p) % (2**63) for p in parts]


def _buffer_shuffle(ids: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`ids` in the order a shuffle buffer of `size` hands them out (a full shuffle if it holds them all).

    Each id at input position p comes out at position >= p - size, so a reader that follows this
    order through the source holds at most about `size` records it has read but not yet used.
    """
    if size <= 1 or len(ids) <= 1:
        return ids
    buffer = ids[:size].tolist()
    rest = ids[size:].tolist()
    out: list[int] = []
    for new, j in zip(rest, rng.integers(0, size, len(rest)).tolist(), strict=True):
        out.append(buffer[j])
        buffer[j] = new
    out.extend(buffer[j] for j in rng.permutation(len(buffer)).tolist())
    return np.array(out, dtype=ids.dtype)


def _holds_bytes(source: Source) -> bool:
    """Whether the source's records carry their encoded images in memory (Parquet, compressed or
    remote tars)."""
    if isinstance(source, ParquetSource):
        return True
    return isinstance(source, TarSource) and any(
        isinstance(p, URL) or p.suffix != ".tar" for p in source.paths
    )


class PairDataset(RankSplitBatches):
    """Exactly resumable, rank-split batches of (caption, image) from a `Source` (see the module doc).

    `require_captions=False` keeps records without a caption (their caption is ""), for image-only
    training. `start`/`stop` restrict it to the source's records start..stop-1 (numbered in source
    order, bad ones included). `shuffle_buffer=None` shuffles each epoch over the whole in-memory
    index; an int streams the source through a buffer of that many items instead (bounded memory).
    `transform(image, rng)` replaces the default `to_pixels(image, image_size)`; `rng` is
    seeded by (seed, epoch, item), so random augmentations resume exactly too (with `workers` it runs
    in threads). `epochs=None` streams forever; `state_dict()` after a batch is the position right
    after it.
    """

    def __init__(
        self,
        source: Source,
        batch_size: int,
        image_size: int,
        *,
        captions: str = "random",
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        drop_last: bool = True,
        require_captions: bool = True,
        transform: Transform | None = None,
        workers: int = 0,
        shuffle_buffer: int | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        self._set_batching(
            batch_size, shuffle, shuffle_buffer, seed, rank, world_size, epochs, drop_last
        )
        if image_size < 1:
            raise ConfigError(f"image_size must be >= 1, got {image_size}")
        if captions not in CAPTION_MODES:
            raise ConfigError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
        if workers < 0:
            raise ConfigError(f"workers must be >= 0, got {workers}")
        if shuffle_buffer is not None and shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer must be >= 0 (or None), got {shuffle_buffer}")
        if start < 0 or (stop is not None and stop < start):
            raise ConfigError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
        self.source = source
        self.image_size = int(image_size)
        self.captions = captions
        self.require_captions = bool(require_captions)
        self.transform = transform
        self.workers = int(workers)
        self.start = int(start)
        self.stop = None if stop is None else int(stop)
        self._what = "(caption, image) pairs" if self.require_captions else "images"
        self.index_stats = SkipStats()
        self.records: list[PairItem] = self._index()
        # items: (record number, caption number or -1 for "drawn per epoch")
        if captions == "all":
            pairs = [(r, c) for r, it in enumerate(self.records) for c in range(len(it.captions))]
        else:
            pairs = [(r, 0 if captions == "first" else -1) for r in range(len(self.records))]
        self._items = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        keys = "\n".join(it.key for it in self.records).encode()
        self._keys_hash = hashlib.sha256(keys).hexdigest()[:16]
        self.epoch = 0
        self.position = 0  # items of this rank's list for this epoch already used (or skipped)
        self.stats = SkipStats()
        self._reported: dict[str, int] = {}  # the most skips per reason logged as a warning
        fewest = len(self._items) // self.world_size
        if fewest < (self.batch_size if self.drop_last else 1):
            raise ConfigError(
                f"{source.description}: {len(self._items)} usable {self._what} over "
                f"{self.world_size} rank(s) do not make one batch of {self.batch_size} per rank; use a "
                f"smaller batch size or more data"
                + (f" ({self.index_stats.report('records')})" if self.index_stats else "")
            )

    # --- the index ------------------------------------------------------------------------------
    def _scan(self, stats: SkipStats | None) -> Iterator[tuple[Record, tuple[str, ...]]]:
        """The usable records of start..stop-1 with their normalized captions; `stats` counts the others."""
        for n, record in enumerate(self.source.records()):
            if self.stop is not None and n >= self.stop:
                return
            if n < self.start:
                continue
            if record.problem is not None:
                if stats is not None:
                    stats.add(record.problem, record.key)
                continue
            caps = prepare_captions(record.captions, self.source.normalizer)
            if not caps:
                if self.require_captions:
                    if stats is not None:
                        reason = "empty_caption" if record.captions else "missing_caption"
                        stats.add(reason, record.key)
                    continue
                caps = ("",)
            yield record, caps

    def _index(self) -> list[PairItem]:
        keep = self.shuffle_buffer is None  # else the images are read again from the source
        out = [
            PairItem(r.key, caps, r if keep else None) for r, caps in self._scan(self.index_stats)
        ]
        if self.index_stats:
            log.warning("%s: %s", self.source.description, self.index_stats.report("records"))
        if not out:
            end = "the end" if self.stop is None else self.stop - 1
            span = (
                "" if (self.start, self.stop) == (0, None) else f" (records {self.start} to {end})"
            )
            raise InputError(
                f"{self.source.description}{span} holds no usable {self._what}"
                + (f": {self.index_stats.report('records')}" if self.index_stats else "")
            )
        if keep and _holds_bytes(self.source):
            log.info(
                "%s: the index holds the %d records' encoded images in memory (shuffle_buffer "
                "streams them instead)",
                self.source.description,
                len(out),
            )
        return out

    @property
    def num_items(self) -> int:
        """Items per epoch over all ranks."""
        return len(self._items)

    def all_captions(self) -> Iterator[str]:
        """Every normalized caption of the index, in source order (for training a tokenizer)."""
        for it in self.records:
            yield from (c for c in it.captions if c.strip())

    # --- the plan of an epoch -------------------------------------------------------------------
    def rank_items(self, epoch: int, rank: int | None = None) -> np.ndarray:
        """The item numbers this rank reads in this epoch, in order."""
        rank = self.rank if rank is None else rank
        n = len(self._items)
        if self.shuffle_buffer is not None:  # streaming: this rank's share of the source order
            mine = np.arange(rank, n, self.world_size)
            if not self.shuffle:
                return mine
            rng = np.random.default_rng(_seed(self.seed, epoch, rank, 0xB0F))
            return _buffer_shuffle(mine, self.shuffle_buffer, rng)
        if self.shuffle:
            order = np.random.default_rng(_seed(self.seed, epoch, 0xC11F)).permutation(n)
        else:
            order = np.arange(n)
        return order[rank :: self.world_size]

    def __len__(self) -> int:
        """Batches of this rank per epoch when no image is skipped."""
        n = len(range(self.rank, len(self._items), self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _caption(self, epoch: int, item: int) -> str:
        r, c = (int(v) for v in self._items[item])
        caps = self.records[r].captions
        if c < 0:
            c = (
                int(np.random.default_rng(_seed(self.seed, epoch, item, 0xCA9)).integers(len(caps)))
                if len(caps) > 1
                else 0
            )
        return caps[c]

    def _records_for(self, items: np.ndarray, start: int) -> Iterator[tuple[int, int, Record]]:
        """(position, item, record to read its image from) for items[start:], in order."""
        if self.shuffle_buffer is None:
            for pos in range(start, len(items)):
                item = int(items[pos])
                record = self.records[int(self._items[item, 0])].record
                assert record is not None
                yield pos, item, record
            return
        # Streaming: read the source in order, keeping only the records still wanted and not yet used
        # (those read ahead of the buffer's order: about shuffle_buffer of them).
        wanted = self._items[items[start:], 0]
        need = np.bincount(wanted, minlength=len(self.records))
        held: dict[int, Record] = {}
        scan = self._scan(None)
        read = 0  # usable records read so far
        for k, r in enumerate(wanted.tolist()):
            while r not in held:
                got = next(scan, None)
                if got is None or got[0].key != self.records[read].key:
                    raise InputError(
                        f"{self.source.description} changed since it was indexed: usable record "
                        f"{read} was {self.records[read].key!r}, now "
                        f"{'gone' if got is None else repr(got[0].key)}"
                    )
                if need[read]:
                    held[read] = got[0]
                read += 1
            need[r] -= 1
            record = held[r] if need[r] else held.pop(r)
            yield start + k, int(items[start + k]), record

    def _load(
        self, epoch: int, item: int, record: Record
    ) -> tuple[str, torch.Tensor, int] | SampleError:
        try:
            img = record.image(draft_size=self.image_size)
            if self.transform is None:
                try:
                    pixels = to_pixels(img, self.image_size)
                except (OSError, ValueError) as e:  # Pillow failing on a decoded but odd image
                    raise SampleError("corrupt", f"{type(e).__name__}: {e}") from e
            else:
                rng = np.random.default_rng(_seed(self.seed, epoch, item, 0x7A5))
                pixels = self.transform(img, rng)
        except SampleError as e:
            return e
        return self._caption(epoch, item), pixels, int(self._items[item, 0])

    def _decoded(
        self, epoch: int, items: np.ndarray, start: int
    ) -> Iterator[tuple[int, tuple[str, torch.Tensor, int] | SampleError]]:
        """(position, sample or the reason it was skipped) for items[start:], in order."""
        todo = self._records_for(items, start)
        if self.workers == 0:
            for pos, item, record in todo:
                yield pos, self._load(epoch, item, record)
            return
        window = max(self.batch_size, 2 * self.workers)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pairs")
        pending: deque[list[tuple[int, Future[Any]]]] = deque()
        try:
            while chunk := list(islice(todo, window)):
                pending.append([(pos, pool.submit(self._load, epoch, i, r)) for pos, i, r in chunk])
                if len(pending) < 2:  # keep one window decoding while the other is used
                    continue
                for pos, f in pending.popleft():
                    yield pos, f.result()
            while pending:
                for pos, f in pending.popleft():
                    yield pos, f.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # --- reading --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[PairBatch]:
        """Batches from the current position on; the position advances as each batch is handed out."""
        while self.epochs is None or self.epoch < self.epochs:
            start = self.position
            if start == 0:  # skips are counted per epoch (and restored with a saved position)
                self.stats = SkipStats()
            made = yield from self._epoch_batches(self.epoch)
            if made == 0 and start == 0:
                raise InputError(
                    f"{self.source.description}: rank {self.rank}'s part of epoch {self.epoch} gave "
                    f"not one batch of {self.batch_size} decodable images ({self.stats.report('images')})"
                )
            if self.stats:
                self._report_skips()
            self.epoch, self.position = self.epoch + 1, 0

    def _report_skips(self) -> None:
        """Log the epoch's skips: a warning when a reason is counted more often than ever before, else debug."""
        counts = self.stats.counts
        louder = any(n > self._reported.get(reason, 0) for reason, n in counts.items())
        for reason, n in counts.items():
            self._reported[reason] = max(n, self._reported.get(reason, 0))
        where = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        log.log(
            logging.WARNING if louder else logging.DEBUG,
            "%s%s, epoch %d: %s",
            self.source.description,
            where,
            self.epoch,
            self.stats.report("images"),
        )

    def _epoch_batches(self, epoch: int) -> Generator[PairBatch, None, int]:
        items = self.rank_items(epoch)
        captions: list[str] = []
        pixels: list[torch.Tensor] = []
        records: list[int] = []
        made = 0
        for pos, result in self._decoded(epoch, items, self.position):
            if isinstance(result, SampleError):
                self.stats.add(result.reason, self.records[int(self._items[items[pos], 0])].key)
                continue
            caption, pix, r = result
            captions.append(caption)
            pixels.append(pix)
            records.append(r)
            if len(captions) == self.batch_size:
                self.position = pos + 1
                made += 1
                yield self._batch(captions, pixels, records)
                captions, pixels, records = [], [], []
        if captions and not self.drop_last:
            made += 1
            self.position = len(items)
            yield self._batch(captions, pixels, records)
        return made

    def _batch(
        self, captions: list[str], pixels: list[torch.Tensor], records: list[int]
    ) -> PairBatch:
        stacked = torch.stack(pixels)
        want = (3, self.image_size, self.image_size)
        if self.transform is not None and tuple(stacked.shape[1:]) != want:
            raise ConfigError(
                f"the transform made pixels of shape {tuple(stacked.shape[1:])}, expected {want}"
            )
        return PairBatch(list(captions), stacked, torch.tensor(records, dtype=torch.long))

    # --- position -------------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {
            **self._batching_settings(),
            **{name: getattr(self, name) for name in ("image_size", "captions", "start", "stop")},
            "items": len(self._items),
            "keys": self._keys_hash,
        }

    def state_dict(self) -> dict[str, Any]:
        """The exact position: (epoch, items used in it) plus the settings the order depends on."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "skipped": self.stats.to_dict(),
            **self._settings(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses settings or data that would give a different order."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"cannot resume the data position: state version {state.get('version')!r}, "
                f"this reader writes {STATE_VERSION}"
            )
        if "rank" in state:
            self.rank = int(state["rank"])  # the trainer hands each rank its own
        for name, value in self._settings().items():
            if name in state and state[name] != value:
                what = "the source's records" if name in ("items", "keys") else name
                raise ConfigError(
                    f"cannot resume the data position: {what} changed ({state[name]!r} then, "
                    f"{value!r} now); a saved position only means the same batches with the same "
                    f"data and settings"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.stats = SkipStats.from_dict(state.get("skipped") or {})

    def set_epoch(self, epoch: int) -> None:
        """Start at the beginning of `epoch`."""
        self.epoch, self.position = int(epoch), 0
