"""The `dallemini` command: create, generate, convert, info, and exit status 2 with a message for user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dallemini


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dallemini.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "tiny"
    r = run("create", d, "--preset", "tiny")
    assert r.returncode == 0, r.stderr
    return d


def test_generate_writes_images_grid_and_record(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run(
        "generate",
        "--model",
        tiny,
        "--num-images",
        "3",
        "--seed",
        "5",
        "--top-k",
        "8",
        "--out",
        out,
        "pizza on a blue background, top left",
        "a cat",
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "generation.json").read_text())
    assert [i["seed"] for i in rec["images"]] == [5, 6, 7, 8, 9, 10]
    assert rec["settings"]["top_k"] == 8
    assert Image.open(out / "grid-000.png").size == (128, 128)  # 3 images of 64 px on a 2x2 grid
    assert Image.open(out / "001-002.png").size == (64, 64)
    assert rec["vqgan_dtype"] == "float32"
    # each PNG carries its prompt, seed and settings as text chunks
    with Image.open(out / "001-002.png") as im:
        text = im.text
    assert (text["prompt"], text["seed"], text["model"]) == ("a cat", "10", str(tiny))
    assert (text["top_k"], text["dallemini"]) == ("8", dallemini.__version__)
    assert {"temperature", "top_p", "condition_scale", "Software"} <= set(text)
    params = json.loads(text["parameters"])
    assert params["seed"] == 10 and params["top_k"] == 8 and params["prompt"] == "a cat"
    assert params["score"] is None and params["rerank"] is False  # the tiny model has no CLIP
    with Image.open(out / "grid-001.png") as im:
        assert json.loads(im.text["seeds"]) == [8, 9, 10] and im.text["prompt"] == "a cat"


def test_generate_vqgan_dtype(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bf16"
    args = ("generate", "--model", tiny, "-n", "1", "--seed", "0", "--out", out, "a cat")
    code, err = run_here(capsys, *args, "--vqgan-dtype", "bfloat16", "--device", "cpu")
    assert code == 0, err
    assert json.loads((out / "generation.json").read_text())["vqgan_dtype"] == "bfloat16"
    code, err = run_here(capsys, *args, "--overwrite", "--vqgan-dtype", "int8")
    assert code == 2 and "int8" in err


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """Run the CLI's main() in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    from dallemini.cli import main

    old = sys.argv
    sys.argv = ["dallemini", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def run_here(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    """run_cli without stdout: (exit status, stderr)."""
    code, _, err = run_cli(capsys, *args)
    return code, err


def test_user_errors_exit_2_with_a_message(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (("generate", "--model", tiny, ""), "empty prompt"),
        (("generate", "--model", tiny), "no prompt"),
        (("generate", "--model", tmp_path / "missing", "a cat"), "does not exist"),
        (("generate", "--model", tiny, "--temperature", "0", "a cat"), "temperature"),
        (("generate", "--model", tiny, "-n", "0", "a cat"), "--num-images (-n) must be"),
        (("generate", "--model", tiny, "--device", "cuda:7", "a cat"), "cuda"),
        (("generate", "--model", tiny, "--dtype", "int4", "a cat"), "dtype"),
        (("generate", "--model", tiny, "--bogus", "a cat"), "No such option"),
        (("convert", tiny, tiny), "already exists"),
    ]
    for args, message in cases:
        code, err = run_here(capsys, *args)
        assert code == 2, (args, code, err)
        assert message in err, (args, err)
        assert "Traceback" not in err, (args, err)
    r = run("generate", "--model", tiny, "")  # and once through a real process
    assert r.returncode == 2 and "empty prompt" in r.stderr and "Traceback" not in r.stderr


def test_convert_and_info(tiny: Path, tmp_path: Path) -> None:
    r = run("convert", tiny, tmp_path / "copy")
    assert r.returncode == 0, r.stderr
    r = run("info", tmp_path / "copy")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "native" and info["config"]["bart"]["d_model"] == 64


def test_encode_folder_into_shards(tiny: Path, tmp_path: Path) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"a picture number {i}")
    (src / "bad.png").write_bytes(b"not an image")
    (src / "bad.txt").write_text("broken")
    out = tmp_path / "enc"
    r = run("encode", src, out, "--model", tiny, "--shard-size", "2", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "dataset.json").read_text())
    assert (
        meta["count"] == 5
        and meta["grid_size"] == 4
        and meta["skipped"]["counts"] == {"undecodable": 1}
    )
    table = pq.read_table(sorted(out.glob("part-*.parquet"))[0])
    assert {"caption", "encoding"} <= set(table.column_names) and len(
        table.column("encoding")[0]
    ) == 16
    r = run("encode", src, out, "--model", tiny, "--shard", "3/2")
    assert r.returncode == 2 and "0 <= I < N" in r.stderr


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from tests.models.test_clip import save_tiny_hf_clip

    return save_tiny_hf_clip(tmp_path_factory.mktemp("hf") / "tiny-clip")


