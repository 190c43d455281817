"""Data pipeline: caption–image sources, VQGAN encoding into shards, and the streaming shard reader."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dallemini.config import VQGAN_PRESETS
from dallemini.data.encode import (
    build_manifest,
    encode_dataset,
    parse_worker,
    worker_from_env,
)
from dallemini.data.shards import (
    MANIFEST_NAME,
    ShardDataset,
    encoding_type,
    read_shard,
    shard_name,
    write_shard,
)
from dallemini.data.sources import (
    FolderSource,
    ParquetSource,
    Record,
    SampleError,
    SkipStats,
    Source,
    TarSource,
    decode_image,
    open_source,
)
from dallemini.errors import ConfigError, InputError
from dallemini.images import resize_center_crop
from dallemini.models.vqgan import VQGAN

TINY = VQGAN_PRESETS["tiny"]


@pytest.fixture(scope="module")
def vqgan() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(TINY).eval()


# --------------------------------------------------------------------------------------------
# Images made by the tests
# --------------------------------------------------------------------------------------------


def _image(i: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _bytes(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _truncated_jpeg() -> bytes:
    data = _bytes(_image(99, (64, 64)), "JPEG", quality=90)
    return data[: len(data) // 2]


GOOD = 6  # good images in each test set below


def make_folder(root: Path) -> Path:
    """6 good images (2 captions each) + garbage, truncated, empty caption, missing caption."""
    root.mkdir(parents=True, exist_ok=True)
    sub = root / "sub"
    sub.mkdir()
    for i in range(GOOD):
        where = sub if i % 2 else root
        _image(i).save(where / f"img{i}.png")
        (where / f"img{i}.txt").write_text(f"A photo #{i}!\n\nsecond caption {i}\n")
    (root / "garbage.jpg").write_bytes(b"this is not an image")
    (root / "garbage.txt").write_text("garbage")
    (root / "cut.jpg").write_bytes(_truncated_jpeg())
    (root / "cut.txt").write_text("cut in half")
    _image(50).save(root / "blank.png")
    (root / "blank.txt").write_text("  !!! \n")
    _image(51).save(root / "nocap.png")
    (root / "notes.md").write_text("not an image")
    return root


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_tars(root: Path) -> Path:
    """Two img2dataset-style shards (+ their metadata parquet), with bad samples and a damaged tail."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "00000.tar", "w") as tf:
        for i in range(4):
            key = f"{i:09d}"
            img = _image(i)
            _add(
                tf,
                f"{key}.jpg" if i % 2 else f"{key}.webp",
                _bytes(img, "JPEG" if i % 2 else "WEBP"),
            )
            if i == 3:  # caption only in the .json
                _add(
                    tf,
                    f"{key}.json",
                    json.dumps({"caption": "json caption 3", "url": "x"}).encode(),
                )
            else:
                _add(tf, f"{key}.txt", f"caption {i}\nwith a newline".encode())
                _add(tf, f"{key}.json", b'{"caption": "ignored"}')
        _add(tf, "000000010.txt", b"no image here")
        _add(tf, "000000011.jpg", _truncated_jpeg())
        _add(tf, "000000011.txt", b"truncated")
        _add(tf, "000000012.png", _bytes(_image(12)))
        _add(tf, "000000012.txt", b"")
    with tarfile.open(root / "00001.tar", "w") as tf:
        for i in range(4, GOOD):
            _add(tf, f"{i:09d}.png", _bytes(_image(i)))
            _add(tf, f"{i:09d}.txt", f"caption {i}".encode())
        _add(tf, "000000020.png", _bytes(_image(20)))
        _add(tf, "000000020.txt", b"cut off")
    with tarfile.open(root / "00001.tar") as tf:
        last = tf.getmember("000000020.png")
    data = (root / "00001.tar").read_bytes()
    cut = last.offset_data + last.size // 2  # inside the last image's bytes
    (root / "00001.tar").write_bytes(data[:cut])
    pq.write_table(pa.table({"key": ["x"], "url": ["http://x"]}), root / "00000.parquet")
    return root


