"""Faults from "No lost work and no tracebacks": Ctrl-C, bad options caught before loading, busy ports,
empty sources, blank and non-UTF-8 captions, the served OpenAPI schema."""

from __future__ import annotations

import io
import logging
import socket
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from dallemini.data.sources import open_source

from .test_cli import run_here


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
                assert len(secured) == len(with_401) == 5  # every route but /health
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
