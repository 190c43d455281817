"""A model's synonym list (synonyms.json in its model directory): words and phrases it may meet in
prompts, each read as the words its training captions used ("kitty" -> "cat", "navy" -> "blue").

A small model trained from scratch knows only the words of its captions; the list lets it read
everyday words it never saw, and says so (`Synonyms.read` returns what it replaced).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints.native import read_optional_json
from .errors import CheckpointError

SYNONYMS_FILE = "synonyms.json"  # {"about": "...", "phrases": {"kitty": "cat", ...}, "keep": [...]}


@dataclass(frozen=True)
class Synonyms:
    """Phrases read as other phrases; `keep` phrases (names) are never rewritten, even in part."""

    phrases: Mapping[str, str]
    keep: frozenset[str] = frozenset()
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # longest first, whole words only: "soccer ball" stays whole while "soccer" alone is read
        alternatives = sorted({*self.phrases, *self.keep}, key=len, reverse=True)
        if alternatives:
            body = "|".join(re.escape(a) for a in alternatives)
            object.__setattr__(self, "_pattern", re.compile(rf"(?<![\w'])(?:{body})(?![\w'])"))

    def read(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        """The text with every listed phrase replaced, and the (phrase, replacement) pairs used."""
        if self._pattern is None:
            return text, []
        used: list[tuple[str, str]] = []

        def swap(m: re.Match[str]) -> str:
            phrase = m.group(0)
            if phrase in self.keep or phrase not in self.phrases:
                return phrase
            new = self.phrases[phrase]
            if (phrase, new) not in used:
                used.append((phrase, new))
            return new

        return self._pattern.sub(swap, text), used


def write_synonyms(
    path: str | os.PathLike,
    phrases: Mapping[str, str],
    keep: Iterable[str] = (),
    about: str | None = None,
) -> Path:
    """Write synonyms.json into a model directory (lower-case phrases, sorted)."""
    f = Path(path) / SYNONYMS_FILE
    data = {
        "about": about,
        "phrases": {k.lower(): v.lower() for k, v in sorted(phrases.items())},
        "keep": sorted({k.lower() for k in keep}),
    }
    f.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return f


def read_synonyms(path: str | os.PathLike) -> Synonyms | None:
    """A model directory's synonyms.json; None when it has none, CheckpointError when malformed."""
    f = Path(path) / SYNONYMS_FILE
    data = read_optional_json(f)
    if data is None:
        return None
    phrases = data.get("phrases") if isinstance(data, dict) else None
    keep = data.get("keep", []) if isinstance(data, dict) else None
    if (
        not isinstance(phrases, dict)
        or not all(isinstance(k, str) and isinstance(v, str) and k for k, v in phrases.items())
        or not isinstance(keep, list)
        or not all(isinstance(k, str) and k for k in keep)
    ):
        raise CheckpointError(
            f'{f} is malformed: expected {{"phrases": {{"word": "replacement", ...}}, "keep": [...]}}'
        )
    return Synonyms(phrases, frozenset(keep))
