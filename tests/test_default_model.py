"""The built-in model shipped inside the package: used when no model is given, and it draws its prompts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from dallemini import load_pipeline
from dallemini.emoji.evaluation import distinct_images, scenes_for_model
from dallemini.emoji.judge import EmojiJudge
from dallemini.emoji.scenes import Scene
from dallemini.pipeline import default_model_path

# A training caption and a seed (fixed, so the check is reproducible on CPU in float32).
CAPTION = "strawberry on a blue background, top left"
# The README's first prompt: not in the training set (a held-out subject-colour-position triple).
HELDOUT = "panda on a blue background, top left"


def test_builtin_model_is_small_and_documented() -> None:
    path = default_model_path()
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    assert {"config.json", "bart.safetensors", "vqgan.safetensors", "tokenizer.json"} <= set(files)
    assert {"MODEL_CARD.md", "emoji_scenes.json", "clip.safetensors"} <= set(files)
    assert sum(files.values()) < 48 * 2**20, files  # a few tens of MB at most
    card = (path / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "heldout-triples" in card and "heldout-colour" in card and "seed" in card


def test_builtin_model_draws_a_training_caption() -> None:
    pipe = load_pipeline(device="cpu")  # no path: the built-in model
    scenes = scenes_for_model(default_model_path())
    judge = EmojiJudge(scenes)
    subject, colour, position = judge.parse_caption(CAPTION)
    assert scenes.split_of(Scene(subject, colour, position)) == "train"
    image = pipe(CAPTION, num_images=1, seed=0, rerank=False)[0].image
    verdict = judge.judge(image, CAPTION)
    assert verdict["all_ok"], verdict


def test_builtin_model_gives_different_images_for_different_seeds() -> None:
    """At its own sampling settings, four seeds of the README's first prompt give at least three
    visibly different images (mean absolute difference >= 4/255), at least two of them the scene
    the caption names, and the CLIP reranker puts one of those first."""
    pipe = load_pipeline(device="cpu")
    images = [g.image for g in pipe(HELDOUT, num_images=4, seed=0)]  # best first
    assert distinct_images(images) >= 3
    judge = EmojiJudge(scenes_for_model(default_model_path()))
    right = [judge.judge(im, HELDOUT)["all_ok"] for im in images]
    assert right[0] and sum(right) >= 2, right


def test_generate_without_model_uses_the_builtin_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dallemini.cli",
            "generate",
            "--n",
            "2",
            "--seed",
            "0",
            "--out",
            str(out),
            HELDOUT,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    record = json.loads((out / "generation.json").read_text())
    assert Path(record["model"]) == default_model_path()
    pngs = sorted(out.glob("000-*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (64, 64)
