"""Encoded-dataset shards (DESIGN.md §3): atomic Parquet writer, manifest, and the streaming training reader.

A dataset folder holds `part-00000.parquet`, `part-00001.parquet`, … with columns `key` (string),
`caption` (string) and `encoding` (fixed-size list of int16, or int32 when the codebook has more
than 32,767 entries, of length grid²), plus `dataset.json`. Each shard also carries its own
metadata (which source records it covers, its skip tally, the VQGAN fingerprint) in the Parquet
footer under the key `dallemini`, so `dataset.json` can always be rebuilt from the shards present.

`ShardDataset` streams (input_ids, attention_mask, image codes) batches for training:

- Each epoch the shards are put in an order drawn from (seed, epoch); all ranks agree on it.
- Rank split: the epoch's rows, taken shard after shard in that order, are cut into
  `world_size` contiguous, equal slices (sizes differ by at most one row); rank r takes slice r.
  So with many shards each rank reads its own whole shards (plus at most two boundary shards it
  shares with a neighbour, reading only its rows of them), and with fewer shards than ranks the
  ranks share files but never rows. Every row is read by exactly one rank.
- Each rank streams its rows through a shuffle buffer of `shuffle_buffer` rows. The buffer works
  on row ids only, from a RNG seeded by (seed, epoch, rank), so the order of an epoch is a pure
  function of the settings: the saved position is just (epoch, batches done), and resuming
  replays the id stream up to it (reading no data) and continues with exactly the batches an
  uninterrupted run would have produced.
- Every rank yields the same number of batches per epoch (the smallest slice // batch_size,
  or rounded up without `drop_last`), so DDP ranks never wait on each other at an epoch's end.
- The folder may be an object-store URL (`s3://bucket/tokens`); while one shard is consumed the
  next one of the rank's plan is read in a background thread, local or remote alike.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import ConfigError, InputError
from ..files import atomic_write, atomic_write_json
from .remote import URL, Location, as_location, list_dir, open_random, read_bytes, write_bytes

log = logging.getLogger(__name__)

__all__ = [
    "DATASET_FORMAT",
    "DATASET_VERSION",
    "MANIFEST_NAME",
    "Batch",
    "ShardDataset",
    "ShardInfo",
    "atomic_write_json",
    "encoding_type",
    "list_shards",
    "read_manifest",
    "read_shard",
    "read_shard_meta",
    "shard_index",
    "shard_name",
    "write_json",
    "write_shard",
]

MANIFEST_NAME = "dataset.json"
DATASET_FORMAT = "dallemini-encoded"
DATASET_VERSION = 1
META_KEY = b"dallemini"
_SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")

Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def shard_name(index: int) -> str:
    """File name of shard `index`: part-00000.parquet, …"""
    return f"part-{index:05d}.parquet"


def shard_index(name: str) -> int | None:
    """Index of a shard file name, or None when the name is not a shard's."""
    m = _SHARD_RE.match(name)
    return int(m.group(1)) if m else None


def write_json(location: str | os.PathLike[str] | URL, obj: Any) -> None:
    """Write indented JSON whole or not at all, to a local file or an object-store URL."""
    write_bytes(as_location(location), (json.dumps(obj, indent=2) + "\n").encode())


def encoding_type(n_embed: int, length: int) -> pa.DataType:
    """`fixed_size_list<int16>[length]` when codes fit in int16, else int32."""
    return pa.list_(pa.int16() if n_embed <= 32767 else pa.int32(), length)


