"""Modules built from checkpoints: `checkpoints` turns any supported file into state dicts
(`load_parts`), and these functions build the model around them."""

from __future__ import annotations

import os

import torch

from ..checkpoints import load_parts
from ..checkpoints.native import load_into
from ..config import check_memory
from ..devices import resolve_device, resolve_dtype
from ..errors import CheckpointError
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
