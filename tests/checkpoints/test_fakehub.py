"""The fake Hub (tests/fakehub.py) against huggingface_hub itself: what it fetches, caches and raises."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import httpx  # huggingface_hub's HTTP client: its errors reach the caller
import pytest

from tests.fakehub import FakeHub, hub_offline

hf = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi, file_download, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = "dalle-mini/dalle-mini"
BIG = bytes(range(256)) * 20  # 5120 bytes: served as an LFS file


def _files(tag: bytes = b"v1") -> dict[str, bytes]:
    return {
        "config.json": b'{"version": "%s"}' % tag,
        "tokenizer.json": b"{}",
        "flax_model.msgpack": tag + BIG,
        "vqgan/flax_model.msgpack": BIG[::-1],
    }


def _read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def test_allow_patterns_fetch_only_matching_files(fake_hub: FakeHub) -> None:
    fake_hub.add_repo(REPO, _files())
    folder = Path(snapshot_download(REPO, allow_patterns=["*.json"]))
    assert sorted(fake_hub.file_requests(REPO)) == ["config.json", "tokenizer.json"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tokenizer.json"]
    assert _read(folder / "config.json") == _files()["config.json"]
    assert all(h["x-hf-download-counter"] == "1" for h in fake_hub.request_headers)


def test_second_snapshot_requests(fake_hub: FakeHub) -> None:
    sha = fake_hub.add_repo(REPO, _files())
    first = snapshot_download(REPO)
    # repo_info, the tree listing at the commit, then (in worker threads) a HEAD and a GET per file
    assert fake_hub.requests[:2] == [
        ("GET", f"/api/models/{REPO}/revision/main"),
        ("GET", f"/api/models/{REPO}/tree/{sha}?recursive=true&expand=false"),
    ]
    per_file = sorted((m, f"/{REPO}/resolve/{sha}/{f}") for f in _files() for m in ("HEAD", "GET"))
    assert sorted(fake_hub.requests[2:]) == per_file
    assert sorted(fake_hub.file_requests()) == sorted(_files())

    fake_hub.clear_requests()
    assert snapshot_download(REPO) == first  # a branch: one repo_info call, nothing else
    assert fake_hub.requests == [("GET", f"/api/models/{REPO}/revision/main")]

    fake_hub.clear_requests()
    assert snapshot_download(REPO, revision=sha) == first  # a commit sha: no request at all
    assert hf_hub_download(REPO, "flax_model.msgpack", revision=sha).startswith(first)
    assert fake_hub.requests == []

    assert hf_hub_download(REPO, "config.json")  # a branch: one HEAD per hf_hub_download
    assert fake_hub.requests == [("HEAD", f"/{REPO}/resolve/main/config.json")]


def test_offline_serves_the_cache_and_fails_without_it(
    fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.add_repo(REPO, _files())
    fake_hub.add_repo("kuprel/min-dalle", {"config.json": b"{}"})
    folder = snapshot_download(REPO, allow_patterns=["*.json", "flax_model.msgpack"])
    fake_hub.clear_requests()

    hub_offline(monkeypatch, True)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert snapshot_download(REPO, allow_patterns=["*.json"]) == folder
    assert _read(hf_hub_download(REPO, "flax_model.msgpack")) == _files()["flax_model.msgpack"]
    with pytest.raises(LocalEntryNotFoundError):  # never downloaded
        snapshot_download("kuprel/min-dalle")
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download("kuprel/min-dalle", "config.json")
    # the cached tree listing shows vqgan/ is missing from the partial snapshot
    with pytest.raises(IncompleteSnapshotError):
        snapshot_download(REPO)
    assert fake_hub.requests == []

    hub_offline(monkeypatch, False)
    assert "HF_HUB_OFFLINE" not in os.environ
    snapshot_download(REPO)
    assert fake_hub.file_requests() == ["vqgan/flax_model.msgpack"]


def test_pinned_revisions_keep_old_bytes(fake_hub: FakeHub) -> None:
    old = fake_hub.add_repo(REPO, _files(b"v1"), tags=("v1",))
    new = fake_hub.add_repo(REPO, _files(b"v2"))
    assert old != new and len(old) == 40
    assert _read(hf_hub_download(REPO, "config.json")) == _files(b"v2")["config.json"]
    for revision in (old, "v1"):
        folder = Path(snapshot_download(REPO, revision=revision))
        assert folder.name == old
        assert _read(folder / "flax_model.msgpack") == _files(b"v1")["flax_model.msgpack"]
        assert (
            _read(hf_hub_download(REPO, "config.json", revision=revision)) == b'{"version": "v1"}'
        )
    assert HfApi().model_info(REPO, revision="v1").sha == old
    assert HfApi().model_info(REPO).sha == new


def test_unknown_repo_revision_and_file(fake_hub: FakeHub) -> None:
    fake_hub.add_repo(REPO, _files())
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("dalle-mini/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("dalle-mini/nope", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        hf.model_info("dalle-mini/nope")  # the module-level HfApi, made at import
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="0" * 40)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.bin")


def test_repo_info_and_paginated_tree(fake_hub: FakeHub) -> None:
    sha = fake_hub.add_repo("openai/clip-vit-base-patch32", _files())
    info = HfApi().repo_info("openai/clip-vit-base-patch32", files_metadata=True)
    assert info.sha == sha and info.last_modified is not None
    by_name = {s.rfilename: s for s in info.siblings or []}
    assert sorted(by_name) == sorted(_files())
    assert by_name["config.json"].lfs is None and by_name["flax_model.msgpack"].lfs is not None
    fake_hub.tree_page_size = 2
    tree = list(HfApi().list_repo_tree("openai/clip-vit-base-patch32", recursive=True))
    assert sorted(e.path for e in tree) == sorted([*_files(), "vqgan"])
    assert sum("/tree/" in p for _, p in fake_hub.requests) == 3  # 5 entries, 2 a page
    top = HfApi().list_repo_tree("openai/clip-vit-base-patch32", "vqgan")
    assert [e.path for e in top] == ["vqgan/flax_model.msgpack"]


def test_dropped_connection_resumes_or_raises(
    fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda s: None))
    fake_hub.add_repo(REPO, _files())
    name, want = "flax_model.msgpack", _files()["flax_model.msgpack"]

    # Cut once: http_get catches RemoteProtocolError and retries in the same call. Bytes still in
    # httpx's 10 MB DOWNLOAD_CHUNK_SIZE buffer are lost, so a small file restarts from 0 (no Range)...
    fake_hub.drop_once[name] = 1000
    assert _read(hf_hub_download(REPO, name)) == want
    assert fake_hub.file_requests() == [name, name] and fake_hub.drop_once == {}
    assert [h.get("range") for h in fake_hub.request_headers] == [None, None, None]

    # ...while with smaller chunks it resumes from the last whole chunk written, with a Range request.
    monkeypatch.setattr(hf.constants, "DOWNLOAD_CHUNK_SIZE", 256)
    fake_hub.drop_once[name] = 1000
    fake_hub.clear_requests()
    assert _read(hf_hub_download(REPO, name, force_download=True)) == want
    assert [h.get("range") for h in fake_hub.request_headers] == [None, None, "bytes=768-"]
    fake_hub.clear_requests()

    # Cut before any byte, every time: after 5 retries the httpx error itself escapes.
    fake_hub.drop_always["vqgan/flax_model.msgpack"] = 0
    with pytest.raises(httpx.RemoteProtocolError):
        hf_hub_download(REPO, "vqgan/flax_model.msgpack")
    assert len(fake_hub.file_requests()) == 6  # the first try and 5 retries
    fake_hub.drop_always.clear()
    path = hf_hub_download(REPO, "vqgan/flax_model.msgpack")
    assert _read(path) == _files()["vqgan/flax_model.msgpack"]
    assert not list(Path(path).parents[3].rglob("*.incomplete"))


def test_hf_token_is_sent(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add_repo(REPO, _files())
    monkeypatch.setenv("HF_TOKEN", "hf_faketoken")
    snapshot_download(REPO, allow_patterns=["config.json"])
    HfApi().model_info(REPO)
    auths = {h.get("authorization") for h in fake_hub.request_headers}
    assert auths == {"Bearer hf_faketoken"}


def test_subprocess_uses_the_fake_hub_through_env(fake_hub: FakeHub) -> None:
    fake_hub.add_repo("dalle-mini/vqgan_imagenet_f16_16384", {"config.json": b"{}"})
    code = (
        "from huggingface_hub import snapshot_download;"
        "print(snapshot_download('dalle-mini/vqgan_imagenet_f16_16384'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    folder = Path(out.stdout.strip().splitlines()[-1])
    assert folder.is_relative_to(os.environ["HF_HUB_CACHE"])
    assert fake_hub.file_requests() == ["config.json"]
