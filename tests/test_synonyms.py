from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dallemini.checkpoints.native import write_vocabulary
from dallemini.errors import CheckpointError
from dallemini.pipeline import TextToImage
from dallemini.random_model import create_random_model
from dallemini.synonyms import SYNONYMS_FILE, Synonyms, read_synonyms, write_synonyms


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random_model(tmp_path_factory.mktemp("syn") / "tiny", preset="tiny")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny models run fastest on one thread (conftest restores it)


def test_phrases_are_read_whole_words_longest_first_and_names_are_kept() -> None:
    s = Synonyms(
        {"kitty": "cat", "soccer": "soccer ball", "navy": "blue", "lime": "green"},
        frozenset({"soccer ball", "lime"}),
    )
    assert s.read(" a kitty on a navy background") == (
        " a cat on a blue background",
        [("kitty", "cat"), ("navy", "blue")],
    )
    assert s.read("soccer ball, soccer, kittycat") == (
        "soccer ball, soccer ball, kittycat",
        [("soccer", "soccer ball")],
    )
    assert s.read("a lime on lime") == ("a lime on lime", [])  # a kept name is never replaced
    assert Synonyms({}).read("kitty") == ("kitty", [])


def test_the_file_round_trips_and_a_malformed_one_is_refused(tmp_path: Path) -> None:
    assert read_synonyms(tmp_path) is None
    write_synonyms(tmp_path, {"Kitty": "Cat"}, ["cat"], "cats")
    s = read_synonyms(tmp_path)
    assert s is not None and s.phrases == {"kitty": "cat"} and s.keep == {"cat"}
    for bad in ("[1]", '{"phrases": {"a": 1}}', '{"phrases": {}, "keep": "x"}', "{"):
        (tmp_path / SYNONYMS_FILE).write_text(bad)
        with pytest.raises(CheckpointError, match=r"synonyms\.json"):
            read_synonyms(tmp_path)


def test_a_model_reads_its_synonyms_as_known_words(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "tiny"
    shutil.copytree(tiny_dir, d)
    write_vocabulary(d, [" a cat on a blue background, top left"])
    write_synonyms(d, {"kitty": "cat", "navy": "blue"}, ["cat"])
    pipe = TextToImage.from_pretrained(d, device="cpu")
    assert pipe.read_prompt("A Kitty on a NAVY background!") == (
        " a cat on a blue background",
        [("kitty", "cat"), ("navy", "blue")],
    )
    assert pipe.unknown_words("a kitty on a navy armchair") == ["armchair"]
    # the model is given the words it knows: the same tokens as the prompt that says them
    a = pipe("a kitty on a navy background", num_images=2, seed=3, rerank=False)
    b = pipe("a cat on a blue background", num_images=2, seed=3, rerank=False)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert a[0].prompt == "a kitty on a navy background"  # reported as the user wrote it
    (d / SYNONYMS_FILE).unlink()
    plain = TextToImage.from_pretrained(d, device="cpu")
    # without the list, "kitty" is a word the model never saw, and it reads the prompt without it
    assert plain.synonyms is None and plain.read_prompt("a kitty") == (" a", [])
    assert plain.read_prompt("a cat") == (" a cat", [])
    assert plain.unknown_words("a kitty on navy") == ["kitty", "navy"]
    assert json.loads(json.dumps(plain.read_prompt("x")[1])) == []
