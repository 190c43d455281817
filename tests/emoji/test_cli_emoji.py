"""`dallemini dataset emoji` and `dallemini eval`: write the emoji dataset, encode it, judge folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dallemini.emoji.scenes import EmojiScenes, Scene
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dallemini.random_model import create_random_model

    return create_random_model(tmp_path_factory.mktemp("emoji-cli") / "tiny", preset="tiny")


def write(capsys: pytest.CaptureFixture[str], out: Path, *extra: str) -> str:
    code, stdout, err = run_cli(
        capsys, "dataset", "emoji", out, "--tier", "8", "--splits", "heldout-colour", *extra
    )
    assert code == 0, err
    return stdout


def test_dataset_emoji_then_encode(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow.parquet as pq

    from dallemini.data.sources import open_source

    data = tmp_path / "emoji"
    stdout = write(capsys, data)
    assert "heldout-colour: 72 images" in stdout  # 8 subjects x 9 positions of one colour each
    cfg = json.loads((data / "emoji_scenes.json").read_text())
    assert cfg["tier"] == 8 and cfg["resolution"] == 64 and cfg["splits"] == ["heldout-colour"]
    pairs = list(open_source(data).pairs())
    assert len(pairs) == 72 * 2 and pairs[0][1].size == (64, 64)
    assert all(isinstance(c, str) and c for c, _ in pairs)

    tokens = tmp_path / "tokens"
    code, stdout, err = run_cli(capsys, "encode", data, tokens, "--model", tiny, "--device", "cpu")
    assert code == 0, err
    meta = json.loads((tokens / "dataset.json").read_text())
    assert meta["count"] == 144 and not meta["skipped"]["counts"]
    table = pq.read_table(sorted(tokens.glob("part-*.parquet"))[0])
    assert len(table.column("encoding")[0]) == meta["grid_size"] ** 2


def test_dataset_emoji_refuses_and_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "emoji"
    write(capsys, data, "--captions-per-image", "1")
    code, _, err = run_cli(capsys, "dataset", "emoji", data, "--tier", "8")
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
    # --overwrite replaces the whole folder: no files of the old dataset stay behind
    stdout = write(capsys, data, "--overwrite", "--tier", "2", "--resolution", "32")
    assert "heldout-colour: 18 images" in stdout
    assert len(list(data.glob("*.png"))) == 18 and not list(tmp_path.glob(".emoji.tmp-*"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for args, message in [
        ((other, "--overwrite"), "not an emoji dataset"),
        ((tmp_path / "x", "--splits", "train,bogus"), "--splits"),
        ((tmp_path / "x", "--tier", "lots"), "tier"),
        ((tmp_path / "x", "--captions-per-image", "9"), "captions per image"),
    ]:
        code, _, err = run_cli(capsys, "dataset", "emoji", *args)
        assert code == 2 and message in err, (args, err)
    assert (other / "notes.txt").read_text() == "mine" and not (tmp_path / "x").exists()


def _rewrite_captions(folder: Path, captions: list[str]) -> None:
    """Give image i the caption captions[i], in metadata.jsonl and in its .txt file."""
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for row, caption in zip(rows, captions, strict=True):
        row["captions"] = [caption]
        (folder / row["file"]).with_suffix(".txt").write_text(caption + "\n")
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_eval_dataset_folder_and_swapped_captions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "emoji"
    write(capsys, data)
    report_file = tmp_path / "report.json"
    code, stdout, err = run_cli(capsys, "eval", "--images", data, "--json", report_file)
    assert code == 0, err
    for label in ("colour", "position", "subject top-1", "subject top-5", "all", "count"):
        assert label in stdout
    report = json.loads(report_file.read_text())
    assert report["n"] == 72 and report["all"] >= 0.99 and report["kind"] == "dataset"

    # every image judged against another image's caption: "all" collapses
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    caps = [r["captions"][0] for r in rows]
    perm = np.random.default_rng(0).permutation(len(caps))
    perm = np.roll(perm, 1)[np.argsort(perm)]  # a derangement: i -> the next in a random cycle
    assert not (perm == np.arange(len(caps))).any()
    _rewrite_captions(data, [caps[int(j)] for j in perm])
    code, stdout, err = run_cli(capsys, "eval", "--images", data, "--json", "-")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["n"] == 72 and report["all"] < 0.1


def test_eval_generate_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenes = EmojiScenes(8, 32)
    record = {"images": []}
    for i, sc in enumerate(scenes.split("heldout-triples")[:12]):
        name = f"000-{i:03d}.png"
        scenes.render_scene(sc).resize((64, 64)).save(tmp_path / name)  # model output size
        record["images"].append({"file": name, "prompt": scenes.caption(sc), "seed": i})
    (tmp_path / "generation.json").write_text(json.dumps(record))
    args = ("eval", "--images", tmp_path, "--tier", "8", "--resolution", "32", "--json", "-")
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["kind"] == "generate" and report["n"] == 12 and report["all"] >= 0.99
    assert report["scenes"]["tier"] == 8 and report["scenes"]["resolution"] == 32


def test_eval_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "emoji"
    write(capsys, data)
    empty = tmp_path / "empty"
    empty.mkdir()
    cats = tmp_path / "cats"
    cats.mkdir()
    (cats / "generation.json").write_text(
        json.dumps({"images": [{"file": "a.png", "prompt": "a cat"}]})
    )
    EmojiScenes(8).render_scene(Scene(EmojiScenes(8).names[0], "red", "top")).save(cats / "a.png")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "generation.json").write_text(json.dumps({"images": []}))
    cases = [
        ((), "--images"),
        (("--images", tmp_path / "missing"), "does not exist"),
        (("--images", empty), "metadata.jsonl"),
        (("--images", nothing), "no captioned images"),
        (("--images", cats), "emoji-scenes caption"),
        (("--images", data, "--tier", "64"), "--tier"),
        (("--images", cats, "--tier", "none"), "tier"),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, "eval", *args)
        assert code == 2, (args, code, err)
        assert message in err and "Traceback" not in err, (args, err)
    (data / "000003.png").unlink()
    code, _, err = run_cli(capsys, "eval", "--images", data)
    assert code == 2 and "missing" in err
