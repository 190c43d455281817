"""Tests for the emoji-scenes dataset (dallemini.data.emoji) and its judge (dallemini.data.judge)."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dallemini.emoji.judge import EmojiJudge
from dallemini.emoji.scenes import (
    ASSETS_DIR,
    COLOURS,
    PALETTE,
    POSITIONS,
    SPLITS,
    TEMPLATES,
    EmojiScenes,
    Scene,
    find_font,
    load_subjects,
    write_emoji_dataset,
)
from dallemini.errors import ConfigError, InputError

CATEGORIES = {"Food & Drink", "Animals & Nature", "Travel & Places", "Objects", "Activities"}


@pytest.fixture(scope="module")
def scenes256() -> EmojiScenes:
    return EmojiScenes(256, 64)


def _sample(sc: EmojiScenes, n: int, seed: int = 0) -> list[Scene]:
    all_scenes = sc.scenes()
    idx = np.random.default_rng(seed).choice(len(all_scenes), n, replace=False)
    return [all_scenes[int(i)] for i in idx]


def _down_up(im: Image.Image) -> Image.Image:
    """VQGAN-like loss of detail: 2x box downsample, bilinear upsample."""
    r = im.size[0]
    return im.resize((r // 2, r // 2), Image.Resampling.BOX).resize(
        (r, r), Image.Resampling.BILINEAR
    )


# ---- packaged assets


def test_packaged_atlas_and_subjects() -> None:
    subjects = load_subjects()
    assert len(subjects) >= 256
    names = [s.name for s in subjects]
    assert len(set(names)) == len(names)
    aliases = [a for s in subjects for a in s.aliases]
    assert len(set(aliases)) == len(aliases) and not set(aliases) & set(names)
    assert not set(aliases) & (set(COLOURS) | set(POSITIONS))
    assert {s.category for s in subjects} == CATEGORIES
    assert all(n == n.lower() and n.isascii() and "_" not in n for n in names)
    # balanced: every category is represented in the 64-subject tier
    assert set(Counter(s.category for s in subjects[:64])) == CATEGORIES
    meta = json.loads((ASSETS_DIR / "emoji_subjects.json").read_text(encoding="utf-8"))
    assert meta["cell"] == 32 and meta["font"]["size"] == 109
    lic = (ASSETS_DIR / "LICENSE-emoji.txt").read_text(encoding="utf-8")
    assert "Open Font License" in lic and "Apache" in lic
    size = sum(p.stat().st_size for p in ASSETS_DIR.iterdir())
    assert size < 5_000_000


def test_tiers_are_prefixes_and_geometry() -> None:
    small, big = EmojiScenes(64, 64), EmojiScenes(256, 32)
    assert len(small.subjects) == 64 and len(big.subjects) == 256
    assert small.names == big.names[:64]
    assert len(EmojiScenes("all").subjects) == len(load_subjects())
    assert small.subject_size == 32 and big.subject_size == 16
    assert {x for x, _ in small.offsets.values()} == {0, 16, 32}
    assert {y for _, y in big.offsets.values()} == {0, 8, 16}
    assert small.offsets["top left"] == (0, 0) and small.offsets["bottom right"] == (32, 32)
    im = small.render("pizza" if "pizza" in small.names else small.names[0], "blue", "top left")
    assert im.mode == "RGB" and im.size == (64, 64)
    a = np.asarray(im)
    assert (a[32:, 32:] == PALETTE["blue"]).all()  # the other quadrants are pure background
    assert not (a[:32, :32] == PALETTE["blue"]).all()
    with pytest.raises(ConfigError):
        EmojiScenes(10_000)
    with pytest.raises(ConfigError):
        EmojiScenes(64, 32, subject_size=40)
    with pytest.raises(InputError):
        small.render(small.names[0], "pink", "center")
    with pytest.raises(InputError):
        small.subject("not an emoji at all")


# ---- determinism and splits


def test_determinism() -> None:
    a, b, c = EmojiScenes(64, 32, seed=3), EmojiScenes(64, 32, seed=3), EmojiScenes(64, 32, seed=4)
    for name in SPLITS:
        assert a.split(name) == b.split(name)
    assert a.split("heldout-triples") != c.split("heldout-triples")
    assert a.heldout_colour != c.heldout_colour
    caps_a = [
        cap
        for cap, _ in zip(a.pairs("train", epoch=1, captions_per_image=2), range(50), strict=False)
    ]
    caps_b = [
        cap
        for cap, _ in zip(b.pairs("train", epoch=1, captions_per_image=2), range(50), strict=False)
    ]
    assert caps_a == caps_b
    for sc in a.split("train")[:40]:
        assert a.render_scene(sc).tobytes() == b.render_scene(sc).tobytes()
        assert a.sample_captions(sc, 3, epoch=2) == b.sample_captions(sc, 3, epoch=2)
    # captions vary over epochs and seeds, but stay deterministic
    first = a.split("train")[:100]
    assert [a.caption(s) for s in first] != [a.caption(s, epoch=1) for s in first]
    assert [a.caption(s) for s in first] != [c.caption(s) for s in first]
    shuffled = [cap for cap, _ in a.pairs("heldout-colour", epoch=5, shuffle=True)]
    assert shuffled == [cap for cap, _ in b.pairs("heldout-colour", epoch=5, shuffle=True)]


@pytest.mark.parametrize("tier", [64, 256])
def test_split_properties(tier: int) -> None:
    sc = EmojiScenes(tier, 32, seed=0)
    n = len(sc.subjects)
    splits = {k: sc.split(k) for k in SPLITS}
    sets = {k: set(v) for k, v in splits.items()}
    assert all(len(v) == len(sets[k]) for k, v in splits.items())  # no duplicates
    assert not sets["train"] & sets["heldout-triples"]
    assert not sets["train"] & sets["heldout-colour"]
    assert not sets["heldout-triples"] & sets["heldout-colour"]
    assert sets["train"] | sets["heldout-triples"] | sets["heldout-colour"] == set(sc.scenes())
    assert len(sets["heldout-colour"]) == 9 * n
    assert len(sets["heldout-triples"]) == int(0.1 * 72 * n)
    assert len(sc) == len(splits["train"])
    # held-out colour pairs never appear in training, at any position; colours are balanced
    train_pairs = {(s.subject, s.colour) for s in sets["train"]}
    assert not {(s, c) for s, c in sc.heldout_colour.items()} & train_pairs
    assert set(Counter(sc.heldout_colour.values()).values()) == {n // 8}
    # every subject still trains with its 7 other colours and all 9 positions
    colours: dict[str, set[str]] = {name: set() for name in sc.names}
    positions: dict[str, set[str]] = {name: set() for name in sc.names}
    for s in splits["train"]:
        colours[s.subject].add(s.colour)
        positions[s.subject].add(s.position)
    assert {len(v) for v in colours.values()} == {7} and {len(v) for v in positions.values()} == {9}
    # the same subject gets the same held-out choices in every tier
    big, names = EmojiScenes(256, 32, seed=0), set(sc.names)
    for k in SPLITS:
        assert [s for s in big.split(k) if s.subject in names] == splits[k]


# ---- captions


def test_every_template_parses_back(scenes256: EmojiScenes) -> None:
    judge = EmojiJudge(scenes256)
    for i, subject in enumerate(scenes256.subjects):
        scene = Scene(subject.name, COLOURS[i % 8], POSITIONS[i % 9])
        want = (subject.name, scene.colour, scene.position)
        for name in (subject.name, *subject.aliases):
            caps = scenes256.captions(scene, name=name)
            assert len(caps) == len(TEMPLATES)
            for cap in caps:
                assert judge.parse_caption(cap) == want, cap
                assert judge.parse_caption("  " + cap.upper() + ". ") == want
    for sc in _sample(scenes256, 300):
        for cap in scenes256.sample_captions(sc, len(TEMPLATES)):
            assert judge.parse_caption(cap) == (sc.subject, sc.colour, sc.position)
            assert not any(f" {w} {sc.subject}" in cap for w in ("a", "an", "the"))
    assert "an orange" in scenes256.captions(Scene(scenes256.names[0], "orange", "top"))[0]
    with pytest.raises(InputError):
        judge.parse_caption("a photo of the moon")
    with pytest.raises(InputError):
        judge.parse_caption("zorgblat on a blue background, top left")


def test_low_contrast_pairs(scenes256: EmojiScenes) -> None:
    low = scenes256.low_contrast
    assert 0 < len(low) < 0.05 * len(scenes256.subjects) * len(COLOURS)
    subject, colour = sorted(low)[0]
    assert scenes256.is_low_contrast(Scene(subject, colour, "center"))


def test_background_pairs_redraw_training_scenes_on_another_colour() -> None:
    sc = EmojiScenes(64, 32)
    first, second, alpha, drawn = sc.background_pairs(24, 0, 7)
    assert first.shape == second.shape == (24, 32, 32, 3) and alpha.shape == (24, 32, 32)
    again = sc.background_pairs(24, 0, 7)
    assert np.array_equal(first, again.first) and np.array_equal(second, again.second)
    assert not np.array_equal(first, sc.background_pairs(24, 0, 8).first)
    for i, (a, b) in enumerate(drawn):
        # the same subject and place, another colour, both seen in training (held-out pairs stay unseen)
        assert (a.subject, a.position) == (b.subject, b.position) and a.colour != b.colour
        assert sc.split_of(a) == sc.split_of(b) == "train"
        assert np.array_equal(first[i], np.asarray(sc.render_scene(a)))
        assert np.array_equal(second[i], np.asarray(sc.render_scene(b)))
        # alpha marks the glyph: opaque pixels agree, clear ones are the two backgrounds
        solid, clear = alpha[i] == 1.0, alpha[i] == 0.0
        assert solid.any() and np.array_equal(first[i][solid], second[i][solid])
        assert (first[i][clear] == PALETTE[a.colour]).all()
        assert (second[i][clear] == PALETTE[b.colour]).all()
        x, y = sc.offsets[a.position]
        outside = np.ones((32, 32), bool)
        outside[y : y + sc.subject_size, x : x + sc.subject_size] = False
        assert (alpha[i][outside] == 0).all()


def test_glyph_donor_is_one_training_colour_the_glyph_stands_out_on() -> None:
    sc = EmojiScenes(64, 32)
    for subject in sc.names[:16]:
        for position in POSITIONS:
            donor = sc.glyph_donor(subject, position)
            assert donor is not None and donor != sc.heldout_colour[subject]
            assert sc.split_of(Scene(subject, donor, position)) == "train"
            assert donor == EmojiScenes(64, 32).glyph_donor(subject, position)  # deterministic
        # the first training colour in the subject's order: most glyph-to-background contrast
        glyph = sc._atlas[sc.subject(subject).index].astype(np.float32)  # full-size glyph

        def contrast(c: str, glyph: np.ndarray = glyph) -> float:
            d = np.linalg.norm(glyph[..., :3] - np.asarray(PALETTE[c], np.float32), axis=-1)
            return float((d * glyph[..., 3]).sum() / glyph[..., 3].sum())

        donor = sc.glyph_donor(subject, "center")
        seen = [c for c in PALETTE if sc.split_of(Scene(subject, c, "center")) == "train"]
        assert contrast(donor) >= max(contrast(c) for c in seen) - 1e-2
    with pytest.raises(InputError):
        sc.glyph_donor("no such subject", "center")


def test_background_pairs_with_donor_put_the_second_scene_on_the_glyph_donor() -> None:
    sc = EmojiScenes(64, 32)
    _, second, _, drawn = sc.background_pairs(24, 0, 7, donor=True)
    for i, (a, b) in enumerate(drawn):
        assert (a.subject, a.position) == (b.subject, b.position) and a.colour != b.colour
        assert b.colour == sc.glyph_donor(b.subject, b.position)
        assert sc.split_of(a) == sc.split_of(b) == "train"
        assert np.array_equal(second[i], np.asarray(sc.render_scene(b)))


# ---- the judge


@pytest.mark.parametrize(("tier", "resolution"), [(64, 64), (64, 32), (256, 64), (256, 32)])
def test_judge_scores_ground_truth(tier: int, resolution: int) -> None:
    sc = EmojiScenes(tier, resolution)
    judge = EmojiJudge(sc)
    sample = _sample(sc, 300, seed=tier + resolution)
    report = judge.evaluate((sc.caption(s), sc.render_scene(s)) for s in sample)
    assert report["n"] == 300 and report["all"] >= 0.99, report
    assert report["colour"] == 1.0 and report["subject_top5"] >= 0.99
    assert report["low_contrast"]["n"] + report["normal"]["n"] == 300
    # VQGAN-like degradation: 2x down/up sampling
    blurred = judge.evaluate((_down_up(sc.render_scene(s)), sc.caption(s)) for s in sample[:150])
    assert blurred["all"] >= 0.97, blurred


def test_judge_cheat_blob_is_near_chance(scenes256: EmojiScenes) -> None:
    sc = scenes256
    judge = EmojiJudge(sc)
    mean = np.mean([np.asarray(sc.glyph(s), np.float32) for s in sc.subjects], axis=0)
    blob = Image.fromarray(mean.round().astype(np.uint8), "RGBA")
    pairs = []
    for s in _sample(sc, 200, seed=7):
        im = Image.new("RGB", (sc.resolution,) * 2, PALETTE[s.colour])
        im.paste(blob, sc.offsets[s.position], blob)
        pairs.append((im, sc.caption(s)))
    report = judge.evaluate(pairs)
    assert report["colour"] == 1.0 and report["position"] >= 0.95
    assert report["subject"] <= 0.02 and report["all"] <= 0.02, report  # chance is 1/256
    # shuffled prompts: the right image judged against another scene's caption
    sample = _sample(sc, 100, seed=8)
    shuffled = judge.evaluate(
        (sc.render_scene(a), sc.caption(b)) for a, b in itertools.pairwise(sample)
    )
    assert shuffled["all"] <= 0.05


def test_judge_inputs_and_details(scenes256: EmojiScenes) -> None:
    judge = EmojiJudge(scenes256)
    s = Scene(scenes256.names[3], "purple", "bottom right")
    im = scenes256.render_scene(s)
    cap = scenes256.caption(s)
    r = judge.judge(im, cap)
    assert r["all_ok"] and r["subject_rank"] == 1 and r["target"]["subject"] == s.subject
    arr = np.asarray(im)
    assert judge.judge(arr, cap)["all_ok"]
    assert judge.judge(arr.transpose(2, 0, 1).astype(np.float32) / 255.0, cap)["all_ok"]
    assert judge.judge(im.resize((128, 128), Image.Resampling.NEAREST), cap)["all_ok"]
    wrong = judge.judge(im, scenes256.caption(Scene(scenes256.names[4], "yellow", "top left")))
    assert not (wrong["colour_ok"] or wrong["position_ok"] or wrong["subject_ok"])
    assert wrong["subject_rank"] > 1
    with pytest.raises(InputError):
        judge.judge("not an image", cap)  # type: ignore[arg-type]


@pytest.mark.skipif(find_font() is None, reason="Noto Color Emoji font not installed")
@pytest.mark.parametrize("resolution", [64, 32])
def test_font_rendering_matches_atlas(resolution: int) -> None:
    atlas = EmojiScenes(64, resolution)
    font = EmojiScenes(64, resolution, render_from_font=True)
    diffs = []
    for name in atlas.names:
        a = np.asarray(atlas.render(name, "blue", "center"), np.float32)
        b = np.asarray(font.render(name, "blue", "center"), np.float32)
        diffs.append(np.abs(a - b).mean())
    assert np.mean(diffs) < 3.0 and np.max(diffs) < 12.0, (np.mean(diffs), np.max(diffs))


# ---- the writer


def test_writer_round_trip(tmp_path: Path) -> None:
    counts = write_emoji_dataset(
        tmp_path, tier=3, resolution=32, splits="all", captions_per_image=3, seed=1
    )
    sc = EmojiScenes(3, 32, seed=1)
    assert counts == {k: len(sc.split(k)) for k in SPLITS}
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == sum(counts.values()) == 3 * 72
    judge = EmojiJudge.for_folder(tmp_path)
    assert judge.scenes.names == sc.names and judge.scenes.seed == 1
    assert EmojiScenes.from_folder(tmp_path).config() == sc.config()
    with pytest.raises(ConfigError, match="was not written by"):
        EmojiScenes.from_folder(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "emoji_scenes.json").write_text("{tier: ")
    with pytest.raises(ConfigError, match="not a valid emoji-scenes config"):
        EmojiScenes.from_folder(tmp_path / "broken")
    for i, row in enumerate(rows):
        assert row["file"] == f"{i:06d}.png"
        scene = Scene(row["subject"], row["colour"], row["position"])
        assert sc.split_of(scene) == row["split"]
        assert row["low_contrast"] == sc.is_low_contrast(scene)
        caps = (tmp_path / f"{i:06d}.txt").read_text(encoding="utf-8").splitlines()
        assert caps == row["captions"] and len(set(caps)) == 3
        assert all(
            judge.parse_caption(c) == (scene.subject, scene.colour, scene.position) for c in caps
        )
        if i % 37 == 0:
            with Image.open(tmp_path / row["file"]) as im:
                assert im.tobytes() == sc.render_scene(scene).tobytes()
    report = judge.evaluate_folder(tmp_path)
    assert report["n"] == len(rows) and report["all"] >= 0.99
