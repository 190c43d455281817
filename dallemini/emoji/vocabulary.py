"""What an emoji-scenes model knows, for its model directory: the words of its training captions
(vocabulary.txt), a line on what it draws with a few of those captions as example prompts
(examples.json; see `checkpoints.native`), and the everyday words it reads as its own
(synonyms.json: every subject's synonyms and the colour words; see `dallemini.synonyms`).

Both come from the dataset's own training-split captions (`EmojiScenes.sample_captions`, or the
captions of the written dataset folder when there is one), so they follow whatever the caption
templates are. Given the model, an example is kept only when the model
draws it right: `CHECK_IMAGES` images (seeds 0, 1, ...) all pass the judge. Nothing here draws from
a global random generator.

`python -m dallemini.emoji.vocabulary MODEL_DIR` writes the three files into a model directory from its
emoji_scenes.json, checking the examples with the model (how the built-in model's were made).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..checkpoints.native import ModelExamples, write_examples, write_vocabulary
from ..pipeline import TextToImage
from ..synonyms import write_synonyms
from ..text import TextNormalizer
from . import language
from .judge import EmojiJudge
from .scenes import COLOURS, POSITIONS, EmojiScenes, Scene

EXAMPLES = 6  # example prompts per model, each from its own part of the subject list
TRIES = 8  # subjects tried per example before it is left out
CHECK_IMAGES = 4  # images of an example the model must all draw right


def training_captions(
    scenes: EmojiScenes, captions_per_image: int = 1, epoch: int = 0
) -> Iterator[str]:
    """Every caption of the training split, as `write_emoji_dataset` writes them."""
    for scene in scenes.split("train"):
        yield from scenes.sample_captions(scene, captions_per_image, epoch)


def written_captions(folder: str | os.PathLike[str]) -> Iterator[str]:
    """Every caption of a dataset folder written by `write_emoji_dataset` (its metadata.jsonl)."""
    with open(Path(folder) / "metadata.jsonl", encoding="utf-8") as rows:
        for line in rows:
            if line.strip():
                yield from json.loads(line)["captions"]


def candidate_scenes(scenes: EmojiScenes, slot: int, n: int = EXAMPLES) -> Iterator[Scene]:
    """Training scenes for example `slot` of n, none of low contrast: subjects from the slot's part
    of the subject list on, each on the slot's colour and place (or the next ones in training)."""
    train = set(scenes.split("train"))
    names = scenes.names
    start = slot * len(names) // n
    for j in range(len(names)):
        subject = names[(start + j) % len(names)]
        for k in range(len(COLOURS) * len(POSITIONS)):
            colour = COLOURS[(slot + k) % len(COLOURS)]
            position = POSITIONS[(2 * slot + k // len(COLOURS)) % len(POSITIONS)]
            scene = Scene(subject, colour, position)
            if scene in train and not scenes.is_low_contrast(scene):
                yield scene
                break


def _or_list(items: Sequence[str]) -> str:
    """'a, b or c'."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def model_examples(
    scenes: EmojiScenes,
    accept: Callable[[str], bool] | None = None,
    n: int = EXAMPLES,
    epoch: int = 0,
) -> ModelExamples:
    """A line on what a model of these scenes draws and up to n training captions as prompts, each
    of another subject; with `accept`, only captions it accepts (up to TRIES subjects per prompt)."""
    prompts: list[str] = []
    subjects: list[str] = []
    for slot in range(min(n, len(scenes.names))):
        for _, scene in zip(range(TRIES), candidate_scenes(scenes, slot, n), strict=False):
            caption = scenes.sample_captions(scene, 1, epoch)[0]
            if scene.subject not in subjects and (accept is None or accept(caption)):
                prompts.append(caption)
                subjects.append(scene.subject)
                break
    named = ", ".join([*subjects[:3], "…"]) if subjects else "…"
    description = (
        f"An emoji (one of {len(scenes.names)}: {named}) on a plain {_or_list(COLOURS)} "
        f"background, at one of {len(POSITIONS)} places ({_or_list(POSITIONS)}). "
        "It knows nothing else."
    )
    return ModelExamples(description, tuple(prompts))


def drawn_right(pipe: TextToImage, scenes: EmojiScenes) -> Callable[[str], bool]:
    """A check that the model draws a caption right: CHECK_IMAGES images (seeds 0, 1, ...), reranked
    if it can, all judged right."""
    judge = EmojiJudge(scenes)

    def accept(caption: str) -> bool:
        images = pipe(caption, num_images=CHECK_IMAGES, seed=0)
        return all(judge.judge(g.image, caption)["all_ok"] for g in images)

    return accept


def model_synonyms(scenes: EmojiScenes) -> tuple[dict[str, str], frozenset[str]]:
    """The synonym list of a model of these scenes: each subject synonym (the held-out ones too)
    and everyday reading ("kitty") read as its subject's name, each colour word as its palette
    colour; subject names are kept."""
    names = frozenset(scenes.names)
    phrases = {w: name for name, words in scenes.synonyms.items() for w in words if w not in names}
    for name, words in language.load_readings().items():  # "kitty": words no caption uses
        if name in names:
            phrases.update((w, name) for w in words if w not in names)
    for word, colour in language.COLOUR_WORDS.items():
        if word != colour and word not in names:  # "lime" is a fruit here, not green
            phrases[word] = colour
    return phrases, names


def write_model_vocabulary(
    model_dir: str | os.PathLike[str],
    config: dict[str, Any],
    pipe: TextToImage | None = None,
    captions: Iterable[str] | None = None,
) -> None:
    """Write vocabulary.txt, synonyms.json and examples.json into a model directory from the emoji_scenes.json
    settings (`write_emoji_dataset`'s) of the dataset it was trained on, or from its written
    `captions` when given; with the model's `pipe`, only examples it draws right."""
    scenes = EmojiScenes.from_config(config)
    per_image = int(config.get("captions_per_image", 1))
    epoch = int(config.get("epoch", 0))
    normalize = TextNormalizer()
    if captions is None:
        captions = training_captions(scenes, per_image, epoch)
    write_vocabulary(model_dir, (normalize(c) for c in captions))
    phrases, keep = model_synonyms(scenes)
    about = "emoji subject synonyms and colour words, read as the words training captions used"
    write_synonyms(model_dir, phrases, keep, about)
    accept = drawn_right(pipe, scenes) if pipe is not None else None
    examples = model_examples(scenes, accept, epoch=epoch)
    write_examples(model_dir, examples.prompts, examples.description)


def main(argv: Sequence[str] | None = None) -> None:
    """Write vocabulary.txt, synonyms.json and examples.json into MODEL_DIR from its emoji_scenes.json."""
    parser = argparse.ArgumentParser(
        prog="python -m dallemini.emoji.vocabulary", description=__doc__
    )
    parser.add_argument("model_dir", type=Path, help="a model directory with emoji_scenes.json")
    parser.add_argument("--device", default="cpu", help="where the model checks the examples")
    args = parser.parse_args(argv)
    config_file = args.model_dir / "emoji_scenes.json"
    if not config_file.is_file():
        parser.error(f"{config_file} is missing: {args.model_dir} is not an emoji-scenes model")
    pipe = TextToImage.from_pretrained(args.model_dir, device=args.device)
    write_model_vocabulary(args.model_dir, json.loads(config_file.read_text("utf-8")), pipe)


if __name__ == "__main__":
    main()
