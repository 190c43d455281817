"""Randomly initialised model directories: starting points for training and fixtures for smoke tests."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from .checkpoints.native import save_model_dir
from .config import preset as preset_config
from .models.bart import DalleBart
from .models.vqgan import VQGAN
from .text import TextNormalizer, train_tokenizer

_COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "white", "black"]
_THINGS = [
    "apple",
    "pizza",
    "cat",
    "dog",
    "car",
    "house",
    "tree",
    "boat",
    "flower",
    "cake",
    "bird",
    "fish",
]


def seed_captions() -> list[str]:
    """A small built-in caption set to fit a tokenizer for a random model (no download needed).

    Demo vocabulary only: the tokenizer is byte-level BPE, so it encodes any prompt."""
    return [
        f"{thing} on a {colour} background"
        for thing, colour in itertools.product(_THINGS, _COLOURS)
    ]


def create_random_model(
    dst: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False
) -> Path:
    """Write a model directory with random weights and a tokenizer trained on seed_captions()."""
    cfg = preset_config(preset)
    assert cfg.bart is not None and cfg.vqgan is not None
    cfg.check_memory()
    torch.manual_seed(seed)
    bart = DalleBart(cfg.bart)
    vqgan = VQGAN(cfg.vqgan)
    tok = train_tokenizer(
        seed_captions(),
        vocab_size=min(cfg.bart.encoder_vocab_size, 4096),
        normalizer=TextNormalizer(),
    )
    return save_model_dir(
        dst,
        cfg,
        {"bart": bart.state_dict(), "vqgan": vqgan.state_dict()},
        tokenizer_json=tok.to_str(),
        overwrite=overwrite,
    )
