"""The `dallemini` command: create, generate, convert, info, and exit status 2 with a message for user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


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
        "-n",
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


def run_here(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    """Run the CLI's main() in this process (no interpreter start-up): (exit status, stderr)."""
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
    return code, capsys.readouterr().err


def test_user_errors_exit_2_with_a_message(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (("generate", "--model", tiny, ""), "empty prompt"),
        (("generate", "--model", tiny), "no prompt"),
        (("generate", "a cat"), "no model"),
        (("generate", "--model", tmp_path / "missing", "a cat"), "does not exist"),
        (("generate", "--model", tiny, "--temperature", "0", "a cat"), "temperature"),
        (("generate", "--model", tiny, "-n", "0", "a cat"), "--n"),
        (("generate", "--model", tiny, "--device", "cuda:7", "a cat"), "cuda"),
        (("generate", "--model", tiny, "--dtype", "int8", "a cat"), "dtype"),
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