def write_shard(
    path: str | os.PathLike[str] | URL,
    keys: Sequence[str],
    captions: Sequence[str],
    codes: np.ndarray,
    *,
    n_embed: int,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Write one shard whole or not at all (temp file + fsync + rename; one PUT to an object
    store); `codes` is [rows, grid²] integers. Returns the file's size in bytes."""
    path = as_location(path)
    codes = np.asarray(codes)
    if codes.ndim != 2 or len(codes) != len(keys) or len(keys) != len(captions):
        raise InputError(
            f"shard rows disagree: {len(keys)} keys, {len(captions)} captions, codes {codes.shape}"
        )
    length = codes.shape[1]
    etype = encoding_type(n_embed, length)
    np_dtype = np.int16 if etype.value_type == pa.int16() else np.int32
    flat = pa.array(codes.astype(np_dtype, copy=False).reshape(-1), type=etype.value_type)
    encoding = pa.FixedSizeListArray.from_arrays(flat, length)
    schema = pa.schema(
        [("key", pa.string()), ("caption", pa.string()), ("encoding", etype)],
        metadata={META_KEY: json.dumps(metadata or {}, sort_keys=True).encode()},
    )
    table = pa.Table.from_arrays(
        [pa.array(list(keys), pa.string()), pa.array(list(captions), pa.string()), encoding],
        schema=schema,
    )
    if isinstance(path, Path):
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        return path.stat().st_size
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    write_bytes(path, data)
    return len(data)


def _unreadable_shard(path: Location | str, error: BaseException) -> InputError:
    """The one-line error for a shard pyarrow cannot read: names the file and how to get it back."""
    detail = " ".join("".join(c if c.isprintable() else " " for c in str(error)).split())
    return InputError(
        f"{path} is not a readable Parquet shard ({detail or type(error).__name__}); delete it and "
        f"re-run `dallemini encode` into the same folder, which skips finished shards and writes "
        f"only the missing ones (or copy the file again from where the dataset came from)"
    )


def read_shard_meta(path: str | os.PathLike[str] | URL) -> tuple[int, dict[str, Any]]:
    """(rows, dallemini metadata) from a shard's footer only; the metadata is {} for foreign shards."""
    path = as_location(path)
    if isinstance(path, Path):
        pf = pq.ParquetFile(path)
    else:
        with open_random(path) as f:  # ranged reads: the footer only
            return read_shard_meta_from(pq.ParquetFile(f))
    return read_shard_meta_from(pf)


def read_shard_meta_from(pf: pq.ParquetFile) -> tuple[int, dict[str, Any]]:
    """(rows, dallemini metadata) of an open ParquetFile."""
    raw = (pf.schema_arrow.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {}
    return pf.metadata.num_rows, meta


def read_shard(
    path: str | os.PathLike[str] | URL, length: int | None = None
) -> tuple[list[str], np.ndarray]:
    """(captions, codes [rows, length]) of one shard, local or a URL (fetched whole);
    list<int> encodings (dalle-mini's datasets) work too."""
    path = as_location(path)
    try:
        source = path if isinstance(path, Path) else pa.BufferReader(read_bytes(path))
        with pq.ParquetFile(source) as pf:
            missing = [c for c in ("caption", "encoding") if c not in pf.schema_arrow.names]
            if missing:
                raise InputError(
                    f"{path} has no column {missing[0]!r}; a shard has 'caption' and 'encoding'"
                )
            table = pf.read(columns=["caption", "encoding"])
    except (pa.ArrowException, OSError) as e:
        raise _unreadable_shard(path, e) from e
    captions = table.column("caption").to_pylist()
    col = table.column("encoding").combine_chunks()
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if n else (length or 0)
        if n and (lengths != width).any():
            raise InputError(f"{path}: encodings have different lengths {sorted(set(lengths))}")
    else:
        raise InputError(f"{path}: column 'encoding' has type {col.type}, expected a list of ints")
    if length is not None and n and width != length:
        raise InputError(f"{path}: encodings have {width} codes, the dataset expects {length}")
    if col.null_count:
        raise InputError(f"{path}: {col.null_count} rows have no encoding")
    flat = col.flatten().to_numpy(zero_copy_only=False)
    codes = flat.reshape(n, width if n else (length or width))
    if any(c is None for c in captions):
        captions = [c if c is not None else "" for c in captions]
    return captions, codes


def read_manifest(folder: str | os.PathLike[str] | URL) -> dict[str, Any] | None:
    """The folder's dataset.json, or None when it has none (an encode that has not finished)."""
    path = as_location(folder) / MANIFEST_NAME
    try:
        text = read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise InputError(f"{path} is not valid JSON ({e}); re-run the encode to rebuild it") from e
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object")
    return data


@dataclass(frozen=True)
class ShardInfo:
    """One shard file (a local path or a URL) and its row count."""

    path: Location
    rows: int


def _file_names(folder: Location) -> set[str] | None:
    """Names of the files directly in a local folder or under an object-store prefix; None for a
    web server, which need not list its folders."""
    if isinstance(folder, Path):
        return {p.name for p in folder.iterdir() if p.is_file()}
    if folder.protocol in ("http", "https"):
        return None
    return set(list_dir(folder))


def list_shards(folder: str | os.PathLike[str] | URL) -> tuple[list[ShardInfo], dict[str, Any]]:
    """Shards of an encoded dataset (from dataset.json, else every part-*.parquet) and the manifest
    ({} if none); `folder` may be an object-store URL (`s3://bucket/tokens`)."""
    folder = as_location(folder)
    if isinstance(folder, Path) and not folder.is_dir():
        raise InputError(f"{folder} is not a folder; pass the output folder of `dallemini encode`")
    manifest = read_manifest(folder)
    shards: list[ShardInfo] = []
    if manifest is not None and isinstance(manifest.get("shards"), list):
        present = _file_names(folder)
        for entry in manifest["shards"]:
            path = folder / entry["file"]
            if present is not None and entry["file"] not in present:
                raise InputError(
                    f"{folder / MANIFEST_NAME} lists {entry['file']}, which is missing; "
                    f"re-run the encode into this folder to write it again"
                )
            shards.append(ShardInfo(path, int(entry["rows"])))
        return shards, manifest
    names = _file_names(folder)
    if names is None:
        raise InputError(
            f"{folder} has no {MANIFEST_NAME}; over HTTP only a finished dataset is read"
        )
    files = [
        folder / name
        for name in sorted(
            (n for n in names if shard_index(n) is not None),
            key=lambda n: shard_index(n) or 0,
        )
    ]
    if not files:
        raise InputError(f"{folder} holds no part-*.parquet shards")
    log.warning(
        "%s has no %s: the encode may be unfinished; reading the shards present",
        folder,
        MANIFEST_NAME,
    )
    for p in files:
        try:
            rows, _ = read_shard_meta(p)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise _unreadable_shard(p, e) from e
        shards.append(ShardInfo(p, rows))
    return shards, {}


class _ReadAhead:
    """Loads shards in plan order one ahead of use, in a background thread: the next shard is
    fetched while the current one is consumed (rows enter the shuffle buffer shard by shard)."""

    def __init__(self, load: Callable[[int], Any], order: list[int]) -> None:
        self._load = load
        self._next = dict(itertools.pairwise(order))
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: dict[int, cf.Future[Any]] = {}

    def _submit(self, s: int) -> None:
        if s in self._pending:
            return
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="shard-read-ahead")
        self._pending[s] = self._pool.submit(self._load, s)

    def get(self, s: int) -> Any:
        """Shard `s` (waiting for it if it is still being read); starts reading the one after it."""
        self._submit(s)
        future = self._pending.pop(s)
        following = self._next.get(s)
        if following is not None:
            self._submit(following)
        return future.result()

    def close(self) -> None:
        """Drop what was read ahead and not used (a run that stops mid-epoch)."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class Batch(NamedTuple):
    """One training batch: caption token ids and mask [B, T], image codes [B, grid²] (all int64)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    codes: torch.Tensor


def _seed(*parts: int) -> list[int]:
    return [int(p) % (2**63) for p in parts]


# The attributes of a rank-split batch reader that its batch order depends on: a saved position
# refuses to resume when one of them changed.
BATCHING_SETTINGS = (
    "seed",
    "batch_size",
    "shuffle",
    "shuffle_buffer",
    "rank",
    "world_size",
    "drop_last",
)


class RankSplitBatches:
    """The batching settings shared by the exactly resumable, rank-split readers (`ShardDataset`,
    `data.pairs.PairDataset`): checked and stored once, listed by `BATCHING_SETTINGS`."""

    batch_size: int
    shuffle: bool
    shuffle_buffer: int | None
    seed: int
    rank: int
    world_size: int
    epochs: int | None
    drop_last: bool

    def _set_batching(
        self,
        batch_size: int,
        shuffle: bool,
        shuffle_buffer: int | None,
        seed: int,
        rank: int,
        world_size: int,
        epochs: int | None,
        drop_last: bool,
    ) -> None:
        """Check (a batch size >= 1, a rank in [0, world_size)) and store the settings."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = None if shuffle_buffer is None else int(shuffle_buffer)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epochs = epochs
        self.drop_last = bool(drop_last)

    def _batching_settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in BATCHING_SETTINGS}


class ShardDataset(IterableDataset, RankSplitBatches):
    """Streaming, shuffling, rank-aware, exactly resumable reader of an encoded dataset (see module doc).

    `tokenize` maps a list of captions to (input_ids, attention_mask), e.g. a `TextEncoder`. The
    captions are stored already normalized (dataset.json says `"captions_normalized": true`), and
    normalizing twice gives the same text, so a normalizing tokenizer is fine.
    `epochs=None` streams forever; `state_dict()` after a batch is the position right after it.
    Use it directly or in a `DataLoader(ds, batch_size=None, num_workers=0)`: worker processes
    would each replay the whole stream.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str] | URL,
        tokenize: Tokenize,
        batch_size: int,
        *,
        shuffle: bool = True,
        shuffle_buffer: int = 10_000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        epochs: int | None = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        self._set_batching(
            batch_size, shuffle, shuffle_buffer, seed, rank, world_size, epochs, drop_last
        )
        if shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.folder = as_location(folder)
        self.tokenize = tokenize
        self.shards, self.info = list_shards(self.folder)
        grid = self.info.get("grid_size")
        self.code_length: int | None = int(grid) ** 2 if grid else None
        self.n_embed: int | None = self.info.get("n_embed")
        self._rows = np.array([s.rows for s in self.shards], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._rows)])
        self.total_rows = int(self._offsets[-1])
        self.epoch = int(epoch)
        self.batch = 0
        if self.batches_in_epoch(self.epoch) == 0:
            raise ConfigError(
                f"{self.folder}: {self.total_rows} rows over {self.world_size} rank(s) do not make one "
                f"batch of {self.batch_size} per rank; use a smaller batch size or more data"
            )

    # --- the plan of an epoch -----------------------------------------------------------------
    def _shard_order(self, epoch: int) -> np.ndarray:
        k = len(self.shards)
        if not self.shuffle:
            return np.arange(k)
        return np.random.default_rng(_seed(self.seed, epoch, 0x5A4D)).permutation(k)

    def plan(self, epoch: int, rank: int) -> list[tuple[int, np.ndarray | None]]:
        """The (shard index, rows or None for all) this rank streams in this epoch, in order."""
        order = self._shard_order(epoch)
        lo = rank * self.total_rows // self.world_size
        hi = (rank + 1) * self.total_rows // self.world_size
        work: list[tuple[int, np.ndarray | None]] = []
        start = 0
        for s in order.tolist():
            n = int(self._rows[s])
            a, b = max(lo - start, 0), min(hi - start, n)
            if a < b:
                work.append((s, None if (a, b) == (0, n) else np.arange(a, b)))
            start += n
            if start >= hi:
                break
        return work

    def epoch_coverage(self, rows: int) -> float:
        """The share of this rank's epoch-0 rows (so of its shards, which hold consecutive rows)
        that the stream has read by the time it hands out `rows` rows: below 1, a dataset stored
        in some order (by subject, by source) is learnt from part of its shards only."""
        total = self._plan_rows(self.plan(0, self.rank))
        buffer = self.shuffle_buffer if self.shuffle and self.shuffle_buffer else 0
        return min(1.0, (rows + buffer) / max(total, 1))

    def _plan_rows(self, work: list[tuple[int, np.ndarray | None]]) -> int:
        return sum(int(self._rows[s]) if r is None else len(r) for s, r in work)

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        """Batches every rank yields in this epoch (the same on all ranks)."""
        epoch = self.epoch if epoch is None else epoch
        fewest = min(self._plan_rows(self.plan(epoch, r)) for r in range(self.world_size))
        if self.drop_last:
            return fewest // self.batch_size
        return -(-fewest // self.batch_size)

    def __len__(self) -> int:
        return self.batches_in_epoch(self.epoch)

    def _row_ids(self, epoch: int) -> Iterator[int]:
        """Global row ids (shard offset + row) of this rank's epoch, after the shuffle buffer."""
        work = self.plan(epoch, self.rank)

        def stream() -> Iterator[int]:
            for s, rows in work:
                base = int(self._offsets[s])
                if rows is None:
                    yield from range(base, base + int(self._rows[s]))
                else:
                    yield from (base + rows).tolist()

        size = self.shuffle_buffer if self.shuffle else 0
        if size <= 1:
            yield from stream()
            return
        rng = np.random.default_rng(_seed(self.seed, epoch, self.rank, 0xB0F))
        buffer: list[int] = []
        draws: list[int] = []
        for rid in stream():
            if len(buffer) < size:
                buffer.append(rid)
                continue
            if not draws:
                draws = rng.integers(0, size, 4096).tolist()[::-1]
            j = draws.pop()
            out, buffer[j] = buffer[j], rid
            yield out
        for j in rng.permutation(len(buffer)).tolist():
            yield buffer[j]

    # --- reading ------------------------------------------------------------------------------
    def _load(self, s: int) -> tuple[list[str], np.ndarray]:
        captions, codes = read_shard(self.shards[s].path, self.code_length)
        if len(captions) != self.shards[s].rows:
            raise InputError(
                f"{self.shards[s].path} has {len(captions)} rows, {MANIFEST_NAME} says {self.shards[s].rows}; "
                f"the folder changed since it was written"
            )
        if self.code_length is None and len(codes):
            self.code_length = codes.shape[1]
        if (
            self.n_embed is not None
            and codes.size
            and (codes.min() < 0 or codes.max() >= self.n_embed)
        ):
            raise InputError(
                f"{self.shards[s].path} holds codes outside [0, {self.n_embed}); it was not made by this VQGAN"
            )
        return captions, codes

    def __iter__(self) -> Iterator[Batch]:
        """Batches from the current position on; the position advances as each batch is handed out."""
        if get_worker_info() is not None:
            raise ConfigError(
                "ShardDataset does its own rank split and resumable order; use DataLoader(num_workers=0)"
            )
        while self.epochs is None or self.epoch < self.epochs:
            n = self.batches_in_epoch(self.epoch)
            if self.batch >= n:
                self.epoch, self.batch = self.epoch + 1, 0
                continue
            yield from self._epoch_batches(self.epoch, n)
            self.epoch, self.batch = self.epoch + 1, 0

    def _epoch_batches(self, epoch: int, n: int) -> Iterator[Batch]:
        remaining: dict[int, int] = {}
        work = self.plan(epoch, self.rank)
        for s, rows in work:
            remaining[s] = remaining.get(s, 0) + (int(self._rows[s]) if rows is None else len(rows))
        cache: dict[int, tuple[list[str], np.ndarray]] = {}
        ids = self._row_ids(epoch)
        ahead = _ReadAhead(self._load, [s for s, _ in work])
        try:
            yield from self._batches_from(ids, remaining, cache, ahead, n)
        finally:
            ahead.close()

    def _batches_from(
        self,
        ids: Iterator[int],
        remaining: dict[int, int],
        cache: dict[int, tuple[list[str], np.ndarray]],
        ahead: _ReadAhead,
        n: int,
    ) -> Iterator[Batch]:

        def take(count: int) -> list[tuple[int, int]]:
            out = []
            for rid in ids:
                s = int(np.searchsorted(self._offsets, rid, side="right")) - 1
                out.append((s, rid - int(self._offsets[s])))
                if len(out) == count:
                    break
            return out

        def release(s: int) -> None:
            remaining[s] -= 1
            if remaining[s] == 0:
                cache.pop(s, None)

        for _ in range(self.batch):  # fast-forward to the saved position without reading data
            for s, _row in take(self.batch_size):
                release(s)
        while self.batch < n:
            picked = take(self.batch_size)
            if not picked:
                break
            captions: list[str] = []
            codes = []
            for s, row in picked:
                if s not in cache:
                    cache[s] = ahead.get(s)
                caps, enc = cache[s]
                captions.append(caps[row])
                codes.append(enc[row])
                release(s)
            input_ids, mask = self.tokenize(captions)
            batch = Batch(
                torch.as_tensor(input_ids, dtype=torch.long),
                torch.as_tensor(mask, dtype=torch.long),
                torch.from_numpy(np.stack(codes).astype(np.int64)),
            )
            self.batch += 1
            yield batch

    # --- position -----------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {
            **self._batching_settings(),
            "shards": hashlib.sha256(
                "\n".join(f"{s.path.name} {s.rows}" for s in self.shards).encode()
            ).hexdigest()[:16],
            "rows": self.total_rows,
        }

    def state_dict(self) -> dict[str, Any]:
        """The exact position: (epoch, batches done in it) plus the settings the order depends on."""
        return {"version": 1, "epoch": self.epoch, "batch": self.batch, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses settings that would give a different order."""
        mine = self._settings()
        for name, value in mine.items():
            if name in state and state[name] != value:
                raise ConfigError(
                    f"cannot resume the data position: {name} was {state[name]!r}, now {value!r}; "
                    f"a saved position only means the same batches with the same shards and settings"
                )
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"])

    def set_epoch(self, epoch: int) -> None:
        """Start at the beginning of `epoch`."""
        self.epoch, self.batch = int(epoch), 0
