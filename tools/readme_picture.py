"""Draw docs/images/builtin-model.png: the built-in model's images for two prompts, seeds 0-7, best first.

Run: python tools/readme_picture.py [OUT.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from dallemini import load_pipeline
from dallemini.images import make_grid

PROMPTS = (
    "panda on a blue background, top left",
    "strawberry on a yellow background, bottom right",
)
SCALE = 2  # 64 px images shown at 128 px, nearest neighbour: crisp pixels


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/images/builtin-model.png")
    pipe = load_pipeline(device="cpu")
    rows = pipe(list(PROMPTS), num_images=8, seed=0)
    images = [
        g.image.resize((g.image.width * SCALE,) * 2, Image.Resampling.NEAREST)
        for r in rows
        for g in r
    ]
    make_grid(images, cols=8).save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
