"""Data in object stores and over HTTP: sources from s3://, http:// and pipe: URLs, encoding into
s3://, training from s3://, all against servers on 127.0.0.1 that the tests start."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dallemini.data import remote
from dallemini.data.encode import DONE_DIR, encode_dataset, marker_name
from dallemini.data.remote import URL, as_location, is_url
from dallemini.data.shards import MANIFEST_NAME, ShardDataset, read_shard, shard_name
from dallemini.data.sources import Source, TarSource, open_source
from dallemini.errors import ConfigError, InputError
from dallemini.models.vqgan import VQGAN
from tests.data.test_data import (
    GOOD,
    TINY,
    _add,
    _bytes,
    _image,
    _Interrupting,
    _rows,
    fake_tokenize,
    make_parquet,
    make_shards,
    make_tars,
)
from tests.s3server import S3Server, http_file_server, point_aws_at


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken HTTP streams are retried twice, without long waits."""
    monkeypatch.setattr(remote, "RETRY", remote.RetryPolicy(attempts=2, backoff_s=0.01))


@pytest.fixture(scope="module")
def vqgan() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(TINY).eval()


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    server = S3Server()
    yield server
    server.stop()


@dataclass
class Bucket:
    """A fresh bucket on the test server, with helpers to fill and inspect it."""

    name: str
    client: Any

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def upload(self, folder: Path, prefix: str) -> str:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                key = f"{prefix}/{p.relative_to(folder).as_posix()}"
                self.client.put_object(Bucket=self.name, Key=key, Body=p.read_bytes())
        return self.url(prefix)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)


@pytest.fixture
def bucket(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A new bucket, with boto/s3fs in this process and its children pointed at the local server only."""
    point_aws_at(s3_server.endpoint, tmp_path / "aws", monkeypatch)
    name = f"test-{uuid.uuid4().hex[:12]}"
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    return Bucket(name, client)


def make_img2dataset(root: Path, tars: int = 2, per_tar: int = 3) -> Path:
    """img2dataset's webdataset output: NNNNN.tar (key.jpg, key.txt, key.json) + NNNNN.parquet + NNNNN_stats.json."""
    root.mkdir(parents=True, exist_ok=True)
    for t in range(tars):
        keys = []
        with tarfile.open(root / f"{t:05d}.tar", "w") as tf:
            for j in range(per_tar):
                i = t * per_tar + j
                key = f"{t:05d}{j:04d}"
                keys.append(key)
                _add(tf, f"{key}.jpg", _bytes(_image(i), "JPEG"))
                _add(tf, f"{key}.txt", f"picture number {i}".encode())
                _add(tf, f"{key}.json", json.dumps({"key": key, "caption": f"p {i}"}).encode())
        pq.write_table(
            pa.table({"key": keys, "status": ["success"] * per_tar}), root / f"{t:05d}.parquet"
        )
        (root / f"{t:05d}_stats.json").write_text(
            json.dumps({"count": per_tar, "successes": per_tar})
        )
    return root


def _samples(src: Source) -> list[tuple[str, tuple[str, ...], bytes]]:
    return [(s.key, s.captions, s.image.tobytes()) for s in src]


# --------------------------------------------------------------------------------------------
# URLs and sources
# --------------------------------------------------------------------------------------------


def test_urls_and_locations() -> None:
    assert is_url("s3://b/x") and is_url("hf://datasets/a/b") and is_url("pipe:cat x.tar")
    assert not is_url("/tmp/x.tar") and not is_url("file:///tmp/x.tar") and not is_url("a/b")
    assert as_location("file:///tmp/a.tar") == Path("/tmp/a.tar")
    url = URL("s3://bucket/shards/00001.tar")
    assert (url.name, url.suffix, url.protocol) == ("00001.tar", ".tar", "s3")
    assert URL("https://h/p/a.tar?sig=x/y").name == "a.tar"
    assert URL("pipe:curl -s -L 'https://h/p/00007.tar'").name == "00007.tar"
    assert URL("pipe:aws s3 cp s3://b/p/00003.tar -").name == "00003.tar"
    assert str(URL("s3://b/tokens/") / MANIFEST_NAME) == "s3://b/tokens/dataset.json"


def test_missing_package_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_package(url: str, **kw: object) -> None:
        raise ImportError("Install it", name="s3fs")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_package)
    with pytest.raises(ConfigError, match=r"s3:// URLs needs the \[train\] extra: pip install"):
        open_source("s3://bucket/{00000..00001}.tar")
    with pytest.raises(ConfigError, match=r"gs:// URLs needs gcsfs: pip install gcsfs"):
        open_source("gs://bucket/00000.tar")


