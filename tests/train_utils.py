"""Helpers for the training tests: a small learnable encoded dataset written in the shard format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dallemini.config import VQGAN_PRESETS
from dallemini.data.shards import MANIFEST_NAME, write_shard

COLOURS = ["red", "green", "blue", "yellow"]
THINGS = ["cat", "dog", "car", "tree", "boat", "cake", "fish", "bird"]
GRID, N_EMBED = 4, 64  # the tiny VQGAN preset: 64x64 images -> 4x4 codes from 64 entries


def write_token_dataset(
    folder: Path, rows: int = 32, shards: int = 2, seed: int = 0, repeat: int = 1
) -> Path:
    """Captions 'a {colour} {thing}' whose 16 codes are a fixed function of (colour, thing) plus noise-free layout."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [(c, t) for c in COLOURS for t in THINGS][:rows]
    pairs = pairs * repeat
    per = -(-len(pairs) // shards)
    entries = []
    base = rng.integers(0, N_EMBED, size=(len(COLOURS), GRID * GRID))
    for s in range(shards):
        chunk = pairs[s * per : (s + 1) * per]
        if not chunk:
            break
        captions = [f"a {c} {t}" for c, t in chunk]
        codes = np.stack(
            [
                (base[COLOURS.index(c)] + 7 * THINGS.index(t) + np.arange(GRID * GRID)) % N_EMBED
                for c, t in chunk
            ]
        )
        name = f"part-{s:05d}.parquet"
        write_shard(
            folder / name, [f"{s}-{i}" for i in range(len(chunk))], captions, codes, n_embed=N_EMBED
        )
        entries.append({"file": name, "rows": len(chunk)})
    manifest = {
        "format": "dallemini-encoded",
        "version": 1,
        "grid_size": GRID,
        "n_embed": N_EMBED,
        "vqgan_fingerprint": VQGAN_PRESETS["tiny"].fingerprint(),
        "count": sum(e["rows"] for e in entries),
        "shards": entries,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def tiny_bart_overrides() -> dict[str, int]:
    """A DalleBart small enough that a training step takes milliseconds on 2 cores."""
    return {
        "d_model": 32,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "attention_heads": 2,
        "ffn_dim": 64,
        "max_text_length": 16,
    }
