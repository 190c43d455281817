"""Plain-language captions for emoji scenes (dataset versions 2 and 3) and the parser the judge reads them with.

A caption is a sentence frame filled with a subject phrase (the name, a synonym, an article, "a
photo of ..."), a colour word (a palette name or a common word for one: "navy" is blue) and a
place (a position name, or a phrase such as "in the upper left corner"). Training captions use
`FRAMES`; `HELDOUT_FRAMES` never appear in training and measure how well a model reads new
sentences. Every word list here is data: a colour word names the palette colour nearest to it,
a place phrase names one of the 9 positions.

Version 3 adds free word order: a caption is also its three parts (subject, colour, place) in any
order, joined by varied words, with filler words ("cute", "please draw") and dropped articles
(`compose`), so that a model learns to find the parts in sentences it never saw. Its training
captions never use `HELDOUT_COLOUR_WORDS`, a share of the subject synonyms (`EmojiScenes.heldout_synonym`),
or the words of `HELDOUT_FRAMES`.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import numpy as np

ASSETS_DIR = Path(__file__).with_name("assets")
SYNONYMS_FILE = "emoji_synonyms.json"

# Words for the palette colours beyond their names: each word's usual RGB value is nearest to its
# palette colour (tests/emoji/test_language.py checks it).
COLOUR_WORDS: dict[str, str] = {
    "red": "red",
    "crimson": "red",
    "scarlet": "red",
    "cherry": "red",
    "orange": "orange",
    "tangerine": "orange",
    "yellow": "yellow",
    "gold": "yellow",
    "lemon": "yellow",
    "green": "green",
    "emerald": "green",
    "lime": "green",
    "forest green": "green",
    "blue": "blue",
    "navy": "blue",
    "cobalt": "blue",
    "royal blue": "blue",
    "purple": "purple",
    "violet": "purple",
    "magenta": "purple",
    "white": "white",
    "snow white": "white",
    "ivory": "white",
    "black": "black",
    "jet black": "black",
    # version 3 on (version 2 captions never use these two)
    "pumpkin": "orange",
    "saffron": "yellow",
}
V3_COLOUR_WORDS = frozenset(("pumpkin", "saffron"))

# One colour word per palette colour that version 3's training captions never use (heldout-synonyms);
# none of them names an emoji ("lime" and "lemon" do).
HELDOUT_COLOUR_WORDS: frozenset[str] = frozenset(
    ("scarlet", "pumpkin", "saffron", "emerald", "cobalt", "violet", "ivory", "jet black")
)

# Phrases for the 9 positions, used where a frame says {where} ("panda {where} on a blue background").
PLACE_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": (
        "in the top left",
        "in the top left corner",
        "in the upper left",
        "in the upper left corner",
        "at the top left",
    ),
    "top": ("at the top", "in the top middle", "at the top centre", "at the top center"),
    "top right": (
        "in the top right",
        "in the top right corner",
        "in the upper right",
        "in the upper right corner",
        "at the top right",
    ),
    "left": ("on the left", "at the left", "on the left side", "in the middle on the left"),
    "center": ("in the center", "in the centre", "in the middle", "at the centre"),
    "right": ("on the right", "at the right", "on the right side", "in the middle on the right"),
    "bottom left": (
        "in the bottom left",
        "in the bottom left corner",
        "in the lower left",
        "in the lower left corner",
        "at the bottom left",
    ),
    "bottom": (
        "at the bottom",
        "in the bottom middle",
        "at the bottom centre",
        "at the bottom center",
    ),
    "bottom right": (
        "in the bottom right",
        "in the bottom right corner",
        "in the lower right",
        "in the lower right corner",
        "at the bottom right",
    ),
}
# Short names of the positions, used where a frame says {position} ("panda, upper left, blue background").
POSITION_WORDS: dict[str, str] = {
    **{p: p for p in PLACE_PHRASES},
    "upper left": "top left",
    "upper right": "top right",
    "lower left": "bottom left",
    "lower right": "bottom right",
    "middle": "center",
    "centre": "center",
}

# Ways to name a subject in front of its name ("" = the bare name).
SUBJECT_PREFIXES: tuple[str, ...] = (
    "",
    "{article}",
    "{article}",
    "the",
    "a photo of {article}",
    "a picture of {article}",
    "a drawing of {article}",
    "an image of {article}",
    "an emoji of {article}",
)

# {subject}: the subject phrase; {colour}: a colour word; {a} its article; {where}: a place phrase;
# {position}: a position word.
FRAMES: tuple[str, ...] = (
    "{subject} on {a} {colour} background, {position}",
    "{subject} on {a} {colour} background {where}",
    "{a} {colour} background with {subject} {where}",
    "{subject} {where} on {a} {colour} background",
    "{subject} {where}, {colour} background",
    "{colour} background, {subject} {where}",
    "{subject}, {position}, {colour} background",
    "{position}: {subject} on {colour}",
    "{a} {colour} picture with {subject} {where}",
    "{subject} on {colour} {where}",
    "{a} {colour} image, {subject} {where}",
    "{subject} against {a} {colour} background {where}",
)
HELDOUT_FRAMES: tuple[str, ...] = (
    "there is {subject} {where} and the background is {colour}",
    "{where} you can see {subject} over {a} {colour} backdrop",
    "{a} {colour} scene showing {subject} {where}",
    "{subject} placed {where} of {a} {colour} canvas",
)


# Version 3's free word order: ways to say the colour part, words that join two parts, and filler
# words with no meaning for the picture. None of them is a word of HELDOUT_FRAMES (tested).
COLOUR_PARTS: tuple[str, ...] = (
    "on {a} {colour} background",
    "{a} {colour} background",
    "{colour} background",
    "with {a} {colour} background",
    "against {a} {colour} background",
    "on {colour}",
    "in front of {a} {colour} background",
    "background {colour}",
)
JOINERS: tuple[str, ...] = (" ", ", ", " , ", " and ", " with ", "; ", " - ")
FILLERS: tuple[str, ...] = (
    "cute",
    "simple",
    "flat",
    "small",
    "little",
    "big",
    "nice",
    "cartoon",
    "icon",
    "emoji",
    "style",
    "digital art",
    "clip art",
    "vector art",
    "minimal",
    "detailed",
    "high quality",
    "4k",
    "please",
    "draw",
    "make",
    "create",
    "generate",
    "i want",
    "render",
    "one",
    "single",
    "colorful",
    "bright",
    "pretty",
)
# Of the subjects with synonyms, about this share keeps one out of version 3's training captions.
HELDOUT_SYNONYM_SHARE = 0.5


def article(word: str) -> str:
    """'an' before a vowel-initial word, else 'a' (good enough for colour words and names)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def subject_article(name: str) -> str:
    """The indefinite article of a subject name, or '' for a plural one ("books", "skis")."""
    last = name.split()[-1]
    if last.endswith("s") and not last.endswith(("ss", "us")):
        return ""
    return article(name)