def test_s3_prefix_of_img2dataset_output(bucket: Bucket, tmp_path: Path) -> None:
    local = make_img2dataset(tmp_path / "i2d")
    prefix = bucket.upload(local, "laion/part")
    src = open_source(prefix)  # the .parquet and _stats.json files beside the tars are ignored
    assert isinstance(src, TarSource)
    assert [str(p) for p in src.paths] == [f"{prefix}/00000.tar", f"{prefix}/00001.tar"]
    assert _samples(src) == _samples(open_source(local)) and not src.stats
    glob = open_source(f"{prefix}/*.tar")
    assert [p.name for p in glob.paths] == ["00000.tar", "00001.tar"]
    with pytest.raises(InputError, match="no files match"):
        open_source(f"{prefix}/*.tgz")
    parquet = bucket.upload(make_parquet(tmp_path / "pq"), "pq")  # Parquet files, read by ranges
    remote_pq, local_pq = open_source(parquet), open_source(tmp_path / "pq")
    assert (
        _samples(remote_pq) == _samples(local_pq)
        and remote_pq.stats.counts == local_pq.stats.counts
    )
    with pytest.raises(InputError, match="holds no files"):
        open_source(bucket.url("nothing/here"))


def test_s3_missing_and_truncated_shards_are_counted(bucket: Bucket, tmp_path: Path) -> None:
    local = make_tars(tmp_path / "t")  # 00001.tar is cut inside its last image
    prefix = bucket.upload(local, "shards")
    src = open_source(f"{prefix}/{{00000..00002}}.tar")  # 00002.tar does not exist
    ref = open_source(local)
    assert _samples(src) == _samples(ref)
    want = ref.stats.to_dict()
    want["total"] += 1
    want["counts"]["missing_file"] = 1
    want["examples"]["missing_file"] = ["00002.tar"]
    assert src.stats.to_dict() == want
    assert "1 missing_file (00002.tar)" in src.stats.report()


