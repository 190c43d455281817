"""Glyph-swapped token rows for emoji-scenes training: a scene's codes with its glyph cells' codes
taken from the same subject and place on another training colour, under the scene's own caption.

A subject's edge cells blend with the background, so their VQGAN codes differ per colour; a
DalleBart trained on the plain rows learns which variant goes with which colour and, for a colour
never seen with the subject, draws a subject that was. These rows break that link: the glyph's
codes come from any training colour while the background (and the caption) keep theirs. They are
only worth it with a VQGAN whose decoder takes the fringe colour from the cells around a glyph
(train-vqgan's `background_swap`). Both scenes of a swap are training rows, so held-out pairs stay
unseen.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..errors import ConfigError, InputError
from .emoji import EmojiScenes, _rng, glyph_cells
from .shards import (
    MANIFEST_NAME,
    ShardInfo,
    atomic_write_json,
    list_shards,
    read_shard_meta,
    shard_index,
    shard_name,
    write_shard,
)

__all__ = ["glyph_cell_mask", "write_glyph_donors", "write_glyph_swaps"]


def glyph_cell_mask(scenes: EmojiScenes, subject: str, position: str, cell: int) -> np.ndarray:
    """[side/cell, side/cell] bool: the token cells that hold any pixel of the subject's glyph."""
    return glyph_cells(scenes.glyph_alpha(subject, position), cell)