@cache
def load_readings() -> dict[str, tuple[str, ...]]:
    """Everyday words a model reads as a subject's name (synonyms.json) that no caption uses."""
    data = json.loads((ASSETS_DIR / SYNONYMS_FILE).read_text(encoding="utf-8"))
    return {k: tuple(v) for k, v in data.get("readings", {}).items()}


@cache
def load_synonyms() -> dict[str, tuple[str, ...]]:
    """Everyday words for subjects, by subject name (curated for the smaller tiers)."""
    path = ASSETS_DIR / SYNONYMS_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    return {k: tuple(v) for k, v in data["synonyms"].items()}


def fill(
    frame: str,
    subject: str,
    colour_word: str,
    position: str,
    rng: np.random.Generator,
) -> str:
    """A frame filled in; `subject` is the full subject phrase, `position` a position word."""
    where = _pick(PLACE_PHRASES[POSITION_WORDS[position]], rng)
    text = frame.format(
        subject=subject, colour=colour_word, a=article(colour_word), where=where, position=position
    )
    return re.sub(r"\s+", " ", text).strip()


def names_place_or_colour(text: str) -> bool:
    """Whether a phrase holds a colour word or a position word (as whole words)."""
    padded = f" {text} "
    return any(f" {w} " in padded for w in (*COLOUR_WORDS, *POSITION_WORDS))


