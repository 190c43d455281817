"""Glyph-donor token rows for emoji-scenes training: every scene's codes with its glyph cells' codes
taken from the same subject and place on the subject's glyph donor colour, under the scene's own caption.

A subject's edge cells blend with the background, so their VQGAN codes differ per colour; a
DalleBart trained on the plain rows learns which variant goes with which colour and, for a colour
never seen with the subject, draws a subject that was. Donor rows give a glyph one set of codes on
every background; they need a VQGAN whose decoder draws those codes on any colour (the emoji
VQGAN trainer's `background_donor` + `background_swap`).
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

from ..data.shards import (
    MANIFEST_NAME,
    ShardInfo,
    atomic_write_json,
    list_shards,
    read_shard_meta,
    write_shard,
)
from ..errors import InputError
from .scenes import EmojiScenes, glyph_cells

__all__ = ["glyph_cell_mask", "write_glyph_donors"]


def glyph_cell_mask(
    scenes: EmojiScenes, subject: str, position: str, cell: int, variant: int = 0
) -> np.ndarray:
    """[side/cell, side/cell] bool: the token cells that hold any pixel of the subject's glyph."""
    return glyph_cells(scenes.glyph_alpha(subject, position, variant), cell)


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
    those codes on any background (the emoji VQGAN trainer's `background_donor` + `background_swap`). Same
    shard names, keys and captions as `tokens_dir`; returns the rows whose codes changed.
    """
    scenes, shards, manifest, scene_of, codes, _ = _read_encoded(data_dir, tokens_dir)
    cell = int(manifest["image_size"]) // int(manifest["grid_size"])
    key_of = {scene: key for key, scene in scene_of.items() if key in codes}
    mask_of = _mask_cache(scenes, cell)
    donor_codes: dict[str, np.ndarray] = {}
    missing = []
    for key in sorted(codes):
        subject, _, position, variant = scene_of[key]
        donor = scenes.glyph_donor(subject, position)
        # an upright glyph takes the plain donor's glyph codes in every look, so it has one set of
        # codes whatever the look (a turned glyph takes its own look's)
        look = 0 if scenes.upright_glyph else variant
        donor_key = key_of.get((subject, donor, position, look)) if donor else None
        if donor_key is None:
            missing.append(key)
            donor_codes[key] = codes[key]
            continue
        mask = mask_of(subject, position, variant)
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


def _mask_cache(scenes: EmojiScenes, cell: int) -> Callable[[str, str, int], np.ndarray]:
    """glyph_cell_mask, flattened, computed once per (subject, position, variant)."""
    return functools.cache(
        lambda subject, position, variant: glyph_cell_mask(
            scenes, subject, position, cell, variant
        ).reshape(-1)
    )


def _read_encoded(
    data_dir: str | os.PathLike[str], tokens_dir: str | os.PathLike[str]
) -> tuple[
    EmojiScenes,
    list[ShardInfo],
    dict[str, Any],
    dict[str, tuple[str, str, str, int]],
    dict[str, np.ndarray],
    dict[str, list[str]],
]:
    """An emoji-scenes encode: scenes, shards, manifest, each key's (subject, colour, position,
    variant), its code grid and its captions."""
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
            scene = (row["subject"], row["colour"], row["position"], row.get("variant", 0))
            scene_of[row["file"]] = scene
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
