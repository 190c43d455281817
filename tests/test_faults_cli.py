"""Faults from "No lost work and no tracebacks": Ctrl-C, bad options caught before loading, busy ports,
empty sources, blank and non-UTF-8 captions, the served OpenAPI schema."""

from __future__ import annotations

import io
import json
import logging
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from dallemini.data.sources import open_source
from tests.test_cli import run_here


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dallemini.random_model import create_random_model

    return create_random_model(tmp_path_factory.mktemp("faults") / "tiny", preset="tiny")


# --- captions ------------------------------------------------------------------------------------


def test_blank_caption_file_is_an_empty_caption_not_a_missing_one(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    (tmp_path / "image.txt").write_text("  \n\t\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "nocap.png")
    src = open_source(tmp_path)
    assert list(src) == []
    assert src.stats.counts == {"empty_caption": 1, "missing_caption": 1}
    assert src.stats.examples["empty_caption"] == ["image.png"]


def test_latin1_caption_keeps_its_text(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café crème".encode("latin-1"))
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_bytes("\ufeffnaïve".encode())  # UTF-8 with a BOM
    with tarfile.open(tmp_path.parent / "shard.tar", "w") as tf:
        for name, data in [("k.png", (tmp_path / "a.png").read_bytes()), ("k.txt", b"caf\xe9")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with caplog.at_level(logging.WARNING, logger="dallemini.data.sources"):
        folder = {s.key: s.captions for s in open_source(tmp_path, normalizer=None)}
        tar = [s.captions for s in open_source(tmp_path.parent / "shard.tar", normalizer=None)]
    assert folder == {"a.png": ("café crème",), "b.png": ("naïve",)}
    assert tar == [("café",)]
    assert "a.txt: caption is not UTF-8" in caplog.text and "b.txt" not in caplog.text


# --- encode ----------------------------------------------------------------------------------


def test_encode_of_an_empty_folder_fails_before_loading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no images here")
    missing_model = tmp_path / "no-model"  # never read: the source is checked first
    args = ("encode", tmp_path / "empty", tmp_path / "enc", "--model", missing_model)
    code, err = run_here(capsys, *args)
    assert code == 2, err
    assert err.strip().splitlines() == [
        f"error: {tmp_path / 'empty'} holds no images: there is nothing to encode"
    ]
    assert not (tmp_path / "enc").exists()


def test_encode_dataset_refuses_empty_sources(tmp_path: Path) -> None:
    from dallemini.config import VQGAN_PRESETS
    from dallemini.data.encode import encode_dataset
    from dallemini.errors import InputError
    from dallemini.models.vqgan import VQGAN

    vq = VQGAN(VQGAN_PRESETS["tiny"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        encode_dataset(tmp_path / "empty", tmp_path / "enc", vq, progress=False)
    with tarfile.open(tmp_path / "none.tar", "w"):
        pass
    with pytest.raises(InputError, match="holds no records"):
        encode_dataset(tmp_path / "none.tar", tmp_path / "enc2", vq, progress=False)


# --- serve -----------------------------------------------------------------------------------


def test_openapi_declares_security_only_with_a_key_and_documents_health_503(tiny: Path) -> None:
    from fastapi.testclient import TestClient

    from dallemini.pipeline import TextToImage
    from dallemini.serve import ServeSettings, create_app

    pipe = TextToImage.from_pretrained(tiny, device="cpu")
    for key in (None, "s3cret"):
        with TestClient(create_app(pipe, ServeSettings(api_key=key))) as client:
            spec = client.get("/openapi.json").json()
            ops = [op for path in spec["paths"].values() for op in path.values()]
            secured = [op for op in ops if op.get("security")]
            with_401 = [op for op in ops if "401" in op["responses"]]
            schemes = spec.get("components", {}).get("securitySchemes")
            if key is None:
                assert schemes is None and secured == [] and with_401 == []
            else:
                assert set(schemes) == {"HTTPBearer", "APIKeyHeader"}
                assert len(secured) == len(with_401) == 6  # every route but /health
            health = spec["paths"]["/health"]["get"]["responses"]
            assert {"200", "503"} <= set(health)
            client.app.state.batcher.stop_accepting()  # shutting down: the documented 503
            assert client.get("/health").status_code == 503


def test_serve_on_a_busy_port_says_so_in_one_line_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # the model does not exist: the port is checked first, and nothing says "serving"
        args = ("serve", "--model", tmp_path / "no-model", "--port", str(port))
        code, err = run_here(capsys, *args)
    assert code == 2, err
    assert err.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is already in use: stop what uses it or pick another "
        "--port"
    ]


# --- generate ----------------------------------------------------------------------------------


def _as_if_from_a_terminal() -> None:
    """Ctrl-C's default action in the child, even when these tests run in a background job (SIG_IGN)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_generate_keeps_finished_images_and_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prompts = [f"strawberry on a blue background, top {side}" for side in ("left", "right")] * 500
    flags = ("-n", "2", "--max-batch", "2", "--seed", "0", "--device", "cpu")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dallemini.cli", "generate", *flags, "--out", str(out), *prompts],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_if_from_a_terminal,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.png")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no image was written"
            time.sleep(0.02)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    record = json.loads((out / "generation.json").read_text())
    kept = len(record["images"])
    assert last == f"interrupted: kept {kept} finished images in {out}"
    assert 0 < kept < 2 * len(prompts)
    # every file is whole, and generation.json lists exactly the images that were written
    files = sorted(p.name for p in out.iterdir())
    images = sorted(f for f in files if not f.startswith(("grid-", "generation")))
    assert images == sorted(i["file"] for i in record["images"])
    assert files == sorted(
        images + [f"grid-{i:03d}.png" for i in range(kept // 2)] + ["generation.json"]
    )
    for name in (f for f in files if f.endswith(".png")):
        with Image.open(out / name) as im:
            im.load()  # a cut-off PNG raises here
            assert im.format == "PNG"
    seeds = [i["seed"] for i in record["images"]]  # each prompt's pair best first (CLIP)
    assert [sorted(seeds[k : k + 2]) for k in range(0, kept, 2)] == [
        [k, k + 1] for k in range(0, kept, 2)
    ]
    assert len(stdout.splitlines()) == kept // 2  # one line per finished prompt


def test_ctrl_c_in_process_keeps_finished_prompts(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dallemini.pipeline import TextToImage

    calls, stop_at = [], [3]
    real = TextToImage.__call__

    def interrupted(self: TextToImage, *args: object, **kw: object) -> object:
        calls.append(args[0])
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return real(self, *args, **kw)

    monkeypatch.setattr(TextToImage, "__call__", interrupted)
    out = tmp_path / "out"
    gen = ("generate", "--model", tiny, "-n", "3", "--max-batch", "6", "--seed", "4")
    code, err = run_here(capsys, *gen, "--out", out, "a", "b", "c", "d", "e", "f")
    assert code == 130
    assert err.strip().splitlines() == [f"interrupted: kept 12 finished images in {out}"]
    assert calls == [["a", "b"], ["c", "d"], ["e", "f"]]  # whole prompts, <= --max-batch images
    record = json.loads((out / "generation.json").read_text())
    assert [i["seed"] for i in record["images"]] == list(range(4, 16))
    assert len(list(out.glob("*.png"))) == 12 + 4
    # interrupted before any image: nothing is written, and it says so
    calls.clear()
    stop_at[0] = 1
    code, err = run_here(capsys, *gen, "--max-batch", "1", "--out", tmp_path / "o2", "a", "b", "c")
    assert code == 130 and not (tmp_path / "o2").exists()
    assert err.strip().splitlines() == ["interrupted: no image had finished: nothing was written"]


def test_ctrl_c_while_loading_exits_130(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dallemini.pipeline import TextToImage

    def interrupted(*args: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(TextToImage, "from_pretrained", interrupted)
    code, err = run_here(capsys, "generate", "--model", tiny, "--out", tmp_path / "o", "a cat")
    assert code == 130 and err.strip().splitlines() == ["interrupted"]
    assert not (tmp_path / "o").exists()


def test_bad_options_fail_before_the_model_loads(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dallemini.pipeline import TextToImage

    def must_not_load(*args: object, **kw: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(TextToImage, "from_pretrained", must_not_load)
    (tmp_path / "a-file").write_text("not a folder")
    img = tmp_path / "init.png"
    Image.new("RGB", (32, 32)).save(img)
    gen = ("generate", "--model", tiny)
    cases = [
        ((*gen, "--seed", "-1", "a cat"), "--seed must be from 0 to"),
        ((*gen, "--seed", str(2**63), "a cat"), "--seed must be from 0 to"),
        ((*gen, "--seed", str(2**63 - 2**20), "a cat"), "--seed must be from 0 to"),
        ((*gen, "--temperature", "0", "a cat"), "temperature must be a number > 0"),
        ((*gen, "--temperature", "nan", "a cat"), "temperature must be a number > 0"),
        ((*gen, "--top-p", "1.5", "a cat"), "top_p must be a number > 0 and <= 1"),
        ((*gen, "--top-p", "0", "a cat"), "top_p must be a number > 0 and <= 1"),
        ((*gen, "--top-k", "-2", "a cat"), "top_k must be a number >= 0 and <= 1000000"),
        ((*gen, "--condition-scale", "-1", "a cat"), "condition_scale must be a number >= 0"),
        ((*gen, "--condition-scale", "nan", "a cat"), "condition_scale must be a number >= 0"),
        ((*gen, "--temperature", "inf", "a cat"), "temperature must be a number > 0"),
        ((*gen, "--init-image", img, "--keep-rows", "-1", "a cat"), "--keep-rows must be from 0"),
        ((*gen, "--init-image", img, "--keep-rows", "5", "a cat"), "from 0 to 4 (the token grid"),
        ((*gen, "--out", tmp_path / "a-file", "a cat"), "is not a folder"),
        ((*gen, "--out", tmp_path / "a-file" / "sub", "a cat"), "is a file"),
        # a model whose grid is not known before loading: only the lower bound is checked early
        (
            ("generate", "--model", tmp_path / "x", "--init-image", img, "--keep-rows", "-3", "a"),
            "--keep-rows must be from 0 to the token grid's side, got -3",
        ),
    ]
    for args, message in cases:
        code, err = run_here(capsys, *args)
        assert code == 2, (args, code, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            args,
            err,
        )
    # the largest seed a run can use is accepted (here: the model load is what stops it)
    with pytest.raises(AssertionError, match="loaded"):
        run_here(capsys, *gen, "--seed", str(2**63 - 2**20 - 1), "a cat")
