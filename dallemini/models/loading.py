"""Modules built from checkpoints: `checkpoints` turns any supported file into state dicts
(`load_parts`), and these functions build the model around them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoints import hub, load_parts, native
from ..checkpoints.native import load_into
from ..config import check_memory
from ..devices import resolve_device, resolve_dtype
from ..errors import CheckpointError
from ..text import TextEncoder
from .clip import BuiltinClipScorer, HFClipScorer, ImageTextScorer, SmallClip, is_hf_clip_folder
from .vqgan import VQGAN


def load_vqgan(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> VQGAN:
    """The VQGAN of a model directory or of any VQGAN checkpoint (Flax folder, taming .ckpt, min-dalle)."""
    parts = load_parts(path)
    if parts.config.vqgan is None:
        raise CheckpointError(f"{path} holds no VQGAN")
    check_memory(parts.config.vqgan)
    vq = load_into(VQGAN(parts.config.vqgan), parts.states["vqgan"], f"{parts.source} (vqgan)")
    return vq.to(resolve_device(device), resolve_dtype(dtype)).eval()


def load_small_clip(path: str | os.PathLike[str]) -> SmallClip:
    """The `SmallClip` of a dallemini model directory (config `clip` section + clip.safetensors), shapes checked."""
    cfg = native.read_config(path)
    if cfg.clip is None:
        raise CheckpointError(
            f"{path}/config.json has no clip section: this model directory carries no built-in CLIP; "
            f"train one with `dallemini train-clip` or pass a Hugging Face CLIP folder"
        )
    state = native.read_weights(path, "clip")
    return native.load_into(
        SmallClip(cfg.clip), state, f"{Path(path) / native.WEIGHT_FILES['clip']}"
    )


def load_scorer(
    path: str | os.PathLike[str] | None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    text: TextEncoder | None = None,
) -> ImageTextScorer | None:
    """A scorer from a HF CLIP folder or a dallemini model dir with a built-in CLIP; None for None.

    `text` overrides the model directory's own tokenizer for the built-in CLIP.
    """
    if path is None:
        return None
    p = hub.local_path(path)  # a Hub name ("clip", "openai/clip-vit-base-patch32") or a path
    if not p.exists():
        raise CheckpointError(f"CLIP path {p} does not exist")
    if is_hf_clip_folder(p):
        return HFClipScorer.from_folder(p, device=device, dtype=dtype)

    if not native.is_model_dir(p):
        raise CheckpointError(
            f"{p} holds no CLIP: expected a Hugging Face CLIP folder (config.json with "
            f'"model_type": "clip") or a dallemini model directory with clip.safetensors'
        )
    model = load_small_clip(p)
    if text is None:
        if not (p / native.TOKENIZER_FILE).is_file():
            raise CheckpointError(f"{p} has no {native.TOKENIZER_FILE} for its built-in CLIP")
        text = TextEncoder.from_path(p / native.TOKENIZER_FILE, native.read_config(p).text)
    scorer = BuiltinClipScorer(model, text)
    return scorer.to(resolve_device(device), resolve_dtype(dtype))
