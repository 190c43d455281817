"""Schedules and atomic training checkpoints: exact resume of RNG/optimizer state, refusal of broken checkpoints."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dallemini.errors import CheckpointError, ConfigError
from dallemini.training.checkpointing import (
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dallemini.training.schedule import lr_factor, make_scheduler


def test_schedules() -> None:
    assert lr_factor(0, 4, 10) == pytest.approx(0.25)
    assert lr_factor(3, 4, 10) == pytest.approx(1.0)
    assert lr_factor(7, 4, 10) == pytest.approx(0.5)  # linear: halfway through the decay
    assert lr_factor(10, 4, 10) == pytest.approx(0.0)
    assert lr_factor(7, 4, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 4, 10, "constant") == 1.0
    assert lr_factor(10, 4, 10, min_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="decay"):
        lr_factor(0, 1, 2, "exp")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = make_scheduler(opt, 2, 6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.075, 0.05, 0.025])


def _train_state(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    return m, opt


def test_round_trip_restores_everything(tmp_path: Path) -> None:
    m, opt = _train_state(0)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint(
        tmp_path,
        5,
        m.state_dict(),
        {"optimizer": opt.state_dict(), "rng": rng_state()},
        extra={"data": {"epoch": 1, "row": 17}},
    )
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ck = load_checkpoint(tmp_path)
    assert ck.step == 5 and ck.extra == {"data": {"epoch": 1, "row": 17}}
    set_rng_state(ck.trainer["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    m2, opt2 = _train_state(1)
    m2.load_state_dict(ck.model)
    opt2.load_state_dict(ck.trainer["optimizer"])
    for a, b in zip(m.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_keep_last_and_broken_newest_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m, _ = _train_state(0)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, m.state_dict(), keep_last=2)
    assert list_checkpoints(tmp_path) == [3, 4]
    assert (tmp_path / "latest").read_text().strip() == "step-000004"
    f = tmp_path / "step-000004" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])  # truncated
    ck = load_checkpoint(tmp_path)
    assert ck.step == 3
    assert "step-000004" in caplog.text and "truncated" in caplog.text
    # a temp folder from a killed save is ignored, and an unfinished step folder is skipped
    (tmp_path / ".step-000005.tmp-123").mkdir()
    (tmp_path / "step-000006").mkdir()
    assert load_checkpoint(tmp_path).step == 3
    g = tmp_path / "step-000003" / "trainer.pt"
    g.write_bytes(b"x" + g.read_bytes()[1:])
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path / "empty")
