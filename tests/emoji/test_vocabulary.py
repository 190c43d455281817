"""What an emoji-scenes model directory says it knows: its training captions' words and examples."""

from __future__ import annotations

import json
from pathlib import Path

from dallemini.checkpoints.native import caption_words, read_examples, read_vocabulary
from dallemini.emoji.scenes import EmojiScenes, write_emoji_dataset
from dallemini.emoji.vocabulary import (
    candidate_scenes,
    model_examples,
    model_synonyms,
    training_captions,
    write_model_vocabulary,
    written_captions,
)
from dallemini.text import TextNormalizer


def test_the_vocabulary_is_the_words_of_the_written_training_captions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_emoji_dataset(data, tier=8, resolution=32, splits="train", captions_per_image=2)
    normalize = TextNormalizer()
    written = {
        w
        for f in data.glob("*.txt")
        for line in f.read_text().splitlines()
        for w in caption_words(normalize(line))
    }
    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((data / "emoji_scenes.json").read_text())
    write_model_vocabulary(model, config)
    assert read_vocabulary(model) == written
    examples = read_examples(model)
    assert examples is not None and examples.description is not None
    assert "one of 8" in examples.description and "9 places" in examples.description
    captions = set(training_captions(EmojiScenes.from_config(config), 2))
    assert examples.prompts and set(examples.prompts) <= captions
    assert sorted(written_captions(data)) == sorted(captions)  # what was written, read back
    other = tmp_path / "other"
    other.mkdir()
    write_model_vocabulary(other, config, captions=[" A cat, TOP-left"])
    assert read_vocabulary(other) == {"a", "cat", "top", "left"}


def test_examples_are_spread_and_only_those_the_model_draws_right() -> None:
    scenes = EmojiScenes(tier=64, resolution=32)
    plain = model_examples(scenes)
    assert len(plain.prompts) == 6
    firsts = [next(candidate_scenes(scenes, slot)) for slot in range(6)]
    assert len({s.subject for s in firsts}) == 6
    assert len({s.colour for s in firsts}) >= 4 and len({s.position for s in firsts}) >= 4
    assert all(scenes.split_of(s) == "train" for s in firsts)
    assert model_examples(scenes, accept=lambda caption: False).prompts == ()
    rejected = plain.prompts[0]
    picky = model_examples(scenes, accept=lambda caption: caption != rejected)
    assert rejected not in picky.prompts and picky.prompts[1:] == plain.prompts[1:]


def test_the_synonym_list_reads_synonyms_readings_and_colour_words() -> None:
    scenes = EmojiScenes(256, 64, version=3)
    phrases, keep = model_synonyms(scenes)
    assert keep == set(scenes.names)
    assert phrases["kitty"] == "cat" and phrases["puppy"] == "dog"  # readings no caption uses
    assert phrases["navy"] == "blue" and phrases["cobalt"] == "blue"  # held-out words too
    assert "lime" not in phrases and "lime" in keep  # a fruit here, not a colour
    for name, held in scenes.heldout_synonym.items():
        assert phrases[held] == name
    assert not set(phrases) & keep
