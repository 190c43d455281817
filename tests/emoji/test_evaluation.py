"""`evaluate_model` / `dallemini eval --model`: held-out prompt accuracy beside ceiling, floor and rerank lift."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dallemini.emoji.evaluation import SCENES_FILE, evaluate_model, sample_scenes, scenes_for_model
from dallemini.emoji.judge import EmojiJudge
from dallemini.emoji.scenes import EmojiScenes
from dallemini.errors import ConfigError
from dallemini.pipeline import TextToImage
from tests.test_cli import run_here
from tests.test_pipeline import tiny_dir, with_builtin_clip  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def scenes() -> EmojiScenes:
    return EmojiScenes(tier=8, resolution=64)


def test_report_is_consistent_and_deterministic(
    with_builtin_clip: Path,  # noqa: F811
    scenes: EmojiScenes,
) -> None:
    pipe = TextToImage.from_pretrained(with_builtin_clip, device="cpu")
    calls: list[tuple[int, int]] = []
    report = evaluate_model(
        pipe,
        scenes,
        "heldout-colour",
        limit=6,
        candidates=2,
        prompts_per_batch=4,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls == [(4, 6), (6, 6)]
    assert report["captions"] == 6 and report["model"]["n"] == 12 and report["reranked"]["n"] == 6
    assert report["floor"]["n"] == 12 and report["ceiling"]["n"] == 6
    for part in ("model", "reranked", "ceiling", "floor"):
        assert 0.0 <= report[part]["all"] <= report[part]["colour"] <= 1.0
    assert report["rerank_lift"] == pytest.approx(
        report["reranked"]["all"] - report["model"]["all"]
    )
    again = evaluate_model(pipe, scenes, "heldout-colour", limit=6, candidates=2)
    assert again["model"] == report["model"] and again["ceiling"] == report["ceiling"]

    # The ceiling is the judge on the VQGAN's reconstructions of the true images, computed here directly.
    todo = sample_scenes(scenes, "heldout-colour", 6, 0)
    captions = [scenes.sample_captions(sc, 1, 0)[0] for sc in todo]
    recon = pipe.decode(pipe.encode_images([scenes.render_scene(sc) for sc in todo]))
    direct = EmojiJudge(scenes).evaluate(zip(recon, captions, strict=True))
    assert direct == report["ceiling"]


def test_scene_settings_come_from_the_model_dir(tmp_path: Path) -> None:
    (tmp_path / SCENES_FILE).write_text(json.dumps(EmojiScenes(8, 64, seed=3).config()))
    assert scenes_for_model(tmp_path).seed == 3
    with pytest.raises(ConfigError, match="differ"):
        scenes_for_model(tmp_path, seed=4)
    assert scenes_for_model(tmp_path / "elsewhere", tier=8, resolution=32).resolution == 32


def test_cli_eval_model(
    tiny_dir: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "report.json"
    args = ["eval", "--model", tiny_dir, "--tier", "8", "--split", "heldout-triples"]
    code, err = run_here(capsys, *args, "--limit", "3", "--candidates", "1", "--json", out)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["captions"] == 3 and "reranked" not in report  # the tiny model has no CLIP
    assert set(report) >= {"model", "ceiling", "floor", "ratio_to_ceiling"}
    code, err = run_here(capsys, *args, "--images", tmp_path)
    assert code == 2 and "not both" in err
    code, err = run_here(capsys, *args, "--resolution", "32")
    assert code == 2 and "32px" in err
