"""Hub names: download only what a model needs from a (fake, 127.0.0.1) Hub, convert once, then
run without the network; offline use, pinned revisions, errors, broken downloads, corrupt caches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from dallemini.checkpoints import hub, load_parts
from dallemini.checkpoints.safetensors_io import read_header
from dallemini.errors import CheckpointError
from dallemini.pipeline import TextToImage
from tests.fakehub import FakeHub, hub_offline
from tests.published import DALLE_MINI, MIN_DALLE, VQGAN_REPO, publish

PROMPT = "a red cat on the hot dog stand"
MINI_FILES = {
    "config.json",
    "flax_model.msgpack",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "enwiki-words-frequency.txt",
    "README.md",
}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh dallemini cache (converted models) for this test and its child processes."""
    root = tmp_path / "dallemini-cache"
    monkeypatch.setenv("DALLEMINI_CACHE", str(root))
    return root


@pytest.fixture
def no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub waits 1-8 s between retries of a dropped download: not in tests."""
    from huggingface_hub import file_download

    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda s: None))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`dallemini ARGS` in a child process (it inherits the fake Hub's environment)."""
    cmd = [sys.executable, "-c", "from dallemini.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=dict(os.environ))


def _same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    got = model.state_dict()
    return all(torch.equal(got[k].float(), v.float()) for k, v in state.items())


def test_short_name_downloads_only_what_it_needs_then_nothing(
    fake_hub: FakeHub, cache: Path
) -> None:
    published = publish(fake_hub, repos=(DALLE_MINI, VQGAN_REPO))
    pipe = TextToImage.from_pretrained("mini", device="cpu")
    assert set(fake_hub.file_requests(DALLE_MINI)) == MINI_FILES  # no tokenizer_config.json, ...
    assert set(fake_hub.file_requests(VQGAN_REPO)) == {
        "config.json",
        "flax_model.msgpack",
        "README.md",
    }
    want = published[DALLE_MINI].models["mini"].states["bart"]
    assert _same_state(pipe.bart, want)
    assert _same_state(pipe.vqgan, published[VQGAN_REPO].models["vqgan"].states["vqgan"])
    # the original's word list drives the hashtag splitter
    assert pipe.text.normalizer("#hotdogstand") == " hot dog stand"

    fake_hub.clear_requests()
    again = TextToImage.from_pretrained("mini", device="cpu")
    assert fake_hub.requests == []  # the converted cache: no request at all
    assert _same_state(again.bart, want)
    folder = hub.local_path("mini")
    assert folder.parent == cache / "models"
    source = json.loads((folder / "source.json").read_text())
    assert [o["repo"] for o in source["origins"]] == [DALLE_MINI, VQGAN_REPO]
    assert source["origins"][0]["commit"] == published[DALLE_MINI].sha
    card = (folder / "MODEL_CARD.md").read_text()
    assert "apache-2.0" in card and DALLE_MINI in card


def test_generate_from_the_hub_equals_converting_by_hand(
    fake_hub: FakeHub, cache: Path, tmp_path: Path
) -> None:
    published = publish(fake_hub, repos=(DALLE_MINI, VQGAN_REPO))
    by_hand = tmp_path / "by-hand"
    for repo, sub in ((DALLE_MINI, "dalle"), (VQGAN_REPO, "vqgan")):
        (by_hand / sub).mkdir(parents=True)
        for name, data in published[repo].files.items():
            (by_hand / sub / name).write_bytes(data)
    args = ["-n", "2", "--seed", "3", "--no-rerank", PROMPT]
    r = _cli(
        "convert",
        str(by_hand / "dalle"),
        str(tmp_path / "converted"),
        "--vqgan",
        str(by_hand / "vqgan"),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    r1 = _cli("generate", "--model", str(tmp_path / "converted"), "--out", "a", *args, cwd=tmp_path)
    r2 = _cli("generate", "--model", "mini", "--out", "b", *args, cwd=tmp_path)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    for name in ("000-000.png", "000-001.png"):
        # same pixels (the files' text chunks name the model as it was given)
        with Image.open(tmp_path / "a" / name) as a, Image.open(tmp_path / "b" / name) as b:
            assert a.tobytes() == b.tobytes()


def test_offline_uses_the_caches_and_fails_clearly_without_them(
    fake_hub: FakeHub, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(fake_hub, repos=(DALLE_MINI, VQGAN_REPO))
    hub_offline(monkeypatch, True)
    r = _cli("generate", "--model", "mini", "-n", "1", PROMPT, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "dalle-mini/dalle-mini" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert "flax_model.msgpack" in lines[0]
    assert fake_hub.requests == []

    hub_offline(monkeypatch, False)
    hub.local_path("mini")  # downloads and converts
    hub_offline(monkeypatch, True)
    fake_hub.clear_requests()
    monkeypatch.setenv("DALLEMINI_CACHE", str(tmp_path / "other-cache"))  # convert again, offline
    assert (hub.local_path("mini") / "bart.safetensors").is_file()
    assert fake_hub.requests == []


def test_pinned_revisions_and_download_refreshes(
    fake_hub: FakeHub, cache: Path, tmp_path: Path
) -> None:
    old = publish(fake_hub, repos=(DALLE_MINI, VQGAN_REPO))
    first = load_parts("mini")
    new = publish(fake_hub, seed=7, repos=(DALLE_MINI,))
    assert new[DALLE_MINI].sha != old[DALLE_MINI].sha
    # cached names keep answering without the network until `download` refreshes them
    head = "decoder.lm_head.weight"
    assert torch.equal(load_parts("mini").states["bart"][head], first.states["bart"][head])
    pinned = load_parts(f"{DALLE_MINI}@{old[DALLE_MINI].sha}")
    assert torch.equal(
        pinned.states["bart"][head], old[DALLE_MINI].models["mini"].states["bart"][head]
    )

    r = _cli("download", "mini", "--dtype", "bfloat16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    folder = Path(r.stdout.strip().splitlines()[-1])
    header, _ = read_header(folder / "bart.safetensors")
    assert {e["dtype"] for k, e in header.items() if k != "__metadata__"} <= {"BF16", "I64"}
    fresh = load_parts("mini", dtype=torch.bfloat16)
    newer = new[DALLE_MINI].models["mini"].states["bart"][head]
    assert torch.equal(fresh.states["bart"][head], newer.bfloat16())
    info = _cli("info", "mini", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    shown = json.loads(info.stdout)
    assert shown["source"]["origins"][0]["commit"] == new[DALLE_MINI].sha
    assert shown["source"]["dtype"] == "bfloat16"


def test_info_never_downloads(fake_hub: FakeHub, cache: Path, tmp_path: Path) -> None:
    publish(fake_hub, repos=(DALLE_MINI, VQGAN_REPO))
    r = _cli("info", "mini", cwd=tmp_path)
    assert r.returncode == 2 and "dallemini download mini" in r.stderr
    assert fake_hub.requests == []


def test_unknown_repo_is_one_line_and_exit_2(
    fake_hub: FakeHub, cache: Path, tmp_path: Path
) -> None:
    r = _cli("generate", "--model", "nobody/nothing", "-n", "1", PROMPT, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/nothing" in lines[0] and "neither a local path" in lines[0]


def test_dropped_connection_fails_clearly_and_a_later_run_completes(
    fake_hub: FakeHub, cache: Path, no_retry_wait: None, capsys: pytest.CaptureFixture
) -> None:
    from dallemini.cli import main

    published = publish(fake_hub, repos=(DALLE_MINI, VQGAN_REPO))
    fake_hub.drop_always["flax_model.msgpack"] = 100
    with pytest.raises(SystemExit) as exit_info:
        sys.argv = ["dallemini", "download", "mini"]
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "download failed" in err[0] and "again" in err[0], err
    fake_hub.drop_always.clear()
    parts = load_parts("mini")
    want = published[DALLE_MINI].models["mini"].states["bart"]
    assert all(torch.equal(parts.states["bart"][k], v) for k, v in want.items())


def test_corrupt_caches_are_detected_not_loaded(
    fake_hub: FakeHub, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = publish(fake_hub, repos=(DALLE_MINI, VQGAN_REPO))
    want = published[DALLE_MINI].models["mini"].states["bart"]
    folder = hub.local_path("mini")

    # a flipped byte in the converted model: converted again from the downloaded files
    weights = folder / "bart.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    fake_hub.clear_requests()
    parts = load_parts("mini")
    assert all(torch.equal(parts.states["bart"][k], v) for k, v in want.items())
    assert fake_hub.file_requests() == []

    # a flipped byte in a downloaded blob: fetched again before converting
    monkeypatch.setenv("DALLEMINI_CACHE", str(tmp_path / "fresh"))
    snapshot = Path(os.environ["HF_HUB_CACHE"]) / "models--dalle-mini--dalle-mini" / "snapshots"
    blob = next(snapshot.glob("*/flax_model.msgpack")).resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    fake_hub.clear_requests()
    parts = load_parts("mini")
    assert fake_hub.file_requests(DALLE_MINI) == ["flax_model.msgpack"]
    assert all(torch.equal(parts.states["bart"][k], v) for k, v in want.items())


def test_token_is_sent(fake_hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publish(fake_hub, repos=(VQGAN_REPO,))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.local_path(VQGAN_REPO)
    assert fake_hub.request_headers
    assert all(h.get("authorization") == "Bearer hf_secret" for h in fake_hub.request_headers)


def test_min_dalle_and_clip_short_names(fake_hub: FakeHub, cache: Path) -> None:
    published = publish(fake_hub, repos=(MIN_DALLE, "openai/clip-vit-base-patch32"))
    pipe = TextToImage.from_pretrained("min-dalle-mini", device="cpu", clip="clip")
    assert set(fake_hub.file_requests(MIN_DALLE)) == {
        "encoder_mini.pt",
        "decoder_mini.pt",
        "detoker.pt",
        "vocab_mini.json",
        "merges_mini.txt",
        "README.md",
    }
    clip_files = set(fake_hub.file_requests("openai/clip-vit-base-patch32"))
    assert "model.safetensors" in clip_files and "pytorch_model.bin" not in clip_files
    assert type(pipe.scorer).__name__ == "HFClipScorer"
    models = published[MIN_DALLE].models
    mini = next(m for name, m in models.items() if "mini" in name)
    assert _same_state(pipe.bart, mini.states["bart"])
    assert "mit" in (hub.local_path("min-dalle-mini") / "MODEL_CARD.md").read_text()


def test_names_and_paths() -> None:
    assert hub.is_hub_name("mega") and hub.is_hub_name("dalle-mini/dalle-mega@main")
    assert not hub.is_hub_name(".") and not hub.is_hub_name("no-slash")
    assert hub.parse("mega@abc").revision == "abc"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_parts("no-such-folder")


def test_trainers_loaders_take_hub_names(fake_hub: FakeHub, cache: Path) -> None:
    """The trainers load a --model / --vqgan through load_parts and load_vqgan: names work there."""
    from dallemini.pipeline import load_vqgan

    published = publish(fake_hub, repos=(VQGAN_REPO,))
    vq = load_vqgan(VQGAN_REPO, device="cpu")
    assert _same_state(vq, published[VQGAN_REPO].models["vqgan"].states["vqgan"])
