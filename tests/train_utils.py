"""Helpers for the training tests: a small learnable encoded dataset written in the shard format."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from dallemini.config import VQGAN_PRESETS
from dallemini.data.shards import MANIFEST_NAME, write_shard
from dallemini.training.checkpointing import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]

COLOURS = ["red", "green", "blue", "yellow"]
THINGS = ["cat", "dog", "car", "tree", "boat", "cake", "fish", "bird"]
GRID, N_EMBED = 4, 64  # the tiny VQGAN preset: 64x64 images -> 4x4 codes from 64 entries


def write_token_dataset(
    folder: Path, rows: int = 32, shards: int = 2, seed: int = 0, repeat: int = 1
) -> Path:
    """Captions 'a {colour} {thing}' whose 16 codes are a fixed function of (colour, thing) plus noise-free layout."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [(c, t) for c in COLOURS for t in THINGS][:rows]
    pairs = pairs * repeat
    per = -(-len(pairs) // shards)
    entries = []
    base = rng.integers(0, N_EMBED, size=(len(COLOURS), GRID * GRID))
    for s in range(shards):
        chunk = pairs[s * per : (s + 1) * per]
        if not chunk:
            break
        captions = [f"a {c} {t}" for c, t in chunk]
        codes = np.stack(
            [
                (base[COLOURS.index(c)] + 7 * THINGS.index(t) + np.arange(GRID * GRID)) % N_EMBED
                for c, t in chunk
            ]
        )
        name = f"part-{s:05d}.parquet"
        write_shard(
            folder / name, [f"{s}-{i}" for i in range(len(chunk))], captions, codes, n_embed=N_EMBED
        )
        entries.append({"file": name, "rows": len(chunk)})
    manifest = {
        "format": "dallemini-encoded",
        "version": 1,
        "grid_size": GRID,
        "n_embed": N_EMBED,
        "vqgan_fingerprint": VQGAN_PRESETS["tiny"].fingerprint(),
        "count": sum(e["rows"] for e in entries),
        "shards": entries,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def tiny_bart_overrides() -> dict[str, int]:
    """A DalleBart small enough that a training step takes milliseconds on 2 cores."""
    return {
        "d_model": 32,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "attention_heads": 2,
        "ffn_dim": 64,
        "max_text_length": 16,
    }


def subprocess_env() -> dict[str, str]:
    """The environment for a CLI child process: this checkout on the path, one thread, no torchrun vars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE"))}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


def kill9_resume_and_compare(
    command: Callable[[Path, list[str]], list[str]],
    tmp_path: Path,
    steps: int,
    wait_for: int = 3,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An uninterrupted run beside one killed with SIGKILL after `wait_for` checkpoints and resumed.

    `command(out, extra_args)` gives the argv of a training run into `out`. Asserts that the final
    model weights are bitwise equal and returns both final trainer states (optimizer, data, ...).
    """
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference = subprocess.Popen(
        command(ref, []), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    proc = subprocess.Popen(
        command(run, []),
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(run / "checkpoints")) < wait_for:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list_checkpoints(run / "checkpoints")
    assert done and done[-1] < steps, "the run finished before it could be killed"
    resumed = subprocess.run(
        command(run, ["--resume"]), env=subprocess_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    last = f"step-{steps:06d}"
    a = load_file(str(ref / "checkpoints" / last / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / last / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ta = torch.load(ref / "checkpoints" / last / "trainer.pt", weights_only=True)
    tb = torch.load(run / "checkpoints" / last / "trainer.pt", weights_only=True)
    assert ta["data"] == tb["data"]
    return ta, tb
