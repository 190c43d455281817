"""No lost work and no tracebacks: checkpoint pruning, stale temp folders, malformed state.json, corrupt shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dallemini.data.shards import MANIFEST_NAME, ShardDataset
from dallemini.errors import InputError
from dallemini.training.checkpointing import (
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from dallemini.training.seq2seq import Seq2SeqTrainer
from tests.test_cli import run_here
from tests.train_utils import write_token_dataset
from tests.training.test_seq2seq import _cfg, _cli_args

DEAD_PID = 99_999_999  # above any Linux pid_max: never a live process


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3).state_dict()


def _garbage_step_folders(root: Path, steps: tuple[int, ...]) -> None:
    """Step folders that are not complete checkpoints: empty, half-written, or with a broken state.json."""
    kinds = [
        lambda p: None,
        lambda p: (p / "model.safetensors").write_bytes(b"half"),
        lambda p: (p / "state.json").write_text('{"step": 1, "files": [1, 2]}'),
    ]
    for i, s in enumerate(steps):
        p = root / f"step-{s:06d}"
        p.mkdir()
        kinds[i % len(kinds)](p)


def test_garbage_step_folders_never_cost_a_real_checkpoint(tmp_path: Path) -> None:
    w = _weights()
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, w, keep_last=3)
    _garbage_step_folders(tmp_path, (25, 50, 60, 70))
    save_checkpoint(tmp_path, 40, w, keep_last=3)
    # only complete checkpoints older than the new one count and go; what is not understood stays
    assert list_checkpoints(tmp_path) == [20, 25, 30, 40, 50, 60, 70]
    for step in (20, 30, 40):
        verify_checkpoint(tmp_path / f"step-{step:06d}")
    assert load_checkpoint(tmp_path).step == 40
    save_checkpoint(tmp_path, 41, w, keep_last=1)  # keep_last=1: only the one just written
    assert list_checkpoints(tmp_path) == [25, 41, 50, 60, 70]
    assert load_checkpoint(tmp_path).step == 41


def test_save_removes_temp_folders_of_dead_processes(tmp_path: Path) -> None:
    w = _weights()
    save_checkpoint(tmp_path, 1, w)
    dead = tmp_path / f".step-000002.tmp-{DEAD_PID}"
    mine = tmp_path / f".step-000003.tmp-{os.getpid()}"  # a killed run that had this PID
    alive = tmp_path / f".step-000002.tmp-{os.getppid()}"  # a live writer: not ours to delete
    pointer = tmp_path / f".latest.tmp-{DEAD_PID}"
    for d in (dead, mine, alive):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
    pointer.write_text("step-000002\n")
    save_checkpoint(tmp_path, 2, w)
    assert not dead.exists() and not mine.exists() and not pointer.exists()
    assert alive.exists()
    assert list_checkpoints(tmp_path) == [1, 2]


@pytest.mark.parametrize(
    "state",
    [
        {"step": 2, "files": [1, 2], "extra": {}},
        [1, 2],
        {"step": 2, "files": {"model.safetensors": 5}, "extra": {}},
        {"step": 2, "files": {"model.safetensors": {"sha256": 1, "bytes": "x"}}, "extra": {}},
        {"step": "two", "files": {}, "extra": {}},
        {"step": 2, "files": {}, "extra": []},
        {"step": 2, "files": {"../../etc/passwd": {"sha256": "0", "bytes": 1}}, "extra": {}},
    ],
)
def test_malformed_state_json_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, state: object
) -> None:
    w = _weights()
    save_checkpoint(tmp_path, 1, w)
    save_checkpoint(tmp_path, 2, w)
    (tmp_path / "step-000002" / "state.json").write_text(json.dumps(state))
    ck = load_checkpoint(tmp_path)
    assert ck.step == 1
    assert "skipping checkpoint step-000002" in caplog.text
    assert "step-000001" in caplog.text  # says which one it resumes from instead
    save_checkpoint(tmp_path, 3, w, keep_last=1)  # pruning does not trip over it either
    assert list_checkpoints(tmp_path) == [2, 3]


def test_resume_survives_garbage_and_cleans_temps_of_killed_runs(tmp_path: Path) -> None:
    data = write_token_dataset(tmp_path / "data")
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    Seq2SeqTrainer(_cfg(data, out, steps=4, save_every=1, keep_last=2)).fit()
    assert list_checkpoints(ckpts) == [3, 4]
    _garbage_step_folders(ckpts, (7, 8, 9))
    temps = [
        ckpts
        / f".step-000005.tmp-{os.getppid()}",  # a live PID, but rank 0 starting owns the folder
        ckpts / f".step-000005.tmp-{DEAD_PID}",
        out / ".model.tmp-k1lled0x",  # save_model_dir's temp from an export that was killed
    ]
    for t in temps:
        t.mkdir()
        (t / "weights").write_bytes(b"\0" * 1000)
    (ckpts / f".latest.tmp-{DEAD_PID}").write_text("step-000005\n")
    Seq2SeqTrainer(_cfg(data, out, steps=6, save_every=1, keep_last=2, resume=True)).fit()
    assert not any(t.exists() for t in temps)
    assert not list(ckpts.glob(".*.tmp-*"))
    assert list_checkpoints(ckpts) == [5, 6, 7, 8, 9]
    assert load_checkpoint(ckpts).step == 6  # the garbage is skipped (with a warning)
    assert (out / "model" / "bart.safetensors").is_file()


def _corrupt(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "garbage":
        path.write_bytes(b"not parquet at all " * 20)
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # footer intact, a page header overwritten
        path.write_bytes(raw[:4] + b"\xff" * 200 + raw[204:])


@pytest.mark.parametrize("how", ["garbage", "truncated", "pages"])
@pytest.mark.parametrize("manifest", [True, False])
def test_corrupt_shard_names_the_file(tmp_path: Path, how: str, manifest: bool) -> None:
    data = write_token_dataset(tmp_path / "data")
    bad = data / "part-00001.parquet"
    _corrupt(bad, how)
    if not manifest:
        (data / MANIFEST_NAME).unlink()
    with pytest.raises(InputError) as info:
        tokenize = lambda c: (torch.zeros(len(c), 2), torch.ones(len(c), 2))  # noqa: E731
        ds = ShardDataset(data, tokenize, 4, epochs=1)
        for _ in ds:
            pass
    msg = str(info.value)
    assert str(bad) in msg and "dallemini encode" in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("how", "manifest"), [("truncated", True), ("truncated", False), ("pages", True)]
)
def test_cli_train_on_a_corrupt_shard_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str, manifest: bool
) -> None:
    data = write_token_dataset(tmp_path / "data")
    bad = data / "part-00001.parquet"
    _corrupt(bad, how)
    if not manifest:
        (data / MANIFEST_NAME).unlink()
    code, err = run_here(capsys, *_cli_args(data, tmp_path / "run", 4))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and str(bad) in errors[0], err[-3000:]
    assert "Traceback" not in err