def _init_image(path: Path) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize((96, 80), Image.Resampling.NEAREST).save(path)
    return path


def test_generate_reranks_completes_and_chunks(
    tiny: Path, hf_clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dallemini.pipeline import TextToImage

    img = _init_image(tmp_path / "init.png")
    out = tmp_path / "out"
    prompts = ["a red cat", "blue"]
    flags = ("--seed", "2", "-n", "3", "--init-image", img, "--keep-rows", "1")
    gen = ("generate", "--model", tiny, "--clip", hf_clip)
    code, err = run_here(capsys, *gen, "--max-batch", "2", *flags, "--out", out, *prompts)
    assert code == 0, err
    assert "sampling" not in err  # no progress bar when stderr is not a terminal
    rec = json.loads((out / "generation.json").read_text())
    assert rec["rerank"] is True and rec["clip"] == str(hf_clip) and rec["max_batch"] == 2
    assert rec["init_image"] == {"file": str(img), "size": [96, 80], "keep_rows": 1}
    # the files are the API's images, best first: the same call through TextToImage
    pipe = TextToImage.from_pretrained(tiny, device="cpu", clip=hf_clip)
    expected = pipe(prompts, num_images=3, seed=2, init_image=img, keep_rows=1)
    listed = iter(rec["images"])
    for i, group in enumerate(expected):
        for j, r in enumerate(group):
            entry = next(listed)
            assert entry["file"] == f"{i:03d}-{j:03d}.png"
            assert (entry["prompt"], entry["seed"]) == (r.prompt, r.seed)
            assert entry["score"] == pytest.approx(r.score)
            with Image.open(out / entry["file"]) as saved:  # decoded in other groups: a level off
                diff = np.abs(np.asarray(saved, np.int16) - np.asarray(r.image, np.int16))
                assert diff.max() <= 1 and diff.mean() < 0.05
        scores = [r.score for r in group]
        assert scores == sorted(scores, reverse=True)

    # --no-rerank: seed order, no scores
    code, err = run_here(capsys, *gen, "--no-rerank", *flags, "--out", tmp_path / "plain", *prompts)
    assert code == 0, err
    rec = json.loads((tmp_path / "plain" / "generation.json").read_text())
    assert rec["rerank"] is False
    assert [(i["seed"], i["score"]) for i in rec["images"]] == [(s, None) for s in range(2, 8)]


def test_generate_progress_bar_on_a_terminal(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    args = ("generate", "--model", tiny, "-n", "3", "--max-batch", "2", "--out", tmp_path)
    code, err = run_here(capsys, *args, "a cat")
    assert code == 0, err
    assert "sampling" in err and "32/32" in err  # two chunks of 16 decoding steps


def test_generate_flag_errors(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = _init_image(tmp_path / "init.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    gen = ("generate", "--model", tiny, "--out", tmp_path / "out")
    cases = [
        ((*gen, "--init-image", img, "--keep-rows", "5", "a cat"), "from 0 to 4"),
        ((*gen, "--init-image", img, "--keep-rows", "-1", "a cat"), "from 0 to 4"),
        ((*gen, "--keep-rows", "1", "a cat"), "go together"),
        ((*gen, "--init-image", img, "a cat"), "go together"),
        ((*gen, "--init-image", tmp_path / "nope.png", "--keep-rows", "1", "a cat"), "cannot read"),
        ((*gen, "--init-image", text, "--keep-rows", "1", "a cat"), "cannot read image"),
        ((*gen, "--clip", tmp_path / "no-clip", "a cat"), "does not exist"),
        ((*gen, "--clip", tmp_path, "a cat"), "holds no CLIP"),
        ((*gen, "--max-batch", "0", "a cat"), "--max-batch"),
    ]
    for args, message in cases:
        code, err = run_here(capsys, *args)
        assert code == 2, (args, code, err)
        assert message in err, (args, err)
        assert "Traceback" not in err, (args, err)
    code, err = run_here(capsys, *gen, "--init-image", img, "--keep-rows", "0", "a cat")
    assert code == 0 and "plain generation" in err


def test_generate_without_model_uses_the_builtin_dir(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    import dallemini.pipeline as pipeline

    monkeypatch.setattr(pipeline, "DEFAULT_MODEL_DIR", tmp_path / "builtin")
    args = ("generate", "-n", "1", "--seed", "0", "--out", tmp_path / "out", "a cat")
    code, err = run_here(capsys, *args)
    assert code == 2 and "has no built-in model" in err and "--model DIR" in err
    shutil.copytree(tiny, tmp_path / "builtin")
    code, err = run_here(capsys, *args, "--device", "cpu")
    assert code == 0, err
    assert "built-in emoji-scenes model" in err
    record = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert record["model"] == str(tmp_path / "builtin")
    assert record["threads"] >= 1  # the thread count it ran with
    assert pipeline.load_pipeline(device="cpu").config.bart is not None


def test_generate_keeps_an_earlier_run(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    gen = ("generate", "--model", tiny, "--device", "cpu", "--seed", "0", "--out", out)
    code, err = run_here(capsys, *gen, "--n", "2", "a cat", "a dog")  # --n: -n's old spelling
    assert code == 0, err
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 2 * 2 + 2 + 1 + 1
    # a second run into the same folder is refused before the model loads: nothing changes
    code, err = run_here(capsys, *gen, "-n", "1", "a bird")
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: --out {out} already holds an earlier run's images and generation.json: give "
        "another --out folder, or --overwrite to replace them"
    ]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite replaces the earlier run's files (none of them is left) and keeps the others
    code, err = run_here(capsys, *gen, "--num-images", "1", "--overwrite", "a bird")
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000-000.png", "generation.json", "grid-000.png", "notes.txt"]
    record = json.loads((out / "generation.json").read_text())
    assert [i["prompt"] for i in record["images"]] == ["a bird"]
    assert (out / "notes.txt").read_text() == "mine"
    # a folder that holds other files only is no earlier run
    others = tmp_path / "others"
    others.mkdir()
    (others / "photo.png").write_bytes(b"")
    code, err = run_here(capsys, *gen[:-1], others, "-n", "1", "a cat")
    assert code == 0, err
    assert (others / "000-000.png").is_file() and (others / "photo.png").read_bytes() == b""


def test_generate_names_the_words_the_model_does_not_know(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("generate", "-n", "1", "--seed", "0", "--device", "cpu", "--out", tmp_path / "a")
    code, err = run_here(capsys, *args, "an armchair in the shape of an avocado")
    assert code == 0, err
    assert "note: the built-in model does not know: armchair, shape" in err
    code, err = run_here(
        capsys, *args[:-1], tmp_path / "b", "a kitty on a navy background, top left"
    )
    assert code == 0, err
    assert "note: the built-in model reads 'kitty' as 'cat', 'navy' as 'blue'" in err
    assert "does not know" not in err