def subject_phrase(name: str, rng: np.random.Generator) -> str:
    """The subject named with a random prefix: "panda", "a panda", "a photo of a panda", ..."""
    prefix = _pick(SUBJECT_PREFIXES, rng).format(article=subject_article(name))
    return f"{prefix} {name}".strip()


def compose(subject: str, colour_word: str, position: str, rng: np.random.Generator) -> str:
    """A version 3 caption: subject, colour and place parts in a random order, joined by random
    words, with a filler word or two between or around them and (sometimes) no articles."""
    phrases = PLACE_PHRASES[POSITION_WORDS[position]]
    place = _pick(phrases, rng) if rng.random() < 0.5 else position
    colour = _pick(COLOUR_PARTS, rng).format(colour=colour_word, a=article(colour_word))
    parts = [(subject, colour, place)[int(i)] for i in rng.permutation(3)]
    gaps = ["", *(_pick(JOINERS, rng) for _ in parts[1:]), ""]  # before, between and after parts
    for _ in range(int(rng.choice(3, p=(0.5, 0.35, 0.15)))):
        at = int(rng.integers(len(gaps)))
        gaps[at] = f"{gaps[at]} {_pick(FILLERS, rng)} "
    text = gaps[0] + "".join(part + gap for part, gap in zip(parts, gaps[1:], strict=True))
    if rng.random() < 0.15:
        text = " ".join(w for w in text.split(" ") if w not in ("a", "an", "the"))
    return re.sub(r"\s+", " ", text).strip(" ,;-")


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


class CaptionParser:
    """Reads a caption of either dataset version back into (subject phrase, colour, position)."""

    def __init__(self, frames: tuple[str, ...]) -> None:
        colours = "|".join(re.escape(c) for c in sorted(COLOUR_WORDS, key=len, reverse=True))
        words = "|".join(re.escape(p) for p in sorted(POSITION_WORDS, key=len, reverse=True))
        places = sorted((q for qs in PLACE_PHRASES.values() for q in qs), key=len, reverse=True)
        self._place = {q: p for p, qs in PLACE_PHRASES.items() for q in qs}
        slots = {
            "{subject}": r"(?P<subject>.+?)",
            "{colour}": rf"(?P<colour>{colours})",
            "{position}": rf"(?P<position>{words})",
            "{where}": rf"(?P<where>{'|'.join(re.escape(q) for q in places)})",
            "{a}": r"an?",
            "{name}": r"(?P<subject>.+?)",  # dataset version 1's slot name
        }
        self._patterns = []
        for frame in frames:
            parts = re.split(r"(\{\w+\})", frame)
            body = "".join(slots.get(p) or re.escape(p).replace(r"\ ", r"\s+") for p in parts)
            self._patterns.append(re.compile(f"^{body}$"))

    def parse(self, text: str) -> list[tuple[str, str, str]]:
        """Every reading of a cleaned caption: (subject phrase, palette colour, position)."""
        out = []
        for rx in self._patterns:
            m = rx.match(text)
            if m is None:
                continue
            found = m.groupdict()
            position = (
                POSITION_WORDS[found["position"]]
                if found.get("position")
                else self._place[found["where"]]
            )
            out.append((found["subject"], COLOUR_WORDS[found["colour"]], position))
        return out


def subject_candidates(phrase: str) -> list[str]:
    """The names a subject phrase may stand for: the phrase, then without its prefix and article."""
    out = [phrase]
    for prefix in sorted(
        {p.format(article="").strip() for p in SUBJECT_PREFIXES if p}, key=len, reverse=True
    ):
        if phrase.startswith(prefix + " "):
            out.append(phrase[len(prefix) + 1 :])
            break
    rest = out[-1]
    for art in ("a ", "an ", "the "):
        if rest.startswith(art):
            out.append(rest[len(art) :])
    return out
