"""Datasets: the built-in emoji scenes and their judge (DESIGN.md §5)."""

from .emoji import (
    COLOURS,
    PALETTE,
    POSITIONS,
    TEMPLATES,
    EmojiScenes,
    Scene,
    Subject,
    write_emoji_dataset,
)
from .judge import EmojiJudge

__all__ = [
    "COLOURS",
    "PALETTE",
    "POSITIONS",
    "TEMPLATES",
    "EmojiJudge",
    "EmojiScenes",
    "Scene",
    "Subject",
    "write_emoji_dataset",
]
