"""Glyph-swapped token rows: the right cells come from the right donor, the originals stay, readers accept it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dallemini.config import VQGANConfig
from dallemini.data.emoji import EmojiScenes, write_emoji_dataset
from dallemini.data.encode import encode_dataset
from dallemini.data.glyph_swaps import glyph_cell_mask, write_glyph_donors, write_glyph_swaps
from dallemini.data.shards import ShardDataset, list_shards
from dallemini.data.sources import open_source
from dallemini.errors import ConfigError, InputError
from dallemini.models.vqgan import VQGAN

# 32 px scenes, 16 px subjects on a 4 px grid; an f=4 VQGAN gives 8x8 codes.
VQ = VQGANConfig(
    ch=8,
    ch_mult=(1, 1, 1),
    num_res_blocks=1,
    attn_resolutions=(),
    z_channels=8,
    embed_dim=8,
    n_embed=64,
    resolution=32,
    num_groups=4,
    local_encoder=True,
)


def _rows(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    out = {}
    for info in list_shards(folder)[0]:
        t = pq.read_table(info.path).to_pydict()
        for key, cap, enc in zip(t["key"], t["caption"], t["encoding"], strict=True):
            out[f"{key}|{cap}"] = (key, np.asarray(enc))
    return out


def _reader_rows(folder: Path) -> int:
    """Rows the trainer's shard reader gets out of `folder` in one epoch."""

    def tokenize(caps: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(len(caps), 4, dtype=torch.long), torch.ones(
            len(caps), 4, dtype=torch.long
        )

    batches = ShardDataset(folder, tokenize, 8, epochs=1, drop_last=False)
    return sum(len(b.codes) for b in batches)


def _vq() -> VQGAN:
    """A random local VQGAN whose entries are the data's latents, so its cells' codes vary."""
    torch.manual_seed(0)
    vq = VQGAN(VQ).eval()
    with torch.no_grad():
        images = torch.stack(
            [
                torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)
                for _, im in list(EmojiScenes(3, 32))[:64]
            ]
        )
        z = vq.encode_latents(images).permute(0, 2, 3, 1).reshape(-1, VQ.embed_dim)
        pick = torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[: VQ.n_embed]
        vq.quantize.embedding.weight.copy_(z[pick])
    return vq


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("swaps")
    data = root / "data"
    write_emoji_dataset(data, tier=3, resolution=32, splits="train", captions_per_image=2)
    encode_dataset(open_source(data), root / "tokens", _vq(), batch_size=64, progress=False)
    return data, root / "tokens"


def test_glyph_cell_mask_covers_the_glyph_only() -> None:
    sc = EmojiScenes(3, 32)
    mask = glyph_cell_mask(sc, sc.names[0], "bottom right", 4)
    assert (
        mask.shape == (8, 8) and mask[4:, 4:].any() and not mask[:4].any() and not mask[:, :4].any()
    )
    with pytest.raises(ConfigError, match="token cells"):
        glyph_cell_mask(sc, sc.names[0], "center", 5)


def test_write_glyph_swaps(encoded: tuple[Path, Path], tmp_path: Path) -> None:
    data, tokens = encoded
    sc = EmojiScenes.from_folder(data)
    meta = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    scene = {m["file"]: (m["subject"], m["colour"], m["position"]) for m in meta}
    added = write_glyph_swaps(data, tokens, tmp_path / "a", copies=2, seed=3)
    assert added == 2 * len(meta)
    before, after = _rows(tokens), _rows(tmp_path / "a")
    assert all(
        after[k][0] == before[k][0] and np.array_equal(after[k][1], before[k][1]) for k in before
    )
    codes = {key: enc for key, enc in before.values()}
    captions = {k.split("|")[1] for k in before}
    swapped = [(k, v) for k, v in after.items() if k not in before]
    assert len(swapped) == added
    changed = 0
    for k, (key, enc) in swapped:
        image, tag = key.split("#")
        assert tag in ("swap0", "swap1") and k.split("|")[1] in captions
        subject, colour, position = scene[image]
        inside = glyph_cell_mask(sc, subject, position, 4).reshape(-1)
        own = codes[image]
        assert np.array_equal(enc[~inside], own[~inside])  # the background keeps its own codes
        donors = [
            f for f, s in scene.items() if (s[0], s[2]) == (subject, position) and s[1] != colour
        ]
        assert any(np.array_equal(enc[inside], codes[d][inside]) for d in donors)
        changed += not np.array_equal(enc, own)
    assert changed > len(swapped) // 2
    # deterministic, and the trainer's reader takes the folder as it is
    write_glyph_swaps(data, tokens, tmp_path / "b", copies=2, seed=3)
    assert {k: v[1].tolist() for k, v in _rows(tmp_path / "b").items()} == {
        k: v[1].tolist() for k, v in after.items()
    }
    assert _reader_rows(tmp_path / "a") == len(after)


