"""The emoji-scenes VQGAN trainer: the general VQGAN trainer plus background pairs and glyph swaps.

Each micro-batch also trains on `background_pairs` training scenes drawn twice, on two of their
training colours (with `background_donor`, the second is the subject's glyph donor colour). With
`background_swap` the decoder also decodes each pair's first scene from its own codes with the
glyph cells' codes taken from the second, against the first scene: it learns to take a glyph's
fringe colour from the background around it, whatever colour its codes were encoded on, so it
draws the donor-coded token rows (`donors.write_glyph_donors`) on any background.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..training.vqgan import ExtraRows, VQGANTrainConfig, VQGANTrainer
from .scenes import EmojiScenes, glyph_cells

__all__ = ["EmojiVQGANTrainConfig", "EmojiVQGANTrainer", "swap_glyph_cells"]


def swap_glyph_cells(z_q: Tensor, mask: Tensor) -> Tensor:
    """z_q with rows appended: each pair's first scene with its glyph cells from the second.

    z_q: [m + 2n, C, h, w], its last 2n rows the pairs (first scenes, then second); mask: [n, h, w].
    """
    n = mask.shape[0]
    first, second = z_q[-2 * n : -n], z_q[-n:]
    return torch.cat([z_q, torch.where(mask[:, None], second, first)])


@dataclass
class EmojiVQGANTrainConfig(VQGANTrainConfig):
    """VQGAN settings plus the emoji-scenes pairs (the data must be `dallemini dataset emoji` output)."""

    background_pairs: int = 0  # training scenes per micro-batch drawn on two training colours
    # Also decode each pair's first scene with the glyph cells' codes from the second colour.
    background_swap: bool = False
    background_swap_weight: float = 1.0  # loss weight of each swapped row (other rows count 1)
    background_donor: bool = False  # every pair's second colour is the subject's glyph donor

    def validate(self) -> None:
        super().validate()
        if self.background_pairs < 0:
            raise ConfigError(f"background_pairs must be >= 0, got {self.background_pairs}")
        if self.background_swap_weight < 0:
            raise ConfigError(
                f"background_swap_weight must be >= 0, got {self.background_swap_weight}"
            )
        for name in ("background_swap", "background_donor"):
            if getattr(self, name) and not self.background_pairs:
                raise ConfigError(f"{name} needs background_pairs > 0 (the pairs it works on)")


class EmojiVQGANTrainer(VQGANTrainer):
    """`VQGANTrainer` whose micro-batches also hold background pairs (and their glyph swaps)."""

    config_class = EmojiVQGANTrainConfig
    cfg: EmojiVQGANTrainConfig

    def setup(self) -> None:
        super().setup()
        self.scenes = self._emoji_scenes() if self.cfg.background_pairs else None

    def _emoji_scenes(self) -> EmojiScenes:
        """The emoji-scenes dataset that `data` was written from."""
        try:
            scenes = EmojiScenes.from_folder(self.cfg.data)
        except ConfigError as e:
            raise ConfigError(f"background_pairs needs emoji-scenes data: {e}") from e
        if scenes.resolution != self.resolution:
            raise ConfigError(
                f"background_pairs: the emoji scenes are {scenes.resolution} px but the VQGAN trains "
                f"at {self.resolution} px"
            )
        return scenes

    def extra_rows(self, micro: int) -> ExtraRows | None:
        """This micro-batch's pairs (first scenes, then second) and, with background_swap, their swaps.

        Drawn from (seed, update, rank, micro-batch) alone, so a resumed run sees the same pairs.
        """
        if self.scenes is None:
            return None
        cfg = self.cfg
        a, b, alpha, _ = self.scenes.background_pairs(
            cfg.background_pairs,
            cfg.seed,
            self.step,
            self.env.rank,
            micro,
            donor=cfg.background_donor,
        )
        pixels = torch.from_numpy(np.concatenate([a, b])).permute(0, 3, 1, 2).float() / 255.0
        pixels = pixels.to(self.device)
        if not cfg.background_swap:
            return ExtraRows(pixels)
        mask = torch.from_numpy(glyph_cells(alpha, self.vqgan.config.downsample_factor))
        return ExtraRows(
            pixels,
            decode=functools.partial(swap_glyph_cells, mask=mask.to(self.device)),
            targets=pixels[: cfg.background_pairs],
            weight=cfg.background_swap_weight,
        )