def make_parquet(root: Path) -> Path:
    """img2dataset-style parquet: `jpg` bytes + `txt` captions + `key`, in two files."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [(f"k{i}", _bytes(_image(i), "JPEG"), f"Caption {i}") for i in range(GOOD)]
    rows += [
        ("bad", b"\x00\x01garbage", "bad bytes"),
        ("none", None, "no image"),
        ("empty", _bytes(_image(7)), ""),
    ]
    for part, chunk in enumerate((rows[:4], rows[4:])):
        pq.write_table(
            pa.table(
                {
                    "key": [r[0] for r in chunk],
                    "jpg": pa.array([r[1] for r in chunk], pa.binary()),
                    "txt": [r[2] for r in chunk],
                }
            ),
            root / f"part{part}.parquet",
        )
    return root


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def test_decode_converts_modes_to_rgb() -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 0
    img = decode_image(_bytes(pal, "PNG", transparency=0))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white

    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    img = decode_image(_bytes(rgba))
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 1)) == (0, 0, 255)

    assert decode_image(_bytes(Image.new("LA", (3, 3), (0, 255)))).getpixel((0, 0)) == (0, 0, 0)
    assert decode_image(_bytes(Image.new("L", (3, 3), 7))).getpixel((0, 0)) == (7, 7, 7)
    gray16 = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert decode_image(_bytes(gray16)).getpixel((0, 0)) == (255, 255, 255)
    cmyk = decode_image(_bytes(Image.new("CMYK", (3, 3), (0, 0, 0, 0)), "JPEG"))
    assert cmyk.mode == "RGB" and min(cmyk.getpixel((0, 0))) > 240


def test_decode_applies_exif_orientation() -> None:
    img = Image.new("RGB", (20, 10), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = decode_image(_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 20)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "missing_image"),
        (b"definitely not an image", "undecodable"),
        (_truncated_jpeg(), "truncated"),
        (_bytes(_image(1))[:-30], "truncated"),
    ],
)
def test_decode_errors_are_sample_errors(data: bytes, reason: str) -> None:
    with pytest.raises(SampleError) as e:
        decode_image(data)
    assert e.value.reason == reason


def test_decompression_bomb_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(SampleError) as e:
        decode_image(_bytes(_image(1, (20, 20))))
    assert e.value.reason == "too_large"


def test_resize_center_crop() -> None:
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 255, 0), (100, 0, 200, 100))  # green middle third
    out = resize_center_crop(img, 32)
    assert out.size == (32, 32)
    arr = np.asarray(out)
    assert (arr[:, 2:-2, 1] > 200).all() and (arr[:, 2:-2, 0] < 50).all()
    assert resize_center_crop(Image.new("RGB", (5, 9)), 16).size == (16, 16)  # upscales too


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _check_source(src: Source, good_keys: list[str], expected: dict[str, int]) -> list:
    samples = list(src)
    assert [s.key for s in samples] == good_keys
    assert src.stats.counts == expected
    assert all(s.image.mode == "RGB" for s in samples)
    assert all(c.startswith(" ") and c.strip() for s in samples for c in s.captions)
    return samples


def test_folder_source(tmp_path: Path) -> None:
    src = open_source(make_folder(tmp_path / "f"))
    assert isinstance(src, FolderSource)
    good = sorted(
        [f"img{i}.png" for i in range(0, GOOD, 2)] + [f"sub/img{i}.png" for i in range(1, GOOD, 2)]
    )
    samples = _check_source(
        src,
        good,
        {"undecodable": 1, "truncated": 1, "empty_caption": 1, "missing_caption": 1},
    )
    assert samples[0].captions == (" a photo 0", " second caption 0")  # one caption per line
    assert src.stats.examples["truncated"] == ["cut.jpg"]
    assert "missing_caption (nocap.png)" in src.stats.report()
    assert len(list(src.pairs())) == 2 * GOOD
    assert src.count_hint() == GOOD + 4


def test_folder_source_raw_and_custom_normalizer(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "f")
    raw = {s.key: s for s in open_source(root, normalizer=None, caption_lines="join")}
    assert raw["img0.png"].captions == ("A photo #0! second caption 0",)
    assert raw["blank.png"].captions == ("!!!",)  # only normalization empties it
    upper = {s.key: s for s in open_source(root, normalizer=str.upper)}
    assert upper["img0.png"].captions == ("A PHOTO #0!", "SECOND CAPTION 0")


def test_tar_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_tars(tmp_path / "t")
    src = open_source(root)  # img2dataset's .parquet metadata beside the tars is ignored
    assert isinstance(src, TarSource) and [p.name for p in src.paths] == ["00000.tar", "00001.tar"]
    good = [f"00000.tar/{i:09d}" for i in range(4)] + [f"00001.tar/{i:09d}" for i in range(4, GOOD)]
    samples = _check_source(
        src,
        good,
        {"missing_image": 1, "truncated": 2, "empty_caption": 1, "unreadable_file": 1},
    )
    assert samples[0].captions == (" caption 0 with a newline",)  # joined
    assert samples[3].captions == (" json caption 3",)
    assert src.stats.examples["truncated"] == ["00000.tar/000000011", "00001.tar/000000020"]
    assert "skipped 5 samples" in caplog.text  # reported at the end, never silently


def test_compressed_and_damaged_tars(tmp_path: Path) -> None:
    root = tmp_path / "gz"
    root.mkdir()
    with tarfile.open(root / "a.tar.gz", "w:gz") as tf:
        _add(tf, "x/0001.png", _bytes(_image(1)))
        _add(tf, "x/0001.txt", b"gzipped")
    (root / "b.tar").write_bytes(b"\x00garbage" * 100)
    src = open_source(root)
    samples = list(src)
    assert [s.key for s in samples] == ["a.tar.gz/x/0001"]
    assert src.stats.counts == {"unreadable_file": 1}


def test_parquet_source(tmp_path: Path) -> None:
    src = open_source(make_parquet(tmp_path / "p"))
    assert isinstance(src, ParquetSource)
    assert (src.image_column, src.caption_column) == ("jpg", "txt")
    good = [f"part0.parquet/k{i}" for i in range(4)] + [
        f"part1.parquet/k{i}" for i in range(4, GOOD)
    ]
    samples = _check_source(src, good, {"undecodable": 1, "missing_image": 1, "empty_caption": 1})
    assert samples[0].captions == (" caption 0",)
    assert src.count_hint() == GOOD + 3


def test_parquet_source_custom_columns(tmp_path: Path) -> None:
    path = tmp_path / "hf.parquet"
    images = pa.array(
        [{"bytes": _bytes(_image(i)), "path": None} for i in range(3)],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(
        pa.table({"picture": images, "alt": [["one", "uno"], ["two"], []]}),
        path,
    )
    src = open_source(str(tmp_path / "*.parquet"), image_column="picture", caption_column="alt")
    samples = list(src)
    assert [s.key for s in samples] == ["hf.parquet/0", "hf.parquet/1"]
    assert samples[0].captions == (" one", " uno")
    assert src.stats.counts == {"missing_caption": 1}
    with pytest.raises(InputError, match="no image column"):
        ParquetSource([path], caption_column="alt")
    with pytest.raises(InputError, match="'nope' not found"):
        ParquetSource([path], image_column="nope", caption_column="alt")


def test_open_source_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        open_source(tmp_path / "missing")
    with pytest.raises(InputError, match="no files match"):
        open_source(str(tmp_path / "*.tar"))
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="cannot tell"):
        open_source(tmp_path / "x.bin")
    with pytest.raises(InputError, match=r"no \.tar files"):
        open_source(tmp_path, kind="tar")
    with pytest.raises(InputError, match="unknown source kind"):
        open_source(tmp_path, kind="zip")  # type: ignore[arg-type]


def test_skip_stats_merge_and_round_trip() -> None:
    a, b = SkipStats(), SkipStats()
    for i in range(7):
        a.add("truncated", f"k{i}")
    b.add("empty_caption", "e")
    b.add("truncated", "k0")
    a.merge(b)
    assert a.counts == {"truncated": 8, "empty_caption": 1} and a.total == 9
    assert a.examples["truncated"] == [f"k{i}" for i in range(5)]
    assert SkipStats.from_dict(a.to_dict()).to_dict() == a.to_dict()
    assert list(a.to_dict()["counts"]) == ["empty_caption", "truncated"]  # fixed order
    assert "…" in a.report()


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _read_dataset(folder: Path) -> dict[str, tuple[list[str], list[np.ndarray]]]:
    """key -> (captions, encodings) over every shard; asserts no key appears in two shards."""
    out: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    owner: dict[str, str] = {}
    for p in sorted(folder.glob("part-*.parquet")):
        keys = pq.read_table(p, columns=["key"]).column("key").to_pylist()
        captions, codes = read_shard(p, 16)
        for key, cap, enc in zip(keys, captions, codes, strict=True):
            assert owner.setdefault(key, p.name) == p.name, f"{key} in {owner[key]} and {p.name}"
            caps, encs = out.setdefault(key, ([], []))
            caps.append(cap)
            encs.append(enc)
    return out


def test_encode_folder(tmp_path: Path, vqgan: VQGAN) -> None:
    src = open_source(make_folder(tmp_path / "f"))
    out = tmp_path / "enc"
    res = encode_dataset(src, out, vqgan, batch_size=4, shard_size=4, progress=False)
    assert res.complete and res.images == GOOD and res.rows == 2 * GOOD
    assert res.skipped.total == 4 and res.num_shards == 3
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME] + [
        shard_name(k) for k in range(3)
    ]

    t = pq.read_table(out / shard_name(0))
    assert t.schema.names == ["key", "caption", "encoding"]
    assert t.schema.field("encoding").type == pa.list_(pa.int16(), 16)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["vqgan_fingerprint"] == TINY.fingerprint()
    assert (manifest["image_size"], manifest["grid_size"], manifest["n_embed"]) == (64, 4, 64)
    assert (manifest["count"], manifest["images"], manifest["source_records"]) == (12, 6, 10)
    assert manifest["skipped"]["counts"] == {
        "empty_caption": 1,
        "missing_caption": 1,
        "undecodable": 1,
        "truncated": 1,
    }
    assert [s["rows"] for s in manifest["shards"]] == [2, 6, 4]  # blank, cut, garbage, img0 | …
    assert manifest["captions_normalized"] is True

    data = _read_dataset(out)
    assert len(data) == GOOD
    caps, encs = data["sub/img1.png"]
    assert caps == [" a photo 1", " second caption 1"]
    assert (encs[0] == encs[1]).all()  # one encoding per image, one row per caption
    img = resize_center_crop(_image(1), 64)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    assert (vqgan.encode(x).reshape(-1).numpy() == encs[0]).all()


def test_encode_tar_and_parquet_sources(tmp_path: Path, vqgan: VQGAN) -> None:
    for name, make in (("t", make_tars), ("p", make_parquet)):
        res = encode_dataset(
            make(tmp_path / name), tmp_path / f"enc-{name}", vqgan, shard_size=5, progress=False
        )
        assert res.complete and res.images == GOOD and res.rows == GOOD
        assert len(_read_dataset(tmp_path / f"enc-{name}")) == GOOD


class _Interrupting(Source):
    """Wraps a source and raises KeyboardInterrupt after `stop_after` records (a killed run)."""

    def __init__(self, inner: Source, stop_after: int | None) -> None:
        self.__dict__.update(inner.__dict__)
        self.kind = inner.kind
        self.inner = inner
        self.stop_after = stop_after
        self.loaded: list[str] = []

    def records(self) -> Iterator[Record]:
        for i, rec in enumerate(self.inner.records()):
            if self.stop_after is not None and i == self.stop_after:
                raise KeyboardInterrupt
            loader = rec.loader

            def load(rec: Record = rec, loader=loader) -> bytes:
                self.loaded.append(rec.key)
                return loader()

            yield Record(rec.key, rec.captions, load if loader else None, rec.problem)


def test_interrupted_encode_resumes_without_duplicates_or_gaps(
    tmp_path: Path, vqgan: VQGAN
) -> None:
    root = make_folder(tmp_path / "f")
    out = tmp_path / "enc"
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(
            _Interrupting(open_source(root), 7),
            out,
            vqgan,
            batch_size=2,
            shard_size=3,
            progress=False,
        )
    first = sorted(p.name for p in out.iterdir())
    assert first == [shard_name(0), shard_name(1)]  # whole shards only, no temp files, no manifest
    mtimes = {n: (out / n).stat().st_mtime_ns for n in first}
    (out / f".{shard_name(2)}.tmp-123-abc").write_bytes(b"left by a killed process")

    src = _Interrupting(open_source(root), None)
    res = encode_dataset(src, out, vqgan, batch_size=2, shard_size=3, progress=False)
    assert res.complete and res.shards_existing == [0, 1] and res.shards_written == [2, 3]
    assert all((out / n).stat().st_mtime_ns == t for n, t in mtimes.items())  # not rewritten
    assert (
        len(src.loaded) == 10 - 6 - 1
    )  # only records of the missing shards were read (nocap: no read)
    assert not list(out.glob(".*"))

    fresh = tmp_path / "fresh"
    encode_dataset(open_source(root), fresh, vqgan, batch_size=2, shard_size=3, progress=False)
    resumed, whole = _read_dataset(out), _read_dataset(fresh)
    assert resumed.keys() == whole.keys() and len(whole) == GOOD
    for key in whole:
        assert resumed[key][0] == whole[key][0]
        assert all((a == b).all() for a, b in zip(resumed[key][1], whole[key][1], strict=True))
    assert json.loads((out / MANIFEST_NAME).read_text()) == json.loads(
        (fresh / MANIFEST_NAME).read_text()
    )


def test_two_workers_cover_the_set_exactly_once(tmp_path: Path, vqgan: VQGAN) -> None:
    root = make_folder(tmp_path / "f")
    whole = tmp_path / "whole"
    encode_dataset(root, whole, vqgan, shard_size=2, progress=False)

    seq = tmp_path / "seq"
    r0 = encode_dataset(root, seq, vqgan, shard_size=2, worker=(0, 2), progress=False)
    assert r0.shards_written == [0, 2, 4] and not r0.complete and not (seq / MANIFEST_NAME).exists()
    r1 = encode_dataset(root, seq, vqgan, shard_size=2, worker=(1, 2), progress=False)
    assert r1.shards_written == [1, 3] and r1.complete

    par = tmp_path / "par"
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            model = VQGAN(TINY).eval()
            model.load_state_dict(vqgan.state_dict())
            encode_dataset(root, par, model, shard_size=2, worker=(i, 2), progress=False)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors

    ref = (whole / MANIFEST_NAME).read_text()
    for folder in (seq, par):
        assert (folder / MANIFEST_NAME).read_text() == ref
        got, want = _read_dataset(folder), _read_dataset(whole)
        assert got.keys() == want.keys() and len(got) == GOOD
        for key in want:
            assert got[key][0] == want[key][0]
            assert all((a == b).all() for a, b in zip(got[key][1], want[key][1], strict=True))


def test_encode_refuses_to_mix_settings(tmp_path: Path, vqgan: VQGAN) -> None:
    root = make_folder(tmp_path / "f")
    out = tmp_path / "enc"
    encode_dataset(root, out, vqgan, shard_size=4, progress=False)
    with pytest.raises(ConfigError, match="shard_size"):
        encode_dataset(root, out, vqgan, shard_size=5, progress=False)
    with pytest.raises(ConfigError, match="captions_normalized"):
        encode_dataset(root, out, vqgan, shard_size=4, normalizer=None, progress=False)
    with pytest.raises(ConfigError, match="source changed"):
        build_manifest(out, 7)


def test_worker_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_worker("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(InputError):
            parse_worker(bad)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert worker_from_env() == (2, 3)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert worker_from_env() == (0, 1)


# --------------------------------------------------------------------------------------------
# Shard files and the reader
# --------------------------------------------------------------------------------------------


def test_encoding_type_and_foreign_list_shards(tmp_path: Path) -> None:
    assert encoding_type(16384, 256) == pa.list_(pa.int16(), 256)
    assert encoding_type(40000, 4) == pa.list_(pa.int32(), 4)
    codes = np.array([[0, 39999, 5, 6], [1, 2, 3, 4]])
    write_shard(tmp_path / "a.parquet", ["a", "b"], ["x", "y"], codes, n_embed=40000)
    caps, got = read_shard(tmp_path / "a.parquet", 4)
    assert caps == ["x", "y"] and (got == codes).all()
    # dalle-mini's published shards store variable-length lists of int64
    pq.write_table(
        pa.table({"caption": ["c"], "encoding": pa.array([[1, 2, 3, 4]], pa.list_(pa.int64()))}),
        tmp_path / "b.parquet",
    )
    assert (read_shard(tmp_path / "b.parquet", 4)[1] == [[1, 2, 3, 4]]).all()
    with pytest.raises(InputError, match="expects 9"):
        read_shard(tmp_path / "b.parquet", 9)


ROWS = (7, 5, 6, 7, 3)  # rows per shard in the reader tests: 28 rows, 5 shards


def make_shards(folder: Path, rows: tuple[int, ...] = ROWS, manifest: bool = True) -> list[str]:
    """Shards whose captions are 'r<n>' and whose codes are [n, n+1, n+2, n+3] for global row n."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    captions = []
    for k, count in enumerate(rows):
        caps = [f"r{n + i}" for i in range(count)]
        codes = np.array([[n + i + j for j in range(4)] for i in range(count)]).reshape(count, 4)
        meta = {
            "shard_size": 10,
            "first_record": 10 * k,
            "end_record": 10 * k + 10,
            "images": count,
            "grid_size": 2,
            "n_embed": 100,
        }
        write_shard(folder / shard_name(k), caps, caps, codes, n_embed=100, metadata=meta)
        captions += caps
        n += count
    if manifest:
        (folder / MANIFEST_NAME).write_text(json.dumps(build_manifest(folder, 10 * len(rows))))
    return captions


