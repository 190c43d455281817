"""min-dalle's `detoker.pt` (the VQGAN decoder half) -> a decoder-only VQGAN config and state dict.

min-dalle names its modules like taming's, except the codebook, which sits at `embedding.weight`
instead of `quantize.embedding.weight`. Its architecture is hard-coded to f16_16384, fed [0, 1].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from ..config import VQGAN_PRESETS, VQGANConfig
from ..errors import CheckpointError
from .safe_load import load_torch_file
from .taming import check_state


def convert_min_dalle_vqgan(
    state: Mapping[str, Tensor], where: str = "detoker.pt"
) -> tuple[VQGANConfig, dict[str, Tensor]]:
    """Rename detoker.pt tensors to our keys; codebook size/width come from the embedding's shape."""
    out = {
        ("quantize.embedding.weight" if k == "embedding.weight" else k): v for k, v in state.items()
    }
    emb = out.get("quantize.embedding.weight")
    if not isinstance(emb, Tensor) or emb.dim() != 2:
        raise CheckpointError(
            f"{where}: no 2-d 'embedding.weight' codebook; not a min-dalle detoker.pt"
        )
    n_embed, embed_dim = (int(s) for s in emb.shape)
    cfg = dataclasses.replace(
        VQGAN_PRESETS["f16_16384"],
        n_embed=n_embed,
        embed_dim=embed_dim,
        decoder_only=True,
        pixel_range="0,1",
    )
    check_state(out, cfg, where)
    return cfg, out


def load_min_dalle_vqgan(path: str | Path) -> tuple[VQGANConfig, dict[str, Tensor]]:
    """Read min-dalle's detoker.pt into (decoder-only VQGANConfig, our state dict)."""
    return convert_min_dalle_vqgan(load_torch_file(path), where=str(path))
