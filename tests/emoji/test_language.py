"""Plain-language captions (dataset version 2): what they say, how the judge reads them, the held-out sets."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from dallemini.emoji import language
from dallemini.emoji.evaluation import distinct_images, variety
from dallemini.emoji.judge import EmojiJudge
from dallemini.emoji.scenes import (
    CAPTION_SPLITS,
    COLOURS,
    LOOK_MIN_DIFFERENCE,
    PALETTE,
    EmojiScenes,
    look_shades,
)
from dallemini.errors import ConfigError


@pytest.fixture(scope="module")
def plain() -> EmojiScenes:
    return EmojiScenes(64, 64, version=2)


def test_version_1_config_is_unchanged_and_version_2_is_recorded(plain: EmojiScenes) -> None:
    assert "version" not in EmojiScenes(64, 64).config()  # version 1 datasets read as before
    assert plain.config()["version"] == 2
    assert EmojiScenes.from_config(json.loads(json.dumps(plain.config()))).version == 2
    with pytest.raises(ConfigError, match="version"):
        EmojiScenes(64, 64, version=5)


def test_every_caption_reads_back_to_its_scene(plain: EmojiScenes) -> None:
    judge = EmojiJudge(plain)
    for scene in plain.split("train")[::7]:
        for caption in plain.sample_captions(scene, 4, epoch=1):
            assert judge.parse_caption(caption) == (scene.subject, scene.colour, scene.position), (
                caption
            )
    for split in CAPTION_SPLITS:
        for scene in plain.split(split):
            caption = plain.eval_caption(scene, split)
            assert judge.parse_caption(caption) == (scene.subject, scene.colour, scene.position), (
                caption
            )


def test_plain_language_covers_synonyms_colour_words_and_places(plain: EmojiScenes) -> None:
    captions = [c for sc in plain.split("train") for c in plain.sample_captions(sc, 3)]
    text = "\n".join(captions)
    for words in (
        ("piano", "ladybug", "tie"),
        ("navy", "crimson", "gold"),
        ("upper left", "lower right"),
    ):
        assert any(w in text for w in words), words
    assert any(c.startswith(("a photo of", "a picture of", "a drawing of")) for c in captions)
    # no caption is a held-out sentence frame
    starts = ("there is ", "a red scene showing")
    assert not any(c.startswith(starts) for c in captions)
    # the same call gives the same captions (data is reproducible)
    sc = plain.split("train")[0]
    assert plain.sample_captions(sc, 5, epoch=3) == plain.sample_captions(sc, 5, epoch=3)


def test_caption_splits_caption_the_heldout_triples(plain: EmojiScenes) -> None:
    held = plain.split("heldout-triples")
    frames = [plain.eval_caption(sc, "heldout-frames") for sc in held]
    synonyms = [plain.eval_caption(sc, "heldout-synonyms") for sc in held]
    assert plain.split("heldout-frames") == held == plain.split("heldout-synonyms")
    new, known = (
        language.CaptionParser(language.HELDOUT_FRAMES),
        language.CaptionParser(language.FRAMES),
    )
    assert all(new.parse(c) and not known.parse(c) for c in frames)
    canon = {c for c in language.COLOUR_WORDS if language.COLOUR_WORDS[c] == c}
    for caption, scene in zip(synonyms, held, strict=True):  # never the palette name itself
        words = [
            w for w, c in language.COLOUR_WORDS.items() if c == scene.colour and w not in canon
        ]
        assert any(w in caption for w in words), caption


# Usual RGB values (CSS names where there is one) of the colour words beyond the palette's names.
WORD_RGB = {
    "crimson": (220, 20, 60),
    "scarlet": (255, 36, 0),
    "cherry": (222, 49, 99),
    "tangerine": (242, 133, 0),
    "pumpkin": (255, 117, 24),
    "saffron": (244, 196, 48),
    "gold": (255, 215, 0),
    "lemon": (255, 247, 0),
    "emerald": (80, 200, 120),
    "lime": (0, 255, 0),
    "forest green": (34, 139, 34),
    "navy": (0, 0, 128),
    "cobalt": (0, 71, 171),
    "royal blue": (65, 105, 225),
    "violet": (138, 43, 226),
    "magenta": (255, 0, 255),
    "snow white": (255, 250, 250),
    "ivory": (255, 255, 240),
    "jet black": (52, 52, 52),
}


def test_colour_words_name_their_nearest_palette_colour() -> None:
    extra = {w for w, c in language.COLOUR_WORDS.items() if w != c}
    assert extra == set(WORD_RGB)
    for word, rgb in WORD_RGB.items():
        distance = {
            c: sum((a - b) ** 2 for a, b in zip(v, rgb, strict=True)) for c, v in PALETTE.items()
        }
        assert language.COLOUR_WORDS[word] == min(distance, key=distance.__getitem__), word


def test_subject_synonyms_never_name_another_subject() -> None:
    scenes = EmojiScenes("all", 64)
    owner: dict[str, str] = {}
    for subject in scenes.subjects:
        owner[subject.name] = subject.name
    for subject in scenes.subjects:
        for word in scenes.synonyms[subject.name]:
            assert owner.setdefault(word, subject.name) == subject.name, word
            assert not language.names_place_or_colour(word), word  # not "lower left crayon"


def test_distinct_images_counts_images_that_really_differ() -> None:
    a = Image.new("RGB", (8, 8), (10, 10, 10))
    b = Image.new("RGB", (8, 8), (12, 12, 12))  # 2 levels apart: the same image
    c = Image.new("RGB", (8, 8), (30, 10, 10))
    assert distinct_images([a, a, b, a]) == 1
    assert distinct_images([a, c, b, Image.fromarray(np.zeros((8, 8, 3), np.uint8) + 200)]) == 3
    assert variety([[a, a, a, a], [a, c, b, c]]) == {"distinct_mean": 1.5, "share_at_least_3": 0.0}


def test_variants_turn_the_glyph_and_shade_the_background_of_training_scenes(tmp_path) -> None:
    from dallemini.emoji.scenes import write_emoji_dataset

    scenes = EmojiScenes(8, 32, version=2, variants=3)
    scene = scenes.split("train")[0]
    plain = np.asarray(EmojiScenes(8, 32).render_scene(scene))
    assert np.array_equal(np.asarray(scenes.render_scene(scene)), plain)  # variant 0 is the scene
    drawn = [np.asarray(scenes.render_scene(scene, v)) for v in range(1, 3)]
    assert all(not np.array_equal(d, plain) for d in drawn)
    judge = EmojiJudge(scenes)
    caption = scenes.sample_captions(scene)[0]
    assert all(judge.judge(d, caption)["colour_ok"] for d in drawn)
    counts = write_emoji_dataset(
        tmp_path, 8, 32, ("train", "heldout-triples"), 1, version=2, variants=3
    )
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert counts["train"] == len(train) == 3 * len(scenes.split("train"))
    assert {r["variant"] for r in train} == {0, 1, 2}
    assert {r.get("variant", 0) for r in rows if r["split"] != "train"} == {0}
    assert EmojiScenes.from_folder(tmp_path).variants == 3


def test_shade_looks_are_distinct_images_of_the_same_colour() -> None:
    for colour in COLOURS:
        rgbs = [np.clip(np.asarray(PALETTE[colour]) + s, 0, 255) for s in look_shades(colour, 8)]
        assert len(rgbs) >= 7 and look_shades(colour, 8)[0] == 0
        for i, a in enumerate(rgbs):
            assert all(np.abs(a - b).mean() >= LOOK_MIN_DIFFERENCE for b in rgbs[:i]), colour
    scenes = EmojiScenes(16, 64, version=2, variants=8, looks="shade")
    judge = EmojiJudge(scenes)
    for scene in scenes.split("train")[::97]:
        drawn = [scenes.render_scene(scene, v) for v in range(8)]
        expected = len(look_shades(scene.colour, 8))
        assert distinct_images(drawn) == expected, scene
        alpha = scenes.glyph_alpha(scene.subject, scene.position, 0)
        assert all(
            np.array_equal(scenes.glyph_alpha(scene.subject, scene.position, v), alpha)
            for v in range(8)
        )  # the glyph stays upright: only the background changes
        caption = scenes.sample_captions(scene)[0]
        assert all(judge.judge(d, caption)["colour_ok"] for d in drawn)
    assert EmojiScenes.from_config(scenes.config()).looks == "shade"
    with pytest.raises(ConfigError, match="looks"):
        EmojiScenes(16, 64, looks="wobbly")


@pytest.fixture(scope="module", params=[3, 4])
def free(request) -> EmojiScenes:
    return EmojiScenes(256, 64, version=request.param)


def test_version_4_captions_are_frames_without_heldout_words() -> None:
    scenes = EmojiScenes(256, 64, version=4)
    parser = language.CaptionParser(language.FRAMES)
    for scene in scenes.split("train")[::53]:
        assert all(parser.parse(c) for c in scenes.sample_captions(scene, 3))


def test_version_3_training_captions_hold_no_heldout_word(free: EmojiScenes) -> None:
    heldout_frame_words = set()
    for frame in language.HELDOUT_FRAMES:
        heldout_frame_words |= set(re.sub(r"\{\w+\}", " ", frame).split())
    joined = " ".join((*language.COLOUR_PARTS, *language.JOINERS, *language.FILLERS))
    # the frame words training never says (the others, "the", "of", ..., are everyday words)
    for word in ("there", "is", "you", "can", "see", "backdrop", "canvas", "placed", "showing"):
        assert word in heldout_frame_words and word not in joined.split(), word
    assert len(set(free.heldout_synonym.values())) > 60
    for scene in free.split("train")[::37]:
        for caption in free.sample_captions(scene, 3):
            padded = f" {caption} ".replace(scene.subject, "")  # "japan" in "map of japan"
            own = free.heldout_synonym.get(scene.subject)
            assert own is None or f" {own} " not in padded, caption
            assert not any(f" {w} " in padded for w in language.HELDOUT_COLOUR_WORDS), caption
            assert not any(f.split("{")[0] and f in caption for f in language.HELDOUT_FRAMES)


def test_version_3_heldout_synonyms_use_heldout_words(free: EmojiScenes) -> None:
    scenes = free.split("heldout-synonyms")
    assert scenes and all(s.subject in free.heldout_synonym for s in scenes)
    for scene in scenes[:50]:
        caption = free.eval_caption(scene, "heldout-synonyms")
        assert f" {free.heldout_synonym[scene.subject]} " in f" {caption} ".replace(",", " ")
        assert any(w in caption for w in language.HELDOUT_COLOUR_WORDS), caption


def test_version_3_word_order_varies_and_judge_reads_first_caption() -> None:
    free = EmojiScenes(256, 64, version=3)
    scene = free.split("train")[0]
    captions = [c for e in range(20) for c in free.sample_captions(scene, 3, e)]
    assert len(set(captions)) > 50
    starts = {c.split()[0] for c in captions}
    assert len(starts) > 8  # the subject, the colour or the place comes first
    parser = language.CaptionParser(language.FRAMES)
    assert all(parser.parse(free.sample_captions(s, 3)[0]) for s in free.split("train")[:40])


def test_version_2_captions_never_use_version_3_colour_words(plain: EmojiScenes) -> None:
    for scene in plain.split("train")[:300]:
        for caption in plain.sample_captions(scene, 3):
            assert not any(w in caption for w in language.V3_COLOUR_WORDS), caption


def test_tile_looks_shade_the_background_and_keep_the_glyph_square() -> None:
    scenes = EmojiScenes(16, 64, version=2, variants=8, looks="tile")
    judge = EmojiJudge(scenes)
    side = scenes.subject_size
    for scene in scenes.split("train")[::97]:
        drawn = [np.asarray(scenes.render_scene(scene, v)) for v in range(8)]
        x, y = scenes.offsets[scene.position]
        square = [d[y : y + side, x : x + side] for d in drawn]
        assert all(np.array_equal(s, square[0]) for s in square)  # the glyph's cells never change
        images = [Image.fromarray(d) for d in drawn]
        assert distinct_images(images) == len(look_shades(scene.colour, 8)), scene
        caption = scenes.sample_captions(scene)[0]
        for im in images:
            verdict = judge.judge(im, caption)
            assert verdict["colour_ok"] and verdict["position_ok"] and verdict["subject_ok"], scene
    assert EmojiScenes.from_config(scenes.config()).looks == "tile"
