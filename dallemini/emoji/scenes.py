"""Emoji scenes: the built-in captioned image set (DESIGN.md §5), generated offline and deterministically.

A scene is one colour emoji glyph (Noto Color Emoji) on a solid background of one of 8 palette
colours, at one of 9 positions on a 3×3 grid aligned to the VQGAN token grid, captioned from a few
templates ("pizza on a blue background, top left"). Glyphs come from the atlas packaged in
`assets/` (32×32 RGBA cells, ordered so that the first 64 / 256 subjects are the tiers); when the
font is installed, `render_from_font=True` renders them from it instead.

Splits (seeded, and consistent across tiers because they depend only on a subject's place in the
global order): "heldout-colour" holds, for every subject, all 9 positions of one colour that is
never seen with it in training; "heldout-triples" holds 10 % of the (subject, colour, position)
triples (7 or 8 per subject, never emptying a subject's colour or position in training);
"train" is everything else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import ConfigError, InputError
from . import language
from .language import article

__all__ = [
    "ATLAS_CELL",
    "COLOURS",
    "FONT_SIZE",
    "PALETTE",
    "POSITIONS",
    "SPLITS",
    "TEMPLATES",
    "EmojiScenes",
    "Scene",
    "Subject",
    "find_font",
    "fit_glyph",
    "load_subjects",
    "render_glyph",
    "write_emoji_dataset",
]

ASSETS_DIR = Path(__file__).with_name("assets")
ATLAS_FILE = "emoji_atlas.png"
SUBJECTS_FILE = "emoji_subjects.json"
ATLAS_CELL = (
    32  # side of one glyph cell in the packaged atlas: the largest subject of a 64×64 scene
)
FONT_SIZE = 109  # Noto Color Emoji is a CBDT bitmap font with a single strike at 109 ppem
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/local/share/fonts/NotoColorEmoji.ttf",
)

# Well separated under colour drift: the closest pair (orange/yellow) is ~100 RGB apart.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "orange": (255, 128, 0),
    "yellow": (255, 230, 0),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "purple": (140, 40, 180),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
# No article before {name}: CLDR names include plurals ("musical notes"). {a} is "a"/"an" for the colour.
TEMPLATES: tuple[str, ...] = (
    "{name} on {a} {colour} background, {position}",
    "{a} {colour} picture with {name} in the {position}",
    "{name}, {position}, {colour} background",
    "{colour} background, {name} at the {position}",
    "{position}: {name} on {colour}",
    "{a} {colour} image, {name} in the {position}",
)
SPLITS: tuple[str, ...] = ("train", "heldout-triples", "heldout-colour")
# Caption-level held-out sets, drawn on the heldout-triples scenes: sentence frames that training
# never uses, and synonyms (subject words, colour words, place phrases) on scenes never seen with them.
CAPTION_SPLITS: tuple[str, ...] = ("heldout-frames", "heldout-synonyms")
VERSIONS = (1, 2, 3, 4)  # 1: the six templates; 2: plain-language captions; 3: 2 + free word
# order, held-out synonyms and colour words (emoji/language.py); 4: 3 without free word order
# Variants of a training scene (variant 0 is the plain scene): the glyph turned by a small angle
# (one per subject, place and variant, so a glyph donor shares its pose) and the background a
# shade lighter or darker (still nearest its palette colour: the judge reads it as that colour).
VARIANT_ANGLES: tuple[float, ...] = (-10.0, -5.0, 5.0, 10.0, 0.0)
VARIANT_SHADES: tuple[int, ...] = (-24, -12, 0, 12, 24)
# How variants differ: "turn-shade" draws a turn and a shade per variant (two variants may look
# alike); "shade" keeps the glyph upright and gives every variant of a colour its own background
# shade (`look_shades`), so any two variants of a scene are distinct images; "tile" shades the
# background as "shade" does but keeps the glyph's square on the plain colour, so the glyph's
# pixels (and so its VQGAN codes) are the same in every look.
LOOKS: tuple[str, ...] = ("turn-shade", "shade", "tile")
LOOK_SHADE_STEP = 10  # RGB levels between a colour's shades, before clipping
# mean |RGB difference| every two of a colour's shades keep after clipping: with the glyph on ~1/5 of
# the image, two looks then differ by >= 5 levels, above the 4 of "distinct" (evaluation.py)
LOOK_MIN_DIFFERENCE = 6.5
HELDOUT_TRIPLE_FRACTION = 0.10
LOW_CONTRAST_DISTANCE = 60.0  # RGB distance under which a glyph pixel "is" the background
LOW_CONTRAST_FRACTION = (
    0.5  # a (subject, colour) pair is low contrast above this share of such pixels
)


@functools.cache
def look_shades(colour: str, k: int = 8) -> tuple[int, ...]:
    """Up to k background shifts for `colour` (0 first): 0, +10, -10, +20, ... keeping those whose
    clipped colour stays nearest `colour` and differs from every kept one by LOOK_MIN_DIFFERENCE
    (black has 7 of 8: a colour with fewer shades than variants repeats them in turn)."""
    base = np.asarray(PALETTE[colour], np.float32)
    palette = np.asarray([PALETTE[c] for c in COLOURS], np.float32)
    kept: list[int] = []
    rgbs: list[np.ndarray] = []
    for i in range(64):
        shift = (i + 1) // 2 * LOOK_SHADE_STEP * (1 if i % 2 else -1)
        rgb = np.clip(base + shift, 0, 255)
        if COLOURS[int(np.argmin(((palette - rgb) ** 2).sum(1)))] != colour:
            continue
        if all(np.abs(rgb - r).mean() >= LOOK_MIN_DIFFERENCE for r in rgbs):
            kept.append(shift)
            rgbs.append(rgb)
        if len(kept) == k:
            break
    return tuple(kept)


@dataclass(frozen=True)
class Subject:
    """One emoji subject: its caption name (cleaned CLDR name), aliases and Unicode categories."""

    index: int
    name: str
    emoji: str
    aliases: tuple[str, ...]
    category: str
    subcategory: str


@dataclass(frozen=True)
class Scene:
    """One (subject, colour, position) triple: the attributes of one image, by name."""

    subject: str
    colour: str
    position: str


class BackgroundPairs(NamedTuple):
    """Scenes drawn twice on two backgrounds (see `EmojiScenes.background_pairs`)."""

    first: np.ndarray  # [n, H, W, 3] uint8
    second: np.ndarray  # the same scenes on the other colour
    alpha: np.ndarray  # [n, H, W] float32 in [0, 1]: where the glyph covers the background
    scenes: list[tuple[Scene, Scene]]


def glyph_cells(alpha: np.ndarray, cell: int) -> np.ndarray:
    """Token cells ([..., H/cell, W/cell] bool) that hold any pixel of a glyph alpha map [..., H, W]."""
    *lead, h, w = alpha.shape
    if h % cell or w % cell:
        raise ConfigError(f"{h}x{w} px images do not split into {cell} px token cells")
    return alpha.reshape(*lead, h // cell, cell, w // cell, cell).max(axis=(-3, -1)) > 0


def _seed_int(*parts: object) -> int:
    """A stable 64-bit seed from any printable parts (Python's hash() is salted per process)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little")


def _rng(*parts: object) -> np.random.Generator:
    """A numpy generator seeded by `_seed_int(*parts)`, for per-item deterministic choices."""
    return np.random.default_rng(_seed_int(*parts))


# --------------------------------------------------------------------------------------------
# Font rendering (used by atlas.py and by render_from_font=True)


def find_font(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The Noto Color Emoji font file: `path` if given, else $DALLEMINI_EMOJI_FONT or a Debian path."""
    candidates = [path] if path is not None else [os.environ.get("DALLEMINI_EMOJI_FONT")]
    if path is None:
        candidates += list(FONT_CANDIDATES)
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


@functools.lru_cache(maxsize=4)
def _load_font(path: str) -> ImageFont.FreeTypeFont:
    """The font at its only bitmap size, with RAQM layout so ZWJ and FE0F sequences are one glyph."""
    layout = ImageFont.Layout.RAQM if hasattr(ImageFont, "Layout") else ImageFont.LAYOUT_RAQM
    return ImageFont.truetype(path, FONT_SIZE, layout_engine=layout)


def render_glyph(text: str, font_path: str | os.PathLike[str]) -> Image.Image:
    """Render one emoji at 109 px with its embedded colours, cropped to its alpha bounding box."""
    font = _load_font(str(font_path))
    im = Image.new("RGBA", (3 * FONT_SIZE, 2 * FONT_SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((FONT_SIZE // 4, FONT_SIZE // 4), text, font=font, embedded_color=True)
    box = im.getchannel("A").getbbox()
    if box is None:
        raise InputError(f"the font renders {text!r} as an empty glyph")
    return im.crop(box)


def fit_glyph(glyph: Image.Image, size: int) -> Image.Image:
    """Scale a tight RGBA glyph (aspect kept, longer side = size) and centre it on a size×size cell."""
    w, h = glyph.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = glyph.convert("RGBA").resize((nw, nh), Image.Resampling.LANCZOS)  # premultiplied alpha
    cell = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    cell.paste(small, ((size - nw) // 2, (size - nh) // 2))
    return cell


# --------------------------------------------------------------------------------------------
# The packaged atlas


@functools.lru_cache(maxsize=1)
def _load_atlas() -> tuple[tuple[Subject, ...], np.ndarray, dict[str, Any]]:
    """Read the packaged subject list and atlas: (subjects in tier order, uint8 [N, 32, 32, 4], header)."""
    meta_path, atlas_path = ASSETS_DIR / SUBJECTS_FILE, ASSETS_DIR / ATLAS_FILE
    if not meta_path.is_file() or not atlas_path.is_file():
        raise ConfigError(
            f"the emoji atlas is missing from {ASSETS_DIR}; rebuild it with `python -m dallemini.emoji.atlas`"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    cell, cols = int(meta["cell"]), int(meta["columns"])
    with Image.open(atlas_path) as im:
        sheet = np.asarray(im.convert("RGBA"))
    subjects, glyphs = [], []
    for i, s in enumerate(meta["subjects"]):
        subjects.append(
            Subject(
                index=i,
                name=s["name"],
                emoji=s["emoji"],
                aliases=tuple(s.get("aliases", ())),
                category=s["category"],
                subcategory=s["subcategory"],
            )
        )
        r, c = divmod(i, cols)
        glyphs.append(sheet[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell])
    stack = np.stack(glyphs)
    stack.setflags(write=False)
    return tuple(subjects), stack, meta


def load_subjects() -> tuple[Subject, ...]:
    """All packaged subjects, in tier order (the first 64 / 256 are the small tiers)."""
    return _load_atlas()[0]


def _tier_count(tier: int | str, total: int) -> int:
    """Number of subjects in a tier: 64, 256 (or any positive int up to the total) or 'all'."""
    if tier == "all":
        return total
    try:
        n = int(tier)
    except (TypeError, ValueError):
        raise ConfigError(
            f"emoji tier must be 64, 256, another count or 'all', got {tier!r}"
        ) from None
    if not 1 <= n <= total:
        raise ConfigError(f"emoji tier {n} is out of range: the atlas has {total} subjects")
    return n


def _clean_caption(text: str) -> str:
    """Lower case, single spaces, no trailing full stop: the form captions are parsed in."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


class EmojiScenes:
    """The emoji-scenes dataset: subjects of one tier × 8 colours × 9 positions, with seeded splits.

    `resolution` is the image side; `subject_size` (default: half the side, a multiple of `grid`)
    the glyph side; `grid` the VQGAN token cell size in pixels (default: side / 8) that the
    placement offsets are aligned to, e.g. {0, 16, 32} for 64×64 with 32 px subjects.
    """

    def __init__(
        self,
        tier: int | str = 64,
        resolution: int = 64,
        subject_size: int | None = None,
        seed: int = 0,
        *,
        grid: int | None = None,
        alias_prob: float = 0.2,
        version: int = 1,
        variants: int = 1,
        looks: str = "turn-shade",
        render_from_font: bool = False,
        font_path: str | os.PathLike[str] | None = None,
    ) -> None:
        all_subjects, atlas, _ = _load_atlas()
        self.tier = tier
        self.seed = int(seed)
        self.resolution = int(resolution)
        if self.resolution < 8:
            raise ConfigError(f"emoji scene resolution must be at least 8, got {resolution}")
        self.grid = int(grid) if grid is not None else max(1, self.resolution // 8)
        if self.grid < 1:
            raise ConfigError(f"grid must be a positive number of pixels, got {grid}")
        if subject_size is None:
            subject_size = max(self.grid, (self.resolution // 2) // self.grid * self.grid)
        self.subject_size = int(subject_size)
        if not 4 <= self.subject_size <= self.resolution:
            raise ConfigError(
                f"subject_size must be between 4 and the resolution ({self.resolution}), got {subject_size}"
            )
        if not 0.0 <= alias_prob <= 1.0:
            raise ConfigError(f"alias_prob must be in [0, 1], got {alias_prob}")
        self.alias_prob = float(alias_prob)
        if version not in VERSIONS:
            raise ConfigError(f"emoji-scenes version must be one of {VERSIONS}, got {version!r}")
        self.version = int(version)
        if not 1 <= int(variants) <= 64:
            raise ConfigError(f"variants must be between 1 and 64, got {variants!r}")
        self.variants = int(variants)
        if looks not in LOOKS:
            raise ConfigError(f"looks must be one of {list(LOOKS)}, got {looks!r}")
        self.looks = looks
        n = _tier_count(tier, len(all_subjects))
        self.subjects: tuple[Subject, ...] = all_subjects[:n]
        self.names: tuple[str, ...] = tuple(s.name for s in self.subjects)
        self._atlas = atlas[:n]
        self._by_name: dict[str, Subject] = {}
        for s in self.subjects:
            self._by_name[s.name] = s
        synonyms = language.load_synonyms()
        self.synonyms: dict[str, tuple[str, ...]] = {}
        for s in self.subjects:
            words = tuple(dict.fromkeys((*s.aliases, *synonyms.get(s.name, ()))))
            for a in words:
                self._by_name.setdefault(a, s)
            # captions never use a synonym that reads as a place or a colour ("lower left crayon")
            self.synonyms[s.name] = tuple(w for w in words if not language.names_place_or_colour(w))
        self.font_path: Path | None = None
        if render_from_font:
            self.font_path = find_font(font_path)
            if self.font_path is None:
                raise ConfigError(
                    "render_from_font=True needs Noto Color Emoji (Debian: apt-get install "
                    "fonts-noto-color-emoji) or a font_path; without it the packaged atlas is used"
                )
        # Placement: offsets {0, middle, end}, the middle one rounded to the token grid.
        free = self.resolution - self.subject_size
        mid = min(free, round(free / 2 / self.grid) * self.grid)
        steps = (0, mid, free)
        self.offsets: dict[str, tuple[int, int]] = {
            p: (steps[i % 3], steps[i // 3]) for i, p in enumerate(POSITIONS)
        }
        half = self.subject_size / 2
        self.centres: dict[str, tuple[float, float]] = {
            p: (x + half, y + half) for p, (x, y) in self.offsets.items()
        }
        self._glyphs: dict[str, Image.Image] = {}

    # ---- description

    def config(self) -> dict[str, Any]:
        """The constructor arguments that reproduce this dataset (stored next to written datasets)."""
        return {
            "tier": self.tier,
            "resolution": self.resolution,
            "subject_size": self.subject_size,
            "seed": self.seed,
            "grid": self.grid,
            "alias_prob": self.alias_prob,
            **({"version": self.version} if self.version != 1 else {}),
            **({"variants": self.variants} if self.variants != 1 else {}),
            **({"looks": self.looks} if self.looks != "turn-shade" else {}),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> EmojiScenes:
        """Rebuild a dataset from `config()` output (e.g. a written folder's emoji_scenes.json)."""
        keys = (
            "tier",
            "resolution",
            "subject_size",
            "seed",
            "grid",
            "alias_prob",
            "version",
            "variants",
            "looks",
        )
        kwargs = {k: config[k] for k in keys if k in config}
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> EmojiScenes:
        """The dataset a folder was written from (`write_emoji_dataset`'s emoji_scenes.json)."""
        f = Path(folder) / "emoji_scenes.json"
        if not f.is_file():
            raise ConfigError(
                f"{f} is missing: {folder} was not written by `dallemini dataset emoji`"
            )
        try:
            return cls.from_config(json.loads(f.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{f} is not a valid emoji-scenes config ({e})") from e

    def __repr__(self) -> str:
        return (
            f"EmojiScenes(tier={self.tier!r}, subjects={len(self.subjects)}, resolution={self.resolution}, "
            f"subject_size={self.subject_size}, seed={self.seed})"
        )

    def subject(self, name: str | Subject) -> Subject:
        """Look a subject up by caption name or alias (case-insensitive)."""
        if isinstance(name, Subject):
            return name
        s = self._by_name.get(_clean_caption(name))
        if s is None:
            raise InputError(f"{name!r} is not a subject of emoji tier {self.tier!r}")
        return s

    # ---- rendering

    def glyph(self, subject: str | Subject) -> Image.Image:
        """The subject's RGBA glyph at `subject_size` (from the font if asked, else the atlas)."""
        s = self.subject(subject)
        g = self._glyphs.get(s.name)
        if g is None:
            if self.font_path is not None:
                g = fit_glyph(render_glyph(s.emoji, self.font_path), self.subject_size)
            else:
                g = Image.fromarray(self._atlas[s.index], "RGBA")
                if self.subject_size != ATLAS_CELL:
                    g = g.resize((self.subject_size,) * 2, Image.Resampling.LANCZOS)
            self._glyphs[s.name] = g
        return g

    def render(
        self, subject: str | Subject, colour: str, position: str, variant: int = 0
    ) -> Image.Image:
        """The RGB image of one scene: the glyph alpha-composited on a solid background (variant 0:
        the plain scene; others turn the glyph and shade the background, see VARIANT_ANGLES)."""
        if colour not in PALETTE:
            raise InputError(f"unknown colour {colour!r}; the palette is {list(COLOURS)}")
        if position not in self.offsets:
            raise InputError(f"unknown position {position!r}; positions are {list(POSITIONS)}")
        shade = self._shade(self.subject(subject).name, colour, position, variant)
        rgb = tuple(min(255, max(0, v + shade)) for v in PALETTE[colour])
        im = Image.new("RGB", (self.resolution, self.resolution), rgb)
        if self.looks == "tile" and shade:
            x, y = self.offsets[position]
            im.paste(PALETTE[colour], (x, y, x + self.subject_size, y + self.subject_size))
        g = self._posed_glyph(subject, position, variant)
        im.paste(g, self.offsets[position], g)
        return im

    @property
    def upright_glyph(self) -> bool:
        """Whether every look draws the glyph upright (shade and tile; turn-shade turns it)."""
        return self.looks != "turn-shade"

    def _angle(self, subject: str, position: str, variant: int) -> float:
        """The glyph's turn in a variant: one per (subject, place, variant), 0 for variant 0."""
        if variant == 0 or self.upright_glyph:
            return 0.0
        rng = _rng(self.seed, "variant-angle", subject, position, variant)
        return VARIANT_ANGLES[int(rng.integers(len(VARIANT_ANGLES)))]

    def _shade(self, subject: str, colour: str, position: str, variant: int) -> int:
        """The background's shift in a variant (RGB levels, each channel), 0 for variant 0."""
        if variant == 0:
            return 0
        if self.looks == "turn-shade":
            rng = _rng(self.seed, "variant-shade", subject, colour, position, variant)
            return VARIANT_SHADES[int(rng.integers(len(VARIANT_SHADES)))]
        shades = look_shades(colour, self.variants)
        return shades[variant % len(shades)]

    def _posed_glyph(self, subject: str | Subject, position: str, variant: int) -> Image.Image:
        """The glyph as a variant draws it (turned about its centre, same square)."""
        g = self.glyph(subject)
        angle = self._angle(self.subject(subject).name, position, variant)
        return g.rotate(angle, resample=Image.Resampling.BICUBIC) if angle else g

    def glyph_alpha(self, subject: str | Subject, position: str, variant: int = 0) -> np.ndarray:
        """[side, side] float32 in [0, 1]: where the subject's glyph covers the background."""
        alpha = np.zeros((self.resolution, self.resolution), np.float32)
        g = np.asarray(self._posed_glyph(subject, position, variant))[..., 3]
        x, y = self.offsets[position]
        alpha[y : y + g.shape[0], x : x + g.shape[1]] = g.astype(np.float32) / 255.0
        return alpha

    def render_scene(self, scene: Scene, variant: int = 0) -> Image.Image:
        """`render` for a Scene."""
        return self.render(scene.subject, scene.colour, scene.position, variant)

    # ---- captions

    def captions(self, scene: Scene, name: str | None = None) -> list[str]:
        """The scene captioned by every template, with its canonical name (or the given alias)."""
        name = name or scene.subject
        return [
            t.format(
                name=name, colour=scene.colour, position=scene.position, a=article(scene.colour)
            )
            for t in TEMPLATES
        ]

    def caption(self, scene: Scene, epoch: int = 0, variant: int = 0) -> str:
        """One caption of a scene, chosen deterministically from (seed, epoch, scene, variant)."""
        return self.sample_captions(scene, max(1, variant + 1), epoch)[variant]

    @property
    def frames(self) -> tuple[str, ...]:
        """The caption frames training uses (the templates of version 1, the frames of versions 2-4)."""
        return TEMPLATES if self.version == 1 else language.FRAMES

    @functools.cached_property
    def heldout_synonym(self) -> dict[str, str]:
        """Versions 3-4: per subject, the synonym training captions never use, for about
        HELDOUT_SYNONYM_SHARE of the subjects with any (every subject with two or more)."""
        if self.version < 3:
            return {}
        out = {}
        for name, words in self.synonyms.items():
            rng = _rng(self.seed, "heldout-synonym", name)
            if len(words) >= 2 or (words and rng.random() < language.HELDOUT_SYNONYM_SHARE):
                out[name] = words[int(rng.integers(len(words)))]
        return out

    def sample_captions(self, scene: Scene, k: int = 1, epoch: int = 0) -> list[str]:
        """k captions of a scene with distinct frames, each naming a synonym with p=alias_prob."""
        if self.version >= 2:
            return self._plain_captions(scene, k, epoch)
        if not 1 <= k <= len(TEMPLATES):
            raise ConfigError(f"captions per image must be between 1 and {len(TEMPLATES)}, got {k}")
        rng = _rng(self.seed, "caption", epoch, scene.subject, scene.colour, scene.position)
        order = rng.permutation(len(TEMPLATES))[:k]
        aliases = self.subject(scene.subject).aliases
        out = []
        for t in order:
            name = scene.subject
            use_alias = rng.random() < self.alias_prob
            if aliases and use_alias:
                name = aliases[int(rng.integers(len(aliases)))]
            a = article(scene.colour)
            out.append(
                TEMPLATES[t].format(name=name, colour=scene.colour, position=scene.position, a=a)
            )
        return out

    def _plain_captions(self, scene: Scene, k: int, epoch: int) -> list[str]:
        """Versions 2-4: k captions in distinct frames, with synonyms, colour words and place phrases
        (version 3: the first in a frame, the others in free word order, `language.compose`)."""
        frames = language.FRAMES
        if not 1 <= k <= len(frames):
            raise ConfigError(f"captions per image must be between 1 and {len(frames)}, got {k}")
        rng = _rng(
            self.seed,
            f"caption-v{self.version}",
            epoch,
            scene.subject,
            scene.colour,
            scene.position,
        )
        out = []
        for i, t in enumerate(rng.permutation(len(frames))[:k]):
            frame = None if self.version == 3 and i > 0 else frames[int(t)]
            out.append(self._plain_caption(scene, frame, rng, synonyms=False))
        return out

    def _plain_caption(
        self, scene: Scene, frame: str | None, rng: np.random.Generator, *, synonyms: bool
    ) -> str:
        """One frame filled in (None: `language.compose`); `synonyms` forces a synonym, a colour
        word and a place phrase (versions 3-4: the held-out synonym and colour words)."""
        held = self.heldout_synonym.get(scene.subject)
        words = self.synonyms[scene.subject]
        colours = [w for w, c in language.COLOUR_WORDS.items() if c == scene.colour]
        if self.version >= 3:
            if synonyms:
                words = (held,) if held else words
                colours = [w for w in colours if w in language.HELDOUT_COLOUR_WORDS]
            else:
                words = tuple(w for w in words if w != held)
                colours = [w for w in colours if w not in language.HELDOUT_COLOUR_WORDS]
        else:
            colours = [w for w in colours if w not in language.V3_COLOUR_WORDS]
        name = scene.subject
        if words and (synonyms or rng.random() < self.alias_prob):
            name = words[int(rng.integers(len(words)))]
        if synonyms:
            colours = [w for w in colours if w != scene.colour]
        colour = (
            colours[int(rng.integers(len(colours)))]
            if rng.random() < 0.5 or synonyms
            else scene.colour
        )
        position = scene.position
        if synonyms or rng.random() < 0.3:
            short = [w for w, p in language.POSITION_WORDS.items() if p == scene.position]
            position = short[int(rng.integers(len(short)))]
        phrase = language.subject_phrase(name, rng)
        if frame is None:
            return language.compose(phrase, colour, position, rng)
        return language.fill(frame, phrase, colour, position, rng)

    def eval_caption(self, scene: Scene, split: str) -> str:
        """The caption a scene is judged with in `split` (a scene split or one of CAPTION_SPLITS)."""
        if split == "heldout-frames":
            rng = _rng(self.seed, "heldout-frames", scene.subject, scene.colour, scene.position)
            frame = language.HELDOUT_FRAMES[int(rng.integers(len(language.HELDOUT_FRAMES)))]
            name = f"{language.subject_article(scene.subject)} {scene.subject}".strip()
            return language.fill(frame, name, scene.colour, scene.position, rng)
        if split == "heldout-synonyms":
            rng = _rng(self.seed, "heldout-synonyms", scene.subject, scene.colour, scene.position)
            frame = language.FRAMES[int(rng.integers(len(language.FRAMES)))]
            return self._plain_caption(scene, frame, rng, synonyms=True)
        return self.sample_captions(scene, 1, 0)[0]

    # ---- splits

    def scenes(self) -> list[Scene]:
        """Every (subject, colour, position) triple of the tier, in subject/colour/position order."""
        return [Scene(s, c, p) for s in self.names for c in COLOURS for p in POSITIONS]

    @functools.cached_property
    def heldout_colour(self) -> dict[str, str]:
        """Per subject, the colour never seen with it in training (balanced within blocks of 8)."""
        out = {}
        for s in self.subjects:
            perm = _rng(self.seed, "heldout-colour", s.index // len(COLOURS)).permutation(
                len(COLOURS)
            )
            out[s.name] = COLOURS[int(perm[s.index % len(COLOURS)])]
        return out

    @functools.cached_property
    def _heldout_triples(self) -> frozenset[Scene]:
        """10 % of triples (7 or 8 per subject), never the last training position of a colour or vice versa."""
        per_subject = len(COLOURS) * len(POSITIONS) * HELDOUT_TRIPLE_FRACTION
        held: set[Scene] = set()
        for s in self.subjects:
            k = math.floor(per_subject * (s.index + 1) + 1e-9) - math.floor(
                per_subject * s.index + 1e-9
            )
            colours = [c for c in COLOURS if c != self.heldout_colour[s.name]]
            cands = [(c, p) for c in colours for p in POSITIONS]
            by_colour = {c: len(POSITIONS) for c in colours}
            by_position = {p: len(colours) for p in POSITIONS}
            rng = _rng(self.seed, "heldout-triples", s.index)
            taken = 0
            for j in rng.permutation(len(cands)):
                if taken == k:
                    break
                c, p = cands[int(j)]
                if by_colour[c] <= 1 or by_position[p] <= 1:
                    continue
                by_colour[c] -= 1
                by_position[p] -= 1
                held.add(Scene(s.name, c, p))
                taken += 1
        return frozenset(held)

    @functools.cached_property
    def _splits(self) -> dict[str, list[Scene]]:
        """All three splits, in canonical scene order."""
        out: dict[str, list[Scene]] = {k: [] for k in SPLITS}
        for sc in self.scenes():
            out[self.split_of(sc)].append(sc)
        return out

    def split_of(self, scene: Scene) -> str:
        """The split a scene belongs to."""
        if self.heldout_colour[scene.subject] == scene.colour:
            return "heldout-colour"
        if scene in self._heldout_triples:
            return "heldout-triples"
        return "train"

    def split(self, name: str) -> list[Scene]:
        """The scenes of a split: 'train', 'heldout-triples', 'heldout-colour' or 'all' (the caption
        splits 'heldout-frames' and 'heldout-synonyms' caption the heldout-triples scenes)."""
        if name == "all":
            return self.scenes()
        if name == "heldout-synonyms" and self.version >= 3:
            held = self.heldout_synonym  # only subjects with a synonym that training never uses
            return [sc for sc in self._splits["heldout-triples"] if sc.subject in held]
        if name in CAPTION_SPLITS:
            return list(self._splits["heldout-triples"])
        if name not in SPLITS:
            raise ConfigError(f"unknown emoji split {name!r}; splits are {[*SPLITS, 'all']}")
        return list(self._splits[name])

    # ---- contrast

    @functools.cached_property
    def low_contrast(self) -> frozenset[tuple[str, str]]:
        """(subject, colour) pairs where most glyph pixels are within 60 RGB of the background."""
        rgba = self._atlas.astype(np.float32)
        solid = rgba[..., 3] >= 128
        out = set()
        for c, rgb in PALETTE.items():
            near = (
                np.linalg.norm(rgba[..., :3] - np.asarray(rgb, np.float32), axis=-1)
                < LOW_CONTRAST_DISTANCE
            )
            frac = (near & solid).sum(axis=(1, 2)) / np.maximum(solid.sum(axis=(1, 2)), 1)
            out.update((self.names[i], c) for i in np.flatnonzero(frac > LOW_CONTRAST_FRACTION))
        return frozenset(out)

    def is_low_contrast(self, scene: Scene) -> bool:
        """Whether the scene's glyph nearly disappears into its background (report these apart)."""
        return (self.subject(scene.subject).name, scene.colour) in self.low_contrast

    # ---- background pairs (colour-invariant VQGAN codes)

    @functools.cached_property
    def _recolourable(self) -> tuple[list[tuple[str, str]], dict[tuple[str, str], list[str]]]:
        """Training (subject, position) pairs seen on at least two colours, with those colours."""
        colours: dict[tuple[str, str], list[str]] = {}
        for sc in self.split("train"):
            colours.setdefault((sc.subject, sc.position), []).append(sc.colour)
        keys = [k for k, v in colours.items() if len(v) >= 2]
        return keys, colours

    @functools.cached_property
    def _donor_order(self) -> dict[str, tuple[str, ...]]:
        """Per subject, the palette colours from the one its glyph stands out on most to the least."""
        rgba = self._atlas.astype(np.float32)
        alpha = rgba[..., 3:] / 255.0
        out = {}
        for i, name in enumerate(self.names):
            weight = alpha[i, ..., 0].sum() + 1e-6
            contrast = {
                c: float(
                    (
                        np.linalg.norm(rgba[i, ..., :3] - np.asarray(rgb, np.float32), axis=-1)
                        * alpha[i, ..., 0]
                    ).sum()
                    / weight
                )
                for c, rgb in PALETTE.items()
            }
            out[name] = tuple(
                sorted(COLOURS, key=lambda c: (-round(contrast[c], 3), COLOURS.index(c)))
            )
        return out

    def glyph_donor(self, subject: str | Subject, position: str) -> str | None:
        """The training colour whose codes stand for the subject's glyph at `position`, or None.

        One colour per (subject, place) (the training colour the glyph stands out on most), so a
        seq2seq model trained on donor codes (`donors.py`) sees a subject's glyph cells
        with the same codes on every background: the glyph and the background become separate
        parts of the token grid.
        """
        name = self.subject(subject).name
        _, colours = self._recolourable
        seen = colours.get((name, position), [])
        return next((c for c in self._donor_order[name] if c in seen), None)

    def background_pairs(self, n: int, *parts: object, donor: bool = False) -> BackgroundPairs:
        """n training scenes, each also drawn on another of its training colours, seeded by `parts`.

        Both scenes of a pair are in the train split, so held-out pairs stay unseen. The emoji
        VQGAN trainer (`training.EmojiVQGANTrainer`) trains on them. With `donor`, the second
        colour is always the scene's `glyph_donor` (and the first any other training colour).
        """
        keys, colours = self._recolourable
        if not keys:
            raise ConfigError(
                f"emoji tier {self.tier!r} has no subject seen on two training colours"
            )
        rng = _rng(self.seed, "background-pairs", *parts)
        side = self.resolution
        a = np.empty((n, side, side, 3), np.uint8)
        b = np.empty_like(a)
        alpha = np.empty((n, side, side), np.float32)
        drawn = []
        for i, j in enumerate(rng.integers(len(keys), size=n)):
            subject, position = keys[int(j)]
            seen = colours[subject, position]
            if donor:
                d = self.glyph_donor(subject, position)
                others = [c for c in seen if c != d]
                pick_colours = (others[int(rng.integers(len(others)))], d)
            else:
                pick = rng.choice(len(seen), size=2, replace=False)
                pick_colours = (seen[int(pick[0])], seen[int(pick[1])])
            pair = tuple(Scene(subject, c, position) for c in pick_colours)
            a[i] = np.asarray(self.render_scene(pair[0]))
            b[i] = np.asarray(self.render_scene(pair[1]))
            alpha[i] = self.glyph_alpha(subject, position)
            drawn.append((pair[0], pair[1]))
        return BackgroundPairs(a, b, alpha, drawn)

    # ---- iteration

    def pairs(
        self,
        split: str = "train",
        epoch: int = 0,
        captions_per_image: int = 1,
        shuffle: bool = False,
    ) -> Iterator[tuple[str, Image.Image]]:
        """(caption, RGB image) pairs of a split; `shuffle` permutes them by (seed, epoch)."""
        scenes = self.split(split)
        if shuffle:
            order = _rng(self.seed, "shuffle", split, epoch).permutation(len(scenes))
            scenes = [scenes[int(i)] for i in order]
        for sc in scenes:
            im = self.render_scene(sc)
            for cap in self.sample_captions(sc, captions_per_image, epoch):
                yield cap, im

    def __iter__(self) -> Iterator[tuple[str, Image.Image]]:
        return self.pairs("train")

    def __len__(self) -> int:
        return len(self._splits["train"])


def write_emoji_dataset(
    out_dir: str | os.PathLike[str],
    tier: int | str = 64,
    resolution: int = 64,
    splits: str | Sequence[str] = ("train", "heldout-triples", "heldout-colour"),
    captions_per_image: int = 2,
    *,
    seed: int = 0,
    subject_size: int | None = None,
    epoch: int = 0,
    version: int = 1,
    variants: int = 1,
    looks: str = "turn-shade",
) -> dict[str, int]:
    """Write an image folder: NNNNNN.png + NNNNNN.txt (one caption a line), metadata.jsonl, config.

    Returns the number of images written per split. `metadata.jsonl` has one row per image with
    file, subject, colour, position, split, low_contrast and captions; `emoji_scenes.json` holds
    the EmojiScenes config so evaluation can rebuild the same dataset and judge. With `variants`
    > 1 every training scene is written that many times (variant 0 first), each with its own
    captions (rows then also say `variant`); held-out scenes are written once, plain.
    """
    scenes = EmojiScenes(
        tier, resolution, subject_size, seed, version=version, variants=variants, looks=looks
    )
    names = [splits] if isinstance(splits, str) else list(splits)
    if names == ["all"]:
        names = list(SPLITS)
    for n in names:
        if n not in SPLITS:
            raise ConfigError(f"unknown emoji split {n!r}; splits are {list(SPLITS)} or 'all'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    i = 0
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for n in names:
            todo = scenes.split(n)
            counts[n] = len(todo)
            for sc in todo:
                for v in range(scenes.variants if n == "train" else 1):
                    stem = f"{i:06d}"
                    caps = scenes.sample_captions(sc, captions_per_image, epoch + v)
                    scenes.render_scene(sc, v).save(out / f"{stem}.png", optimize=False)
                    (out / f"{stem}.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
                    row = {
                        "file": f"{stem}.png",
                        "subject": sc.subject,
                        "colour": sc.colour,
                        "position": sc.position,
                        **({"variant": v} if scenes.variants > 1 else {}),
                        "split": n,
                        "low_contrast": scenes.is_low_contrast(sc),
                        "captions": caps,
                    }
                    meta.write(json.dumps(row, ensure_ascii=False) + "\n")
                    i += 1
            counts[n] *= scenes.variants if n == "train" else 1
    config = {
        **scenes.config(),
        "splits": names,
        "captions_per_image": captions_per_image,
        "epoch": epoch,
    }
    (out / "emoji_scenes.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return counts
