"""The emoji VQGAN trainer: background pairs, glyph swaps and glyph donors as extra rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from dallemini.checkpoints.native import save_model_dir
from dallemini.config import PipelineConfig, VQGANConfig
from dallemini.emoji.scenes import EmojiScenes, write_emoji_dataset
from dallemini.emoji.training import EmojiVQGANTrainConfig, EmojiVQGANTrainer, swap_glyph_cells
from dallemini.errors import ConfigError
from dallemini.models.vqgan import VQGAN
from dallemini.pipeline import load_vqgan
from dallemini.training.settings import load_config
from tests.training.test_vqgan import RES, TINY_VQGAN, _cfg, write_images


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _emoji_data(folder: Path) -> Path:
    write_emoji_dataset(folder, tier=8, resolution=RES, splits="train", captions_per_image=1)
    return folder


def _emoji_cfg(data: Path, out: Path, **kw: Any) -> EmojiVQGANTrainConfig:
    settings = vars(_cfg(data, out)).copy()
    settings.update(kw)
    return load_config(EmojiVQGANTrainConfig, None, settings)


def test_background_pairs_are_extra_rows(tmp_path: Path) -> None:
    data = _emoji_data(tmp_path / "emoji")
    t = EmojiVQGANTrainer(_emoji_cfg(data, tmp_path / "a", background_pairs=4))
    assert t.train_step()["n_images"] == 8 + 2 * 4
    # the pairs need the emoji-scenes config next to the images
    with pytest.raises(ConfigError, match=r"emoji_scenes\.json"):
        EmojiVQGANTrainer(
            _emoji_cfg(write_images(tmp_path / "imgs"), tmp_path / "c", background_pairs=2)
        )
    with pytest.raises(ConfigError, match="background_pairs"):
        _emoji_cfg(data, tmp_path / "d", background_pairs=-1)


def test_swap_glyph_cells_appends_recombined_rows() -> None:
    z = torch.arange(5 * 2 * 3 * 3, dtype=torch.float32).reshape(5, 2, 3, 3)  # 1 image + 2 pairs
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[0, 1, 1] = True
    out = swap_glyph_cells(z, mask)
    assert out.shape == (7, 2, 3, 3) and torch.equal(out[:5], z)
    # pair 0: the first scene (row 1) with its masked cell from the second scene (row 3)
    want = z[1].clone()
    want[:, 1, 1] = z[3, :, 1, 1]
    assert torch.equal(out[5], want) and torch.equal(out[6], z[2])  # pair 1: nothing masked


def test_background_swap_decodes_recombined_pairs_against_the_first_scene(tmp_path: Path) -> None:
    data = _emoji_data(tmp_path / "emoji")
    t = EmojiVQGANTrainer(
        _emoji_cfg(data, tmp_path / "a", background_pairs=3, background_swap=True)
    )
    seen: list[tuple[Tensor, Tensor]] = []
    generator_loss = t.loss.generator_loss

    weights_seen: list[Tensor | None] = []

    def spy(targets: Tensor, recon: Tensor, *rest: Any) -> Any:
        seen.append((targets.detach(), recon.detach()))
        weights_seen.append(rest[-1])
        return generator_loss(targets, recon, *rest)

    t.loss.generator_loss = spy  # type: ignore[method-assign]
    logs = t.train_step()
    targets, recon = seen[0]
    assert logs["n_images"] == 8 + 2 * 3 and targets.shape == recon.shape
    assert targets.shape[0] == 8 + 2 * 3 + 3  # and 3 recombined pairs decoded
    # the last 3 targets are the pairs' first scenes (rows 8..10)
    assert torch.equal(targets[-3:], targets[8:11])
    assert weights_seen == [None]
    # background_swap_weight weighs the swapped rows in the reconstruction loss
    t.cfg.background_swap_weight = 3.0
    t.train_step()
    assert weights_seen[1] is not None and weights_seen[1].tolist() == [1.0] * 14 + [3.0] * 3
    # outside a training step the decoder decodes what it is given
    assert t.vqgan(targets[:2])[0].shape[0] == 2


def test_background_donor_swaps_in_the_glyph_donors_codes(tmp_path: Path) -> None:
    data = _emoji_data(tmp_path / "emoji")
    kw: dict[str, Any] = dict(background_pairs=3, background_swap=True)
    t = EmojiVQGANTrainer(_emoji_cfg(data, tmp_path / "a", background_donor=True, **kw))
    scenes = EmojiScenes.from_folder(data)
    extra = t.extra_rows(0)
    assert extra is not None
    want = scenes.background_pairs(3, t.cfg.seed, t.step, 0, 0, donor=True)
    expect = torch.from_numpy(np.concatenate(want[:2])).permute(0, 3, 1, 2) / 255
    assert torch.equal(extra.images, expect)
    assert all(b.colour == scenes.glyph_donor(b.subject, b.position) for _, b in want.scenes)
    assert t.train_step()["n_images"] == 8 + 2 * 3
    for name in ("background_donor", "background_swap"):
        with pytest.raises(ConfigError, match=f"{name} needs background_pairs"):
            _emoji_cfg(data, tmp_path / "b", **{name: True})


def test_decoder_only_finetune_with_swaps_keeps_every_code(tmp_path: Path) -> None:
    data = _emoji_data(tmp_path / "emoji")
    torch.manual_seed(2)
    vq_cfg = VQGANConfig.from_dict({**VQGANConfig().to_dict(), **TINY_VQGAN})
    start = VQGAN(vq_cfg).state_dict()
    model_dir = save_model_dir(tmp_path / "start", PipelineConfig(vqgan=vq_cfg), {"vqgan": start})
    cfg = _emoji_cfg(
        data,
        tmp_path / "run",
        vqgan={},
        model=str(model_dir),
        steps=4,
        disc_start=100,
        train_encoder=False,
        background_pairs=2,
        background_swap=True,
        background_donor=True,
    )
    EmojiVQGANTrainer(cfg).fit()
    out = load_vqgan(tmp_path / "run" / "model").state_dict()
    fixed = ("encoder.", "quant_conv.", "quantize.")
    assert all(torch.equal(v, start[k]) for k, v in out.items() if k.startswith(fixed))
    assert any(not torch.equal(v, start[k]) for k, v in out.items() if k.startswith("decoder."))