def test_write_glyph_swaps_refuses_bad_inputs(encoded: tuple[Path, Path], tmp_path: Path) -> None:
    data, tokens = encoded
    with pytest.raises(ConfigError, match="copies"):
        write_glyph_swaps(data, tokens, tmp_path / "a", copies=0)
    with pytest.raises(ConfigError, match="emoji_scenes"):
        write_glyph_swaps(tmp_path, tokens, tmp_path / "b")
    with pytest.raises(InputError):
        write_glyph_swaps(data, tmp_path, tmp_path / "c")


def test_write_glyph_donors(encoded: tuple[Path, Path], tmp_path: Path) -> None:
    data, tokens = encoded
    sc = EmojiScenes.from_folder(data)
    meta = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    scene = {m["file"]: (m["subject"], m["colour"], m["position"]) for m in meta}
    key_of = {v: k for k, v in scene.items()}
    changed = write_glyph_donors(data, tokens, tmp_path / "a")
    before, after = _rows(tokens), _rows(tmp_path / "a")
    assert before.keys() == after.keys()  # the same rows: keys and captions
    codes = {key: enc for key, enc in before.values()}
    glyph_codes: dict[tuple[str, str], set[bytes]] = {}
    n_changed = set()
    for key, enc in after.values():
        subject, colour, position = scene[key]
        donor = sc.glyph_donor(subject, position)
        inside = glyph_cell_mask(sc, subject, position, 4).reshape(-1)
        own, theirs = codes[key], codes[key_of[subject, donor, position]]
        assert np.array_equal(enc[~inside], own[~inside])  # the background keeps its own codes
        assert np.array_equal(enc[inside], theirs[inside])  # the glyph takes the donor's
        assert colour != donor or np.array_equal(enc, own)
        glyph_codes.setdefault((subject, position), set()).add(enc[inside].tobytes())
        if not np.array_equal(enc, own):
            n_changed.add(key)
    # one set of glyph codes per subject and place, whatever the colour
    assert all(len(v) == 1 for v in glyph_codes.values())
    assert changed == sum(1 for k, (key, _) in after.items() if key in n_changed) > 0
    manifest = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert manifest["glyph_donor"]["rows_changed"] == changed and manifest["complete"]
    assert _reader_rows(tmp_path / "a") == len(after)


def test_write_glyph_donors_needs_every_donor(encoded: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = encoded
    sc = EmojiScenes.from_folder(data)
    # an encode without the donor scenes cannot give the other rows their donor's codes
    part = tmp_path / "data"
    shutil.copytree(data, part)
    lines = (part / "metadata.jsonl").read_text().splitlines()
    kept = []
    for line in lines:
        m = json.loads(line)
        if m["colour"] == sc.glyph_donor(m["subject"], m["position"]):
            for f in part.glob(Path(m["file"]).stem + ".*"):
                f.unlink()
        else:
            kept.append(line)
    (part / "metadata.jsonl").write_text("\n".join(kept) + "\n")
    encode_dataset(open_source(part), tmp_path / "tokens", _vq(), batch_size=64, progress=False)
    with pytest.raises(InputError, match="glyph donor"):
        write_glyph_donors(part, tmp_path / "tokens", tmp_path / "out")