def write_glyph_swaps(
    data_dir: str | os.PathLike[str],
    tokens_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    copies: int = 1,
    seed: int = 0,
) -> int:
    """Write `out_dir`: the encoded rows of `tokens_dir` plus `copies` glyph-swapped rows per image.

    `data_dir` is the emoji-scenes folder `tokens_dir` was encoded from (its metadata.jsonl names
    every image's scene). The original shards are hard-linked (copied where links fail); the new
    rows go into shards after them, listed in the same manifest. Returns the rows added.
    """
    if copies < 1:
        raise ConfigError(f"glyph swap copies must be >= 1, got {copies}")
    scenes, shards, manifest, scene_of, codes, captions = _read_encoded(data_dir, tokens_dir)
    cell = int(manifest["image_size"]) // int(manifest["grid_size"])
    by_place: dict[tuple[str, str], list[str]] = {}
    for key in sorted(codes):
        subject, _, position = scene_of[key]
        by_place.setdefault((subject, position), []).append(key)
    mask_of = _mask_cache(scenes, cell)
    keys, caps, rows = [], [], []
    for key in sorted(codes):
        subject, colour, position = scene_of[key]
        donors = [k for k in by_place[subject, position] if scene_of[k][1] != colour]
        if not donors:
            continue
        mask = mask_of(subject, position)
        rng = _rng(seed, "glyph-swaps", key)
        for k in range(copies):
            donor = donors[int(rng.integers(len(donors)))]
            keys.append(f"{key}#swap{k}")
            caps.append(captions[key][int(rng.integers(len(captions[key])))])
            rows.append(np.where(mask, codes[donor], codes[key]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for info in shards:
        dst = out / info.path.name
        dst.unlink(missing_ok=True)
        try:
            os.link(info.path, dst)
        except OSError:
            dst.write_bytes(info.path.read_bytes())
        entries.append(next(e for e in manifest["shards"] if e["file"] == info.path.name))
    size = max(1, max(info.rows for info in shards))  # rows per new shard: as the largest old one
    start = max(shard_index(info.path.name) or 0 for info in shards) + 1
    for i, lo in enumerate(range(0, len(rows), size)):
        name = shard_name(start + i)
        part = slice(lo, lo + size)
        write_shard(
            out / name,
            keys[part],
            caps[part],
            np.stack(rows[part]),
            n_embed=int(manifest["n_embed"]),
            metadata={"glyph_swaps": True, "vqgan_fingerprint": manifest.get("vqgan_fingerprint")},
        )
        entries.append({"file": name, "rows": len(keys[part]), "glyph_swaps": True})
    atomic_write_json(
        out / MANIFEST_NAME,
        {
            **manifest,
            "shards": entries,
            "count": int(manifest.get("count", 0)) + len(rows),
            "glyph_swaps": {
                "copies": copies,
                "seed": seed,
                "rows": len(rows),
                "from": str(tokens_dir),
            },
        },
    )
    return len(rows)


def write_glyph_donors(
    data_dir: str | os.PathLike[str],
    tokens_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
) -> int:
    """Write `out_dir`: every row of `tokens_dir` with its glyph cells' codes from the glyph donor.

    The donor is the same subject at the same place on its `EmojiScenes.glyph_donor` colour, so
    in the written rows a subject's glyph cells carry one set of codes whatever the background:
    a seq2seq model learns the glyph from the subject and the position and the background cells
    from the colour, and can put a subject on a colour it never saw it with. The VQGAN must draw
    those codes on any background (train-vqgan's `background_donor` + `background_swap`). Same
    shard names, keys and captions as `tokens_dir`; returns the rows whose codes changed.
    """
    scenes, shards, manifest, scene_of, codes, _ = _read_encoded(data_dir, tokens_dir)
    cell = int(manifest["image_size"]) // int(manifest["grid_size"])
    key_of = {scene: key for key, scene in scene_of.items() if key in codes}
    mask_of = _mask_cache(scenes, cell)
    donor_codes: dict[str, np.ndarray] = {}
    missing = []
    for key in sorted(codes):
        subject, _, position = scene_of[key]
        donor = scenes.glyph_donor(subject, position)
        donor_key = key_of.get((subject, donor, position)) if donor else None
        if donor_key is None:
            missing.append(key)
            donor_codes[key] = codes[key]
            continue
        mask = mask_of(subject, position)
        donor_codes[key] = np.where(mask, codes[donor_key], codes[key])
    if missing:
        raise InputError(
            f"{len(missing)} encoded images (e.g. {missing[0]}) have no glyph donor in {tokens_dir}: "
            "it must hold every training scene of the emoji-scenes folder"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    changed = 0
    for info in shards:
        table = pq.read_table(info.path, columns=["key", "caption"]).to_pydict()
        rows = np.stack([donor_codes[k] for k in table["key"]])
        changed += int(sum(not np.array_equal(donor_codes[k], codes[k]) for k in table["key"]))
        _, meta = read_shard_meta(info.path)
        write_shard(
            out / info.path.name,
            table["key"],
            table["caption"],
            rows,
            n_embed=int(manifest["n_embed"]),
            metadata={**meta, "glyph_donor": True},
        )
    atomic_write_json(
        out / MANIFEST_NAME,
        {**manifest, "glyph_donor": {"rows_changed": changed, "from": str(tokens_dir)}},
    )
    return changed


def _mask_cache(scenes: EmojiScenes, cell: int) -> Callable[[str, str], np.ndarray]:
    """glyph_cell_mask, flattened, computed once per (subject, position)."""
    return functools.cache(
        lambda subject, position: glyph_cell_mask(scenes, subject, position, cell).reshape(-1)
    )


def _read_encoded(
    data_dir: str | os.PathLike[str], tokens_dir: str | os.PathLike[str]
) -> tuple[
    EmojiScenes,
    list[ShardInfo],
    dict[str, Any],
    dict[str, tuple[str, str, str]],
    dict[str, np.ndarray],
    dict[str, list[str]],
]:
    """An emoji-scenes encode: scenes, shards, manifest, each key's (subject, colour, position),
    its code grid and its captions."""
    data, tokens = Path(data_dir), Path(tokens_dir)
    scenes = EmojiScenes.from_folder(data)
    shards, manifest = list_shards(tokens)
    if not manifest.get("complete"):
        raise InputError(
            f"{tokens} is not a finished encode (its {MANIFEST_NAME} is missing or incomplete)"
        )
    meta_path = data / "metadata.jsonl"
    if not meta_path.is_file():
        raise InputError(
            f"{meta_path} is missing: {data} was not written by `dallemini dataset emoji`"
        )
    scene_of = {}
    for line in meta_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            scene_of[row["file"]] = (row["subject"], row["colour"], row["position"])
    # One code grid and the captions per image, then the images of each (subject, position).
    codes: dict[str, np.ndarray] = {}
    captions: dict[str, list[str]] = {}
    for info in shards:
        table = pq.read_table(info.path, columns=["key", "caption", "encoding"]).to_pydict()
        for key, caption, enc in zip(
            table["key"], table["caption"], table["encoding"], strict=True
        ):
            codes.setdefault(key, np.asarray(enc, np.int64))
            captions.setdefault(key, []).append(caption)
    missing = sorted(k for k in codes if k not in scene_of)
    if missing:
        raise InputError(
            f"{len(missing)} encoded images (e.g. {missing[0]}) are not in {meta_path}"
        )
    return scenes, shards, manifest, scene_of, codes, captions