def fake_tokenize(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row number as the single 'token', so tests can tell rows apart."""
    ids = torch.tensor([[int(c[1:]), 0] for c in captions])
    return ids, torch.ones_like(ids)


def _rows(batches: list) -> list[int]:
    return [int(i) for b in batches for i in b.input_ids[:, 0]]


def test_reader_epoch_reads_every_row_once(tmp_path: Path) -> None:
    make_shards(tmp_path / "d")
    ds = ShardDataset(
        tmp_path / "d", fake_tokenize, 4, shuffle_buffer=6, seed=1, epochs=2, drop_last=False
    )
    assert len(ds) == 7
    batches = list(ds)
    assert len(batches) == 14 and ds.epoch == 2
    e0, e1 = _rows(batches[:7]), _rows(batches[7:])
    assert sorted(e0) == sorted(e1) == list(range(28))
    assert e0 != e1 and e0 != sorted(e0)  # shuffled, differently each epoch
    b = batches[0]
    assert b.codes.dtype == torch.long and b.codes.shape == (4, 4)
    assert (b.codes[:, 0] == b.input_ids[:, 0]).all() and (b.codes[:, 3] == b.codes[:, 0] + 3).all()
    again = ShardDataset(
        tmp_path / "d", fake_tokenize, 4, shuffle_buffer=6, seed=1, epochs=1, drop_last=False
    )
    assert _rows(list(again)) == e0  # same seed, same order
    plain = ShardDataset(tmp_path / "d", fake_tokenize, 4, shuffle=False, epochs=1, drop_last=False)
    assert _rows(list(plain)) == list(range(28))


def test_reader_coverage_of_a_partial_epoch(tmp_path: Path) -> None:
    """A small buffer streams whole shards, so a short run reads some of them; an epoch-sized one
    draws the first batches from every shard."""
    make_shards(tmp_path / "d", rows=(9,) * 10)  # shard k holds rows 9k..9k+8
    small = ShardDataset(tmp_path / "d", fake_tokenize, 4, shuffle_buffer=6, seed=3)
    assert small.epoch_coverage(8) == pytest.approx(14 / 90)
    shards_seen = {r // 9 for r in _rows(list(itertools.islice(small, 3)))}
    assert len(shards_seen) <= 3
    whole = ShardDataset(tmp_path / "d", fake_tokenize, 4, shuffle_buffer=90, seed=3)
    assert whole.epoch_coverage(8) == 1.0
    shards_seen = {r // 9 for r in _rows(list(itertools.islice(whole, 3)))}
    assert len(shards_seen) >= 6  # 12 rows drawn from 90: all from <= 3 shards is vanishingly rare
    plain = ShardDataset(tmp_path / "d", fake_tokenize, 4, shuffle=False)
    assert plain.epoch_coverage(45) == 0.5


@pytest.mark.parametrize("world", [2, 3, 4, 6, 40])
@pytest.mark.parametrize("drop_last", [True, False])
def test_reader_ranks_read_disjoint_rows(tmp_path: Path, world: int, drop_last: bool) -> None:
    make_shards(tmp_path / "d")
    per_rank = []
    for rank in range(world):
        if world == 40:  # fewer rows than ranks: no batch for some
            with pytest.raises(ConfigError, match="do not make one batch"):
                ShardDataset(tmp_path / "d", fake_tokenize, 1, rank=rank, world_size=world)
            return
        ds = ShardDataset(
            tmp_path / "d",
            fake_tokenize,
            2,
            shuffle_buffer=5,
            rank=rank,
            world_size=world,
            epochs=1,
            drop_last=drop_last,
        )
        per_rank.append(list(ds))
        plan = ds.plan(0, rank)
        assert sum(rows is not None for _, rows in plan) <= 2  # whole shards but for the two ends
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    seen = [row for batches in per_rank for row in _rows(batches)]
    assert len(seen) == len(set(seen))  # no row on two ranks
    assert len(seen) >= 28 - world * (2 if drop_last else 1)  # only the ragged ends are left out


def test_reader_resumes_exactly(tmp_path: Path) -> None:
    make_shards(tmp_path / "d", manifest=False)  # also: reading a folder without dataset.json

    def make(**kw: object) -> ShardDataset:
        return ShardDataset(
            tmp_path / "d", fake_tokenize, 3, shuffle_buffer=8, seed=5, rank=1, world_size=2, **kw
        )

    reference = list(make(epochs=3))
    per_epoch = len(make())
    for stop in (1, per_epoch - 1, per_epoch, per_epoch + 2):
        ds = make(epochs=3)
        it = iter(ds)
        head = [next(it) for _ in range(stop)]
        state = json.loads(json.dumps(ds.state_dict()))  # survives a checkpoint file
        resumed = make(epochs=3)
        resumed.load_state_dict(state)
        tail = list(resumed)
        got = head + tail
        assert len(got) == len(reference)
        for a, b in zip(got, reference, strict=True):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.codes, b.codes)


def test_reader_refuses_other_settings_and_tiny_sets(tmp_path: Path) -> None:
    make_shards(tmp_path / "d")
    state = ShardDataset(tmp_path / "d", fake_tokenize, 3).state_dict()
    with pytest.raises(ConfigError, match="batch_size"):
        ShardDataset(tmp_path / "d", fake_tokenize, 4).load_state_dict(state)
    with pytest.raises(ConfigError, match="world_size"):
        ShardDataset(tmp_path / "d", fake_tokenize, 3, world_size=2).load_state_dict(state)
    make_shards(tmp_path / "e", (*ROWS, 4))
    with pytest.raises(ConfigError, match="shards"):
        ShardDataset(tmp_path / "e", fake_tokenize, 3).load_state_dict(state)
    with pytest.raises(ConfigError, match="num_workers=0"):
        next(
            iter(
                torch.utils.data.DataLoader(
                    ShardDataset(tmp_path / "d", fake_tokenize, 3), batch_size=None, num_workers=1
                )
            )
        )
    with pytest.raises(ConfigError, match="batch of 64"):
        ShardDataset(tmp_path / "d", fake_tokenize, 64)
    with pytest.raises(InputError, match="no part"):
        ShardDataset(tmp_path, fake_tokenize, 2)


def test_reader_on_encoded_set_with_text_encoder(tmp_path: Path, vqgan: VQGAN) -> None:
    from dallemini.config import TextConfig
    from dallemini.text import TextEncoder, train_tokenizer

    root = make_folder(tmp_path / "f")
    encode_dataset(root, tmp_path / "enc", vqgan, shard_size=3, progress=False)
    captions = [c for s in open_source(root) for c in s.captions]
    encoder = TextEncoder(train_tokenizer(captions * 3, 300), TextConfig(max_length=12))
    ds = ShardDataset(tmp_path / "enc", encoder, 4, shuffle_buffer=4, epochs=1)
    batches = list(ds)
    assert len(batches) == 3
    ids, mask, codes = batches[0]
    assert ids.shape == mask.shape == (4, 12) and codes.shape == (4, 16)
    assert int(codes.max()) < TINY.n_embed and (ids[:, 0] == 0).all()


def test_brace_patterns_and_shard_lists(tmp_path: Path) -> None:
    root = make_tars(tmp_path / "t")
    for spec in (f"{root}/{{00000..00001}}.tar", f"{root}/00000.tar::{root}/00001.tar"):
        src = open_source(spec)
        assert isinstance(src, TarSource) and [p.name for p in src.paths] == [
            "00000.tar",
            "00001.tar",
        ]
    listed = open_source([f"{root}/{{00001,00000}}.tar"])  # a list of patterns; read in order
    assert [p.name for p in listed.paths] == ["00000.tar", "00001.tar"]
    with pytest.raises(InputError, match=r"00002\.tar does not exist"):
        open_source(f"{root}/{{00000..00002}}.tar")  # a shard that is missing is named
