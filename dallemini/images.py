"""Pixels to pictures: decoder output as PIL images, and images tiled into one grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import InputError


def to_pil(images: Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> RGB PIL images."""
    arr = (
        (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in arr]


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equally sized images into one picture, row-major, `cols` per row (default: near-square)."""
    if not images:
        raise InputError("no images to put in a grid")
    n = len(images)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = (n + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic, antialiased when shrinking), then crop the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))