def test_http_shards_404_cut_and_retried(tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    root = make_img2dataset(tmp_path / "www", tars=4, per_tar=2)
    with http_file_server(root) as server:
        server.cut.add("/00001.tar")  # every attempt breaks off half way
        server.flaky["/00002.tar"] = 1  # the first attempt breaks off, the retry succeeds
        src = open_source(f"{server.url}/{{00000..00004}}.tar")  # 00004.tar: 404
        got = _samples(src)
        assert server.requests.count("/00000.tar") == 1
        assert server.requests.count("/00001.tar") >= 2  # retried, then given up
        assert server.requests.count("/00002.tar") == 2
    keys = [k for k, _, _ in got]
    assert keys == ["00000.tar/000000000", "00000.tar/000000001"] + [
        f"{t:05d}.tar/{t:05d}{j:04d}" for t in (2, 3) for j in range(2)
    ]
    assert src.stats.counts["missing_file"] == 1
    assert src.stats.examples["missing_file"] == ["00004.tar"]
    cut = src.stats.total - 1
    assert cut >= 1 and all(
        k.startswith("00001.tar")
        for r, ks in src.stats.examples.items()
        for k in ks
        if r != "missing_file"
    )


def test_hf_urls(fake_hub: Any, tmp_path: Path) -> None:
    root = make_img2dataset(tmp_path / "i2d")
    fake_hub.add_repo(
        "someone/laion-tiny", {f"shards/{p.name}": p.read_bytes() for p in root.iterdir()}
    )
    src = open_source("hf://someone/laion-tiny/shards/{00000..00002}.tar")
    assert _samples(src) == _samples(open_source(root))
    assert src.stats.counts == {"missing_file": 1}
    for spec in ("hf://someone/laion-tiny/shards", "hf://someone/laion-tiny/shards/*.tar"):
        assert [p.name for p in open_source(spec).paths] == ["00000.tar", "00001.tar"]


def test_pipe_sources(tmp_path: Path) -> None:
    root = make_tars(tmp_path / "t")
    src = open_source(f"pipe:cat {root}/{{00000..00001}}.tar")
    ref = open_source(root)
    assert _samples(src) == _samples(ref) and src.stats.to_dict() == ref.stats.to_dict()
    missing = open_source(f"pipe:cat {root}/nope.tar")
    assert list(missing) == [] and missing.stats.counts == {"unreadable_file": 1}
    size = (root / "00000.tar").stat().st_size
    failing = open_source(f"pipe:head -c {size // 2} {root}/00000.tar; exit 3")
    assert len(list(failing)) < 4 and failing.stats  # the non-zero exit is noticed


# --------------------------------------------------------------------------------------------
# Encoding into an object store, training from it
# --------------------------------------------------------------------------------------------


def _remote_dataset(prefix: str) -> dict[str, tuple[list[str], list[np.ndarray]]]:
    """key -> (captions, encodings) over every shard under an s3:// prefix, read with pyarrow."""
    fs, path = fsspec.core.url_to_fs(prefix)
    out: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    for name in sorted(fs.ls(path, detail=False)):
        base = name.rsplit("/", 1)[-1]
        if not (base.startswith("part-") and base.endswith(".parquet")):
            continue
        table = pq.read_table(io.BytesIO(fs.cat_file(name)))
        for key, cap, enc in zip(
            *(table.column(c).to_pylist() for c in table.column_names), strict=True
        ):
            assert key not in out or out[key][0], key
            caps, encs = out.setdefault(key, ([], []))
            caps.append(cap)
            encs.append(np.array(enc))
    return out


def _local_dataset(folder: Path) -> dict[str, tuple[list[str], list[np.ndarray]]]:
    out: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    for p in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(p)
        for key, cap, enc in zip(
            *(table.column(c).to_pylist() for c in table.column_names), strict=True
        ):
            caps, encs = out.setdefault(key, ([], []))
            caps.append(cap)
            encs.append(np.array(enc))
    return out


def _same_data(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key][0] == b[key][0], key
        assert all((x == y).all() for x, y in zip(a[key][1], b[key][1], strict=True)), key


def _manifest_without_source(data: bytes | str) -> dict[str, Any]:
    manifest = json.loads(data)
    manifest.pop("source")
    return manifest


def test_encode_s3_to_s3_matches_local_and_trains(
    bucket: Bucket, tmp_path: Path, vqgan: VQGAN
) -> None:
    from dallemini.training.seq2seq import Seq2SeqConfig, Seq2SeqTrainer
    from dallemini.training.settings import load_config
    from tests.train_utils import tiny_bart_overrides

    local = make_tars(tmp_path / "t")
    src = bucket.upload(local, "src")
    out = bucket.url("tokens")
    res = encode_dataset(f"{src}/{{00000..00001}}.tar", out, vqgan, shard_size=3, progress=False)
    ref = encode_dataset(local, tmp_path / "enc", vqgan, shard_size=3, progress=False)
    assert res.complete and (res.images, res.rows) == (ref.images, ref.rows) == (GOOD, GOOD)
    assert res.skipped.to_dict() == ref.skipped.to_dict()
    assert _manifest_without_source(
        bucket.get(f"tokens/{MANIFEST_NAME}")
    ) == _manifest_without_source((tmp_path / "enc" / MANIFEST_NAME).read_text())
    _same_data(_remote_dataset(out), _local_dataset(tmp_path / "enc"))
    n = res.num_shards
    assert bucket.keys("tokens/") == sorted(
        [f"tokens/{MANIFEST_NAME}"]
        + [f"tokens/{shard_name(k)}" for k in range(n)]
        + [f"tokens/{marker_name(k)}" for k in range(n)]
    )
    again = encode_dataset(f"{src}/{{00000..00001}}.tar", out, vqgan, shard_size=3, progress=False)
    assert again.shards_written == [] and again.shards_existing == list(range(n)) and again.complete

    cfg = load_config(
        Seq2SeqConfig,
        None,
        dict(
            data=out,
            out=str(tmp_path / "run"),
            steps=3,
            batch_size=2,
            optimizer="adamw",
            lr=3e-3,
            log_every=1,
            save_every=3,
            bart=tiny_bart_overrides(),
            tensorboard=False,
            shuffle_buffer=4,
        ),
    )
    trainer = Seq2SeqTrainer(cfg)
    trainer.fit()
    state = torch.load(
        tmp_path / "run" / "checkpoints" / "step-000003" / "trainer.pt", weights_only=True
    )
    assert state["data"]["batch"] == 3 and state["data"]["rows"] == GOOD


def test_encode_counts_missing_and_cut_shards_by_name(
    bucket: Bucket, tmp_path: Path, vqgan: VQGAN
) -> None:
    src = bucket.upload(make_tars(tmp_path / "t"), "src")  # 00001.tar is cut inside an image
    out = bucket.url("tokens")
    res = encode_dataset(f"{src}/{{00000..00002}}.tar", out, vqgan, shard_size=4, progress=False)
    assert res.complete and res.images == GOOD  # everything readable was encoded
    summary = res.summary()
    assert "1 missing_file (00002.tar)" in summary
    assert "00001.tar/000000020" in summary and "00001.tar@" in summary
    manifest = json.loads(bucket.get(f"tokens/{MANIFEST_NAME}"))
    assert manifest["skipped"]["examples"]["missing_file"] == ["00002.tar"]
    assert manifest["skipped"]["counts"]["truncated"] == 2


def test_reading_shards_from_s3_is_the_same_and_resumes_exactly(
    bucket: Bucket, tmp_path: Path
) -> None:
    make_shards(tmp_path / "d")
    url = bucket.upload(tmp_path / "d", "tokens")

    def make(folder: str | Path, **kw: object) -> ShardDataset:
        return ShardDataset(
            folder, fake_tokenize, 3, shuffle_buffer=8, seed=5, rank=1, world_size=2, **kw
        )

    reference = list(make(tmp_path / "d", epochs=2))
    remote_batches = list(make(url, epochs=2))
    assert _rows(remote_batches) == _rows(reference)
    for a, b in zip(remote_batches, reference, strict=True):
        assert torch.equal(a.codes, b.codes)
    per_epoch = len(make(url))
    for stop in (1, per_epoch + 1):
        ds = make(url, epochs=2)
        it = iter(ds)
        head = [next(it) for _ in range(stop)]
        state = json.loads(json.dumps(ds.state_dict()))
        resumed = make(url, epochs=2)
        resumed.load_state_dict(state)
        assert _rows(head + list(resumed)) == _rows(reference)
    pytest.importorskip("aiohttp")
    with http_file_server(tmp_path / "d") as server:
        assert _rows(list(make(server.url, epochs=2))) == _rows(reference)
    captions, codes = read_shard(f"{url}/{shard_name(1)}", 4)
    assert captions[0] == "r7" and codes.shape == (5, 4)
    bucket.delete(f"tokens/{shard_name(2)}")
    with pytest.raises(InputError, match=r"part-00002\.parquet, which is missing"):
        make(url)


def test_interrupted_s3_encode_resumes_without_duplicates_or_gaps(
    bucket: Bucket, tmp_path: Path, vqgan: VQGAN
) -> None:
    local = make_tars(tmp_path / "t")
    src = bucket.upload(local, "src")
    out = bucket.url("tokens")
    kw: dict[str, Any] = dict(batch_size=2, shard_size=3, progress=False)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(_Interrupting(open_source(src), 7), out, vqgan, **kw)
    assert bucket.keys("tokens/") == sorted(
        f"tokens/{n}" for n in (shard_name(0), shard_name(1), marker_name(0), marker_name(1))
    )
    # a crash between a shard's PUT and its marker: the shard is not done
    bucket.delete(f"tokens/{marker_name(1)}")
    resumed = _Interrupting(open_source(src), None)
    res = encode_dataset(resumed, out, vqgan, **kw)
    assert res.shards_existing == [0] and res.shards_written == [1, 2, 3] and res.complete
    first_shard = {f"00000.tar/{i:09d}" for i in range(3)}
    assert resumed.loaded and not first_shard & set(resumed.loaded)  # shard 0 was not read again

    fresh = tmp_path / "fresh"
    encode_dataset(local, fresh, vqgan, **kw)
    _same_data(_remote_dataset(out), _local_dataset(fresh))
    assert _manifest_without_source(
        bucket.get(f"tokens/{MANIFEST_NAME}")
    ) == _manifest_without_source((fresh / MANIFEST_NAME).read_text())
    assert len(bucket.keys(f"tokens/{DONE_DIR}/")) == res.num_shards


def test_two_workers_write_disjoint_s3_shards(bucket: Bucket, tmp_path: Path, vqgan: VQGAN) -> None:
    local = make_tars(tmp_path / "t")
    out = bucket.url("tokens")
    r0 = encode_dataset(local, out, vqgan, shard_size=2, worker=(0, 2), progress=False)
    assert not r0.complete and f"tokens/{MANIFEST_NAME}" not in bucket.keys("tokens/")
    r1 = encode_dataset(local, out, vqgan, shard_size=2, worker=(1, 2), progress=False)
    assert r1.complete and not set(r0.shards_written) & set(r1.shards_written)
    whole = tmp_path / "whole"
    encode_dataset(local, whole, vqgan, shard_size=2, progress=False)
    _same_data(_remote_dataset(out), _local_dataset(whole))
    assert json.loads(bucket.get(f"tokens/{MANIFEST_NAME}")) == json.loads(
        (whole / MANIFEST_NAME).read_text()
    )
    with pytest.raises(ConfigError, match="shard_size"):
        encode_dataset(local, out, vqgan, shard_size=3, progress=False)


def test_encode_workers_fetch_only_the_tars_of_their_shards(tmp_path: Path, vqgan: VQGAN) -> None:
    pytest.importorskip("aiohttp")
    root = make_img2dataset(tmp_path / "www", tars=4, per_tar=3)
    out = tmp_path / "tokens"
    with http_file_server(root) as server:
        pattern = f"{server.url}/{{00000..00003}}.tar"
        tars = lambda: sorted(p for p in server.requests if p.endswith(".tar"))  # noqa: E731
        r0 = encode_dataset(pattern, out, vqgan, shard_size=3, worker=(0, 2), progress=False)
        assert tars() == ["/00000.tar", "/00002.tar"] and not r0.complete
        server.requests.clear()
        r1 = encode_dataset(pattern, out, vqgan, shard_size=3, worker=(1, 2), progress=False)
        assert tars() == ["/00001.tar", "/00003.tar"] and r1.complete
        server.requests.clear()
        again = encode_dataset(pattern, out, vqgan, shard_size=3, progress=False)
        assert tars() == [] and again.shards_written == []  # all done: nothing downloaded
    whole = tmp_path / "whole"
    encode_dataset(root, whole, vqgan, shard_size=3, progress=False)
    _same_data(_local_dataset(out), _local_dataset(whole))


def test_stats_counts_number_the_records(tmp_path: Path, vqgan: VQGAN) -> None:
    root = make_img2dataset(tmp_path / "i2d", tars=3, per_tar=3)
    (root / "00000_stats.json").write_text(json.dumps({"successes": 4}))  # one record lost
    (root / "00002_stats.json").write_text(json.dumps({"successes": 2}))  # one too many
    out = tmp_path / "tokens"
    res = encode_dataset(root, out, vqgan, shard_size=4, progress=False)
    assert res.complete and res.source_records == 9 and res.images == 8
    assert res.skipped.counts == {"beyond_stats": 1}
    rows = {p.name: pq.read_table(p).column("key").to_pylist() for p in out.glob("part-*")}
    # numbers: 00000.tar 0-3 (3 records), 00001.tar 4-6, 00002.tar 7-8; shards of 4 numbers
    assert [len(rows[n]) for n in sorted(rows)] == [3, 4, 1]
    assert rows[sorted(rows)[1]][0] == "00001.tar/000010000"


def test_reader_reads_the_next_shard_ahead(tmp_path: Path) -> None:
    make_shards(tmp_path / "d")
    ds = ShardDataset(tmp_path / "d", fake_tokenize, 7, shuffle=False, epochs=1)
    loads: list[tuple[int, str]] = []
    load = ds._load

    def recording(s: int) -> Any:
        loads.append((s, threading.current_thread().name))
        return load(s)

    ds._load = recording  # type: ignore[method-assign]
    it = iter(ds)
    next(it)  # the rows of shard 0 only
    deadline = time.time() + 10
    while len(loads) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert [s for s, _ in loads] == [0, 1]  # shard 1 is read while shard 0 is still in use
    assert all(name.startswith("shard-read-ahead") for _, name in loads)
    assert _rows([next(it)]) == list(range(7, 14))


def test_cli_encode_s3_to_s3(
    bucket: Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dallemini.random_model import create_random_model
    from tests.test_cli import run_cli

    tiny = create_random_model(tmp_path / "tiny")
    src = bucket.upload(make_img2dataset(tmp_path / "i2d"), "src")
    out = bucket.url("tokens")
    args = ("encode", f"{src}/{{00000..00001}}.tar", out, "--model", tiny, "--device", "cpu")
    code, stdout, err = run_cli(capsys, *args, "--shard-size", "2")
    assert code == 0, err
    assert f"dataset complete: {out}/{MANIFEST_NAME}" in stdout and "wrote 3 shard(s)" in stdout
    code, stdout, _ = run_cli(capsys, *args, "--shard-size", "2", "--shard", "1/2")
    assert code == 0 and "wrote 0 shard(s), 1 were already done, of 3" in stdout
    code, _, err = run_cli(capsys, "encode", src, "https://example.invalid/x", "--model", tiny)
    assert code == 2 and "read-only" in err and "Traceback" not in err


def test_killed_encode_process_resumes_on_s3(bucket: Bucket, tmp_path: Path) -> None:
    from dallemini.models.loading import load_vqgan
    from dallemini.random_model import create_random_model
    from tests.train_utils import subprocess_env

    tiny = create_random_model(tmp_path / "tiny")
    local = make_img2dataset(tmp_path / "i2d")
    out = bucket.url("tokens")
    # the second tar arrives only after a minute: the process is killed while it waits for it
    slow_src = f"pipe:cat {local}/00000.tar::pipe:sleep 60; cat {local}/00001.tar"
    argv = [sys.executable, "-m", "dallemini.cli", "encode", slow_src, out]
    argv += ["--model", str(tiny), "--shard-size", "2", "--device", "cpu"]
    proc = subprocess.Popen(
        argv,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the pipe's shell goes with it
    )
    try:
        deadline = time.time() + 120
        while f"tokens/{marker_name(0)}" not in bucket.keys("tokens/"):
            assert proc.poll() is None and time.time() < deadline, "the encode did not get going"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert bucket.keys("tokens/") == [f"tokens/{marker_name(0)}", f"tokens/{shard_name(0)}"]

    vq = load_vqgan(tiny)
    src = f"pipe:cat {local}/00000.tar::pipe:cat {local}/00001.tar"
    res = encode_dataset(src, out, vq, shard_size=2, progress=False)
    assert res.shards_existing == [0] and res.shards_written == [1, 2] and res.complete
    fresh = tmp_path / "fresh"
    encode_dataset(local, fresh, vq, shard_size=2, progress=False)
    _same_data(_remote_dataset(out), _local_dataset(fresh))
    assert _manifest_without_source(
        bucket.get(f"tokens/{MANIFEST_NAME}")
    ) == _manifest_without_source((fresh / MANIFEST_NAME).read_text())


def test_unwritable_destinations(tmp_path: Path, vqgan: VQGAN, bucket: Bucket) -> None:
    local = make_tars(tmp_path / "t")
    with pytest.raises(InputError, match="read-only"):
        encode_dataset(local, "https://example.invalid/tokens", vqgan, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        encode_dataset(local, "s3://no-such-bucket-here/tokens", vqgan, progress=False)
