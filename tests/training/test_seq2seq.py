"""The DalleBart trainer: loss falls, exact resume after kill -9, torchrun data parallelism, bad state refused."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dallemini.errors import ConfigError
from dallemini.pipeline import TextToImage
from dallemini.random_model import create_random_model
from dallemini.training.checkpointing import load_checkpoint
from dallemini.training.seq2seq import Seq2SeqConfig, Seq2SeqTrainer
from dallemini.training.settings import load_config, parse_overrides
from tests.train_utils import (
    kill9_resume_and_compare,
    subprocess_env,
    tiny_bart_overrides,
    write_token_dataset,
)


def _cfg(data: Path, out: Path, **kw) -> Seq2SeqConfig:
    base = dict(
        data=str(data),
        out=str(out),
        steps=40,
        batch_size=16,
        optimizer="adamw",
        lr=3e-3,
        log_every=10,
        save_every=20,
        bart=tiny_bart_overrides(),
        tensorboard=False,
    )
    base.update(kw)
    return load_config(Seq2SeqConfig, None, base)


def _cli_args(data: Path, out: Path, steps: int, extra: list[str] | None = None) -> list[str]:
    args = [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "16",
        "--optimizer",
        "adamw",
        "--lr",
        "0.003",
        "--device",
        "cpu",
        "--set",
        "tensorboard=false",
        "--set",
        "log_every=50",
    ]
    for k, v in tiny_bart_overrides().items():
        args += ["--set", f"bart.{k}={v}"]
    return args + (extra or [])


def test_loss_falls_and_export_generates(tmp_path: Path) -> None:
    data = write_token_dataset(tmp_path / "data")
    vq = create_random_model(tmp_path / "random", preset="tiny")
    cfg = _cfg(
        data,
        tmp_path / "run",
        steps=60,
        eval_data=str(data),
        vqgan=str(vq),
        sample_every=30,
        sample_images=2,
        tensorboard=True,
    )
    trainer = Seq2SeqTrainer(cfg)
    first = trainer.evaluate()["loss"]
    last = trainer.fit()
    assert last["eval/loss"] < 0.75 * first, (first, last)
    assert last["train/tokens_per_s"] > 0
    run = tmp_path / "run"
    assert (run / "samples" / "step-000030.png").is_file()
    assert (run / "samples" / "step-000060.png").is_file()
    assert any((run / "logs").glob("events.out.tfevents.*"))
    assert json.loads((run / "train_config.json").read_text())["steps"] == 60
    pipe = TextToImage.from_pretrained(run / "model", device="cpu")
    images = pipe("a red cat", num_images=2, seed=0)
    assert len(images) == 2 and images[0].image.size == (64, 64)


def test_config_file_overrides_and_errors(tmp_path: Path) -> None:
    data = write_token_dataset(tmp_path / "data")
    f = tmp_path / "train.yaml"
    f.write_text(f"data: {data}\nsteps: 7\nlr: 0.01\nbart:\n  d_model: 32\n")
    cfg = load_config(Seq2SeqConfig, f, parse_overrides(["lr=0.002", "bart.encoder_layers=1"]))
    assert cfg.steps == 7 and cfg.lr == 0.002
    assert cfg.bart == {"d_model": 32, "encoder_layers": 1}
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(Seq2SeqConfig, f, {"learning_rate": 1})
    with pytest.raises(ConfigError, match="steps"):
        load_config(Seq2SeqConfig, f, {"steps": 0})
    with pytest.raises(ConfigError, match="expects int"):
        load_config(Seq2SeqConfig, f, parse_overrides(["steps=many"]))
    with pytest.raises(ConfigError, match="bart: unknown"):
        Seq2SeqTrainer(_cfg(data, tmp_path / "r", bart={"d_modle": 8}))


def test_a_run_shorter_than_its_shards_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_token_dataset(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="dallemini.train"):
        Seq2SeqTrainer(_cfg(data, tmp_path / "short", steps=1, shuffle_buffer=0))
    assert "set shuffle_buffer >= " in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dallemini.train"):
        Seq2SeqTrainer(_cfg(data, tmp_path / "whole", steps=1, shuffle_buffer=1_000_000))
    assert "shuffle_buffer" not in caplog.text


def test_original_recipe_is_one_config_away(tmp_path: Path) -> None:
    cfg = load_config(Seq2SeqConfig, "original-mini", {"data": str(tmp_path)})
    assert (cfg.preset, cfg.optimizer, cfg.lr, cfg.warmup_steps, cfg.decay, cfg.precision) == (
        "mini",
        "adafactor",
        0.005,
        2000,
        "linear",
        "bfloat16",
    )
    assert cfg.batch_size * cfg.grad_accum * 8 == 3584  # on 8 ranks, as the original's 8 TPU chips
    assert load_config(Seq2SeqConfig, "original-mega", {"data": str(tmp_path)}).preset == "mega"


def test_existing_run_needs_resume_and_corrupt_checkpoint_falls_back(tmp_path: Path) -> None:
    data = write_token_dataset(tmp_path / "data")
    out = tmp_path / "run"
    Seq2SeqTrainer(_cfg(data, out, steps=4, save_every=2)).fit()
    with pytest.raises(ConfigError, match="--resume"):
        Seq2SeqTrainer(_cfg(data, out, steps=6, save_every=2)).fit()
    newest = out / "checkpoints" / "step-000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    trainer = Seq2SeqTrainer(_cfg(data, out, steps=6, save_every=2, resume=True))
    assert trainer.load() == 2  # the broken step 4 is skipped
    trainer.fit()
    assert load_checkpoint(out / "checkpoints").step == 6


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    data = write_token_dataset(tmp_path / "data", repeat=4)
    steps = 300
    extra = ["--set", "save_every=25", "--set", "keep_last=0"]

    def command(out: Path, more: list[str]) -> list[str]:
        return [sys.executable, "-m", "dallemini.cli", *_cli_args(data, out, steps, extra + more)]

    kill9_resume_and_compare(command, tmp_path, steps)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_ranks_match_one_process(tmp_path: Path, strategy: str) -> None:
    # 16 rows: one global batch of 16 = 2 ranks × 8, so both runs see the same examples every step.
    data = write_token_dataset(tmp_path / "data", rows=16, shards=3)
    steps = 5
    common = ["--set", "blank_caption_prob=0", "--set", "keep_last=1", "--set", "save_every=1"]
    one = _cli_args(data, tmp_path / "one", steps, common)
    subprocess.run(
        [sys.executable, "-m", "dallemini.cli", *one],
        check=True,
        env=subprocess_env(),
        capture_output=True,
    )
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    # FSDP also goes through a checkpoint: the last two steps are deleted and redone from step 3.
    resume = [] if strategy == "ddp" else ["--resume"]
    for more in ([], resume) if resume else ([],):
        two = _cli_args(data, tmp_path / "two", steps, [*common, "--distributed", strategy, *more])
        two[two.index("--batch-size") + 1] = "8"
        two += ["--set", "keep_last=0"]
        r = subprocess.run(
            [*launch, "-m", "dallemini.cli", *two],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        if more != resume:
            for s in (4, 5):
                shutil.rmtree(tmp_path / "two" / "checkpoints" / f"step-{s:06d}")
    last = f"step-{steps:06d}"
    a = load_file(str(tmp_path / "one" / "checkpoints" / last / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / last / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=k)
    state = json.loads((tmp_path / "two" / "checkpoints" / last / "state.json").read_text())
    assert state["extra"]["world_size"] == 2
    exported = load_file(str(tmp_path / "two" / "model" / "bart.safetensors"))
    assert all(torch.equal(exported[k], b[k]) for k in b)  # the model dir holds the full weights


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_under_torchrun_match_one_process(tmp_path: Path, strategy: str) -> None:
    """Two "nodes" (two torchrun launchers on 127.0.0.1, one process each, c10d rendezvous, gloo)
    with batch 8 each train as one process with batch 16."""
    data = write_token_dataset(tmp_path / "data", rows=16, shards=3)
    steps = 4
    common = [
        "--set",
        "blank_caption_prob=0",
        "--set",
        "keep_last=1",
        "--set",
        f"save_every={steps}",
    ]
    one = _cli_args(data, tmp_path / "one", steps, common)
    subprocess.run(
        [sys.executable, "-m", "dallemini.cli", *one],
        check=True,
        env=subprocess_env(),
        capture_output=True,
    )
    two = _cli_args(data, tmp_path / "two", steps, [*common, "--distributed", strategy])
    two[two.index("--batch-size") + 1] = "8"
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{sock.getsockname()[1]}"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "two-nodes",
                "--max-restarts",
                "0",
                "-m",
                "dallemini.cli",
                *two,
            ],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    for node in nodes:
        out, _ = node.communicate(timeout=300)
        assert node.returncode == 0, out[-3000:]
    last = f"step-{steps:06d}"
    a = load_file(str(tmp_path / "one" / "checkpoints" / last / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / last / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=k)
    state = json.loads((tmp_path / "two" / "checkpoints" / last / "state.json").read_text())
    assert state["extra"]["world_size"] == 2


def test_cli_train_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_cli import run_here

    code, err = run_here(capsys, "train", "--out", tmp_path / "x")
    assert code == 2 and "data must name" in err
    code, err = run_here(capsys, "train", "--data", tmp_path / "missing", "--out", tmp_path / "x")
    assert code == 2 and "is not a folder" in err
    code, err = run_here(capsys, "train", "--data", tmp_path, "--set", "lr")
    assert code == 2 and "key=value" in err


def test_grad_accum_matches_one_big_batch_and_ema_is_exported(tmp_path: Path) -> None:
    data = write_token_dataset(tmp_path / "data", rows=16, shards=1)
    common = dict(steps=4, blank_caption_prob=0.0, save_every=4, shuffle_buffer=0)
    big = Seq2SeqTrainer(_cfg(data, tmp_path / "big", batch_size=16, **common))
    big.fit()
    small = Seq2SeqTrainer(_cfg(data, tmp_path / "small", batch_size=8, grad_accum=2, **common))
    small.fit()
    a, b = big.modules["model"].state_dict(), small.modules["model"].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=k)

    ema = Seq2SeqTrainer(_cfg(data, tmp_path / "ema", batch_size=16, ema_decay=0.5, **common))
    ema.fit()
    exported = load_file(str(tmp_path / "ema" / "model" / "bart.safetensors"))
    raw = ema.modules["model"].state_dict()
    names = [n for n, _ in ema.modules["model"].named_parameters()]
    shadow = dict(zip(names, ema.ema.shadow, strict=True))
    assert all(torch.equal(exported[k], shadow[k]) for k in shadow)  # the model dir holds the EMA
    assert any(not torch.equal(exported[k], raw[k]) for k in shadow)  # ... not the raw weights
    # and the EMA is resumable: it is in the checkpoint
    assert "ema" in load_checkpoint(tmp_path / "ema" / "checkpoints").trainer


def test_bfloat16_autocast_trains(tmp_path: Path) -> None:
    data = write_token_dataset(tmp_path / "data")
    trainer = Seq2SeqTrainer(
        _cfg(data, tmp_path / "run", precision="bfloat16", eval_data=str(data))
    )
    first = trainer.evaluate()["loss"]
    last = trainer.fit()
    assert last["eval/loss"] < 0.85 * first, (first, last)


def test_wandb_offline_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = write_token_dataset(tmp_path / "data")
    Seq2SeqTrainer(_cfg(data, tmp_path / "run", steps=4, log_every=2, wandb=True)).fit()
    logs = tmp_path / "run" / "logs" / "wandb"
    runs = list(logs.glob("offline-run-*/run-*.wandb"))
    debug = logs / "debug-internal.log"
    why = debug.read_text()[-2000:] if debug.is_file() else sorted(map(str, logs.rglob("*")))
    assert len(runs) == 1 and b"train/loss" in runs[0].read_bytes(), why
