"""Prompt accuracy of a text-to-image model on held-out emoji-scenes captions, judged deterministically.

For a seeded sample of a split's scenes (one caption each, as the dataset writes them) the model makes
`candidates` images per caption. The judge reports colour, position, subject and "all" for:
- `model`: every candidate (the expected accuracy of one random sample);
- `reranked`: the candidate the pipeline's CLIP ranks first (when it has a reranker);
- `ceiling`: the true image through the model's VQGAN (encode + decode), the best the decoder allows;
- `floor`: the model's images judged against another scene's caption (a derangement), what a model
  that ignores the prompt would score.
`ratio_to_ceiling` is model.all / ceiling.all and `rerank_lift` is reranked.all − model.all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError
from .judge import EmojiJudge
from .scenes import EmojiScenes, Scene

SCENES_FILE = "emoji_scenes.json"


def read_scenes_config(folder: str | Path) -> dict[str, Any] | None:
    """A folder's emoji_scenes.json (a model dir's, or a written dataset's), None if it has none."""
    f = Path(folder) / SCENES_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from e


def scenes_for_model(path: str | Path, **given: Any) -> EmojiScenes:
    """The emoji-scenes settings a model was trained on (or a dataset folder was written with: its
    emoji_scenes.json), else those given (None: not given); given ones that differ are refused."""
    cfg = read_scenes_config(path)
    given = {k: v for k, v in given.items() if v is not None}
    if cfg is not None:
        clash = [f"--{k.replace('_', '-')}" for k, v in given.items() if cfg.get(k) != v]
        if clash:
            raise ConfigError(
                f"{' '.join(clash)} differ from {Path(path) / SCENES_FILE}, which fixes the "
                "dataset settings; leave them out"
            )
        return EmojiScenes.from_config(cfg)
    return EmojiScenes(
        given.get("tier", 64),
        given.get("resolution", 64),
        given.get("subject_size"),
        given.get("seed", 0),
    )


def sample_scenes(scenes: EmojiScenes, split: str, limit: int | None, seed: int) -> list[Scene]:
    """Up to `limit` scenes of a split, a seeded sample in canonical order (all of them with limit=None)."""
    todo = scenes.split(split)
    if not todo:
        raise InputError(f"split {split!r} of this emoji tier is empty")
    if limit is not None and limit < len(todo):
        if limit < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        pick = np.sort(np.random.default_rng(seed).choice(len(todo), size=limit, replace=False))
        todo = [todo[int(i)] for i in pick]
    return todo


def evaluate_model(
    pipe: Any,
    scenes: EmojiScenes,
    split: str = "heldout-triples",
    *,
    limit: int | None = 512,
    candidates: int = 4,
    seed: int = 0,
    prompts_per_batch: int = 16,
    progress: Callable[[int, int], object] | None = None,
) -> dict[str, Any]:
    """Judge a `TextToImage` on a split (see the module doc); deterministic for a seed, device and dtype."""
    if candidates < 1:
        raise InputError(f"candidates must be >= 1, got {candidates}")
    if pipe.config.vqgan.resolution != scenes.resolution:
        raise ConfigError(
            f"the model makes {pipe.config.vqgan.resolution}px images, the scenes are {scenes.resolution}px"
        )
    judge = EmojiJudge(scenes)
    todo = sample_scenes(scenes, split, limit, seed)
    captions = [scenes.eval_caption(sc, split) for sc in todo]
    rerank = pipe.scorer is not None
    generated: list[list[Any]] = []
    for start in range(0, len(captions), prompts_per_batch):
        chunk = captions[start : start + prompts_per_batch]
        seeds = [seed + (start + i) * candidates for i in range(len(chunk))]
        out = pipe(chunk, num_images=candidates, seed=seeds, rerank=rerank)
        generated.extend(out)
        if progress is not None:
            progress(min(start + prompts_per_batch, len(captions)), len(captions))
    model = judge.evaluate(
        (im.image, cap) for cap, ims in zip(captions, generated, strict=True) for im in ims
    )
    report: dict[str, Any] = {
        "split": split,
        "captions": len(captions),
        "candidates": candidates,
        "seed": seed,
        "scenes": scenes.config(),
        "model": model,
        "variety": variety([[im.image for im in ims] for ims in generated]),
    }
    if rerank:
        report["reranked"] = judge.evaluate(
            (ims[0].image, cap) for cap, ims in zip(captions, generated, strict=True)
        )
        report["rerank_lift"] = report["reranked"]["all"] - model["all"]
    truth = pipe.encode_images([scenes.render_scene(sc) for sc in todo])
    recon = pipe.decode(truth.to(pipe.device))
    report["ceiling"] = judge.evaluate(zip(recon, captions, strict=True))
    # Floor: each caption's images judged against the next scene's caption (a derangement when
    # the sample has at least two distinct scenes).
    shifted = captions[1:] + captions[:1]
    report["floor"] = judge.evaluate(
        (im.image, other) for other, ims in zip(shifted, generated, strict=True) for im in ims
    )
    ceiling = report["ceiling"]["all"]
    report["ratio_to_ceiling"] = model["all"] / ceiling if ceiling > 0 else None
    return report


# Two images count as different when their mean absolute pixel difference reaches 4 levels of 255.
DISTINCT_LEVELS = 4.0


def distinct_images(images: list[Any]) -> int:
    """How many of the images differ from every earlier distinct one (mean |difference| >= 4/255)."""
    kept: list[np.ndarray] = []
    for im in images:
        arr = np.asarray(im, np.float32)
        if all(np.abs(arr - k).mean() >= DISTINCT_LEVELS for k in kept):
            kept.append(arr)
    return len(kept)


def variety(groups: list[list[Any]]) -> dict[str, float]:
    """Per prompt, the distinct images among its candidates: the mean, and the share with >= 3."""
    counts = [distinct_images(g) for g in groups]
    return {
        "distinct_mean": float(np.mean(counts)),
        "share_at_least_3": float(np.mean([c >= 3 for c in counts])),
    }


METRICS = (
    ("colour", "colour"),
    ("position", "position"),
    ("subject", "subject top-1"),
    ("subject_top5", "subject top-5"),
    ("all", "all"),
)


def accuracy_table(columns: dict[str, dict[str, Any]]) -> list[str]:
    """Lines of a table: one row per judge metric, one column per named set of accuracies."""
    lines = [f"{'':<14}" + "".join(f"{c:>10}" for c in columns)]
    for key, label in METRICS:
        lines.append(f"{label:<14}" + "".join(f"{col[key]:>10.3f}" for col in columns.values()))
    return lines


def format_report(report: dict[str, Any]) -> str:
    """A table of the report's accuracies: model, reranked, ceiling and floor side by side."""
    cols = [c for c in ("model", "reranked", "ceiling", "floor") if c in report]
    lines = [
        f"split {report['split']}: {report['captions']} captions × {report['candidates']} images"
    ]
    lines += accuracy_table({c: report[c] for c in cols})
    if report.get("ratio_to_ceiling") is not None:
        lines.append(f"model / ceiling (all): {report['ratio_to_ceiling']:.3f}")
    if "rerank_lift" in report:
        lines.append(f"CLIP rerank lift (all): {report['rerank_lift']:+.3f}")
    if "variety" in report:
        v = report["variety"]
        lines.append(
            f"distinct images per caption: {v['distinct_mean']:.2f} of {report['candidates']}; "
            f"captions with >= 3 distinct: {v['share_at_least_3']:.3f}"
        )
    return "\n".join(lines)
