"""The image stores of response="url": the in-memory cache and the directory that replicas share
(whole files, a bound, files deleted by another replica, ids checked before any file is touched)."""

from __future__ import annotations

import errno
import os
import secrets
import threading
import time
from pathlib import Path

import pytest

from dallemini.errors import ConfigError
from dallemini.serve import ServeSettings, support
from dallemini.serve.support import ImageCache, ImageDir, image_store, open_image_dir


def png(i: int) -> bytes:
    """Distinct stand-in PNG bytes."""
    return b"\x89PNG\r\n\x1a\n" + i.to_bytes(4, "big") * 1000


def entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_both_stores_put_and_get_under_token_ids(tmp_path: Path) -> None:
    for store in (image_store(None, 8), image_store(tmp_path / "images", 8)):
        key = store.put(png(1))
        assert support.valid_image_id(key) and len(key) == 22
        assert store.get(key) == png(1) and len(store) == 1
        assert store.get(secrets.token_urlsafe(16)) is None
    assert isinstance(image_store(None, 8), ImageCache)
    assert entries(tmp_path / "images") == [f"{key}.png"]  # no temp or probe file left


def test_replicas_sharing_a_directory_read_each_others_images(tmp_path: Path) -> None:
    a, b = ImageDir(tmp_path, 8), ImageDir(tmp_path, 8)
    key = a.put(png(7))
    assert b.get(key) == png(7)
    assert len(b) == 1


def test_the_oldest_files_past_the_bound_are_deleted(tmp_path: Path) -> None:
    store = ImageDir(tmp_path, max_items=3)
    keys = [store.put(png(i)) for i in range(3)]
    base = time.time() - 100
    for i, key in enumerate(keys):  # distinct ages whatever the file system's clock resolution
        os.utime(tmp_path / f"{key}.png", (base + i, base + i))
    newest = store.put(png(3))
    assert len(store) == 3
    assert store.get(keys[0]) is None
    assert [store.get(k) for k in (*keys[1:], newest)] == [png(1), png(2), png(3)]
    other = ImageDir(tmp_path, max_items=3)  # another replica's writes count toward the bound
    other.put(png(4))
    assert len(store) == 3 and store.get(keys[1]) is None


def test_files_another_replica_deletes_meanwhile_are_tolerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ImageDir(tmp_path, max_items=2)
    keys = [store.put(png(i)) for i in range(2)]
    real_scandir = os.scandir

    class Vanishing:
        """os.scandir whose files another replica deletes after they were listed, before stat."""

        def __init__(self, path: Path) -> None:
            with real_scandir(path) as it:
                self.found = list(it)
            for e in self.found:
                if e.name.startswith(keys[0]):
                    os.unlink(e.path)

        def __enter__(self) -> list[os.DirEntry]:
            return self.found

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(support.os, "scandir", Vanishing)
    third = store.put(png(2))
    monkeypatch.undo()
    assert store.get(keys[0]) is None and len(store) == 2
    assert store.get(third) == png(2)

    # Files that were listed as past the bound but are gone when this replica deletes them.
    real_scan = ImageDir._scan

    def scan_then_lose(self: ImageDir) -> tuple[list[tuple[int, str]], list[str]]:
        found = real_scan(self)
        for _, name in found[0]:
            (self.path / name).unlink(missing_ok=True)
        return found

    monkeypatch.setattr(ImageDir, "_scan", scan_then_lose)
    store.put(png(3))  # no FileNotFoundError
    monkeypatch.undo()
    assert len(store) == 0


def test_concurrent_writers_in_two_stores_keep_whole_files_and_the_bound(tmp_path: Path) -> None:
    stores = [ImageDir(tmp_path, max_items=5), ImageDir(tmp_path, max_items=5)]
    errors: list[BaseException] = []
    seen: list[tuple[str, bytes]] = []

    def work(store: ImageDir, start: int) -> None:
        try:
            for i in range(start, start + 15):
                key = store.put(png(i))
                seen.append((key, png(i)))
                for k, data in seen[-8:]:  # whole or gone, never half
                    got = stores[i % 2].get(k)
                    assert got is None or got == data
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(stores[t % 2], 100 * t)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    stores[0].prune()
    assert len(stores[0]) == len(stores[1]) == 5
    assert not [n for n in entries(tmp_path) if not n.endswith(".png")]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not-an-id",
        "a" * 21,
        "a" * 23,
        "../../etc/passwd",
        "..%2F..%2Fetc%2Fpasswd",
        "a" * 21 + "/",
        "a" * 21 + ".",
        "a" * 22 + ".png",
        "/" + "a" * 21,
        "aaaaaaaaaaa\x00aaaaaaaaaa",
        "ääääääääääääääääääääää",
    ],
)
def test_anything_but_an_id_is_none_without_touching_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    store = ImageDir(tmp_path, 8)
    (tmp_path / f"{bad.replace('/', '_').replace(chr(0), '_')}.png").write_bytes(b"x")

    def touched(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file system was touched for a bad id")

    monkeypatch.setattr(Path, "read_bytes", touched)
    monkeypatch.setattr(Path, "open", touched)
    assert store.get(bad) is None
    assert ImageCache().get(bad) is None


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    store = ImageDir(tmp_path, 8)
    old = tmp_path / f".{secrets.token_urlsafe(16)}.png.tmp-1-deadbeef"
    fresh = tmp_path / f".{secrets.token_urlsafe(16)}.png.tmp-2-cafef00d"
    for f in (old, fresh):
        f.write_bytes(b"half")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    store.put(png(1))
    assert not old.exists() and fresh.exists()  # a write may still be under way
    assert len(store) == 1


def test_a_directory_that_cannot_be_made_or_written_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot create the directory"):
        open_image_dir(blocker / "images")
    with pytest.raises(ConfigError, match=r"image store .*file"):
        ServeSettings(image_store=str(blocker)).check()
    with pytest.raises(ConfigError, match="cache_images must be at least 1"):
        ServeSettings(cache_images=0).check()
    created = tmp_path / "new" / "images"
    ServeSettings(image_store=str(created)).check()
    assert created.is_dir() and entries(created) == []

    def read_only(*args: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with monkeypatch.context() as m:
        m.setattr(support, "atomic_write", read_only)
        with pytest.raises(ConfigError, match=r"cannot write files there \(Read-only file system"):
            ServeSettings(image_store=str(created)).check()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            with pytest.raises(ConfigError, match="cannot write files there"):
                open_image_dir(locked)
        finally:
            locked.chmod(0o700)
