"""Atomic, verifiable, resumable training state (DESIGN.md §3): `step-000123/` folders and a `latest` pointer.

A checkpoint is written to a temp folder, every file fsynced and hashed into `state.json`, then the folder
is renamed into place and `latest` is replaced atomically. Loading verifies the hashes; a corrupt or
partial newest checkpoint is reported and the previous complete one is used, so a kill -9 at any moment
loses at most the work since the last finished checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import CheckpointError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "state.json"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step touches: Python, NumPy, torch CPU and CUDA."""
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() saved."""
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    """A loaded checkpoint: model weights, trainer state (optimizer, scheduler, scaler, RNG), JSON extras."""

    path: Path
    step: int
    model: dict[str, Tensor]
    trainer: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: dict[str, Tensor],
    trainer: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write step-NNNNNN/ atomically: model.safetensors, trainer.pt (optimizer/scheduler/scaler/RNG), state.json."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {"model.safetensors": tmp / "model.safetensors", "trainer.pt": tmp / "trainer.pt"}
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model.items()},
            str(files["model.safetensors"]),
        )
        torch.save(trainer or {}, files["trainer.pt"])
        manifest = {
            "step": step,
            "files": {
                name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for name, p in files.items()
            },
            "extra": extra or {},
        }
        (tmp / STATE_FILE).write_text(json.dumps(manifest, indent=2))
        for p in (*files.values(), tmp / STATE_FILE):
            _fsync(p)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        pointer = root / f".{LATEST}.tmp-{os.getpid()}"
        pointer.write_text(final.name + "\n")
        _fsync(pointer)
        os.replace(pointer, root / LATEST)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(root / step_dir_name(old), ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[int]:
    """Steps of the step-NNNNNN folders under root, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()
    )


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Return the manifest of a complete checkpoint folder or raise a CheckpointError saying what is wrong."""
    state = path / STATE_FILE
    if not state.is_file():
        raise CheckpointError(f"{path}: no {STATE_FILE}; the checkpoint was not finished")
    try:
        manifest = json.loads(state.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{state} is unreadable: {e}") from e
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{f} has {f.stat().st_size} bytes, expected {meta['bytes']} (truncated?)"
            )
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f} does not match its recorded checksum (corrupt)")
    return manifest


def _read(path: Path) -> Checkpoint:
    manifest = verify_checkpoint(path)
    model = load_file(str(path / "model.safetensors"))
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    return Checkpoint(
        path=path, step=int(manifest["step"]), model=model, trainer=trainer, extra=manifest["extra"]
    )


def load_checkpoint(root: str | os.PathLike, step: int | None = None) -> Checkpoint:
    """Load step (or the newest complete checkpoint); a broken newest one is reported and skipped."""
    root = Path(root)
    if step is not None:
        return _read(root / step_dir_name(step))
    candidates = list_checkpoints(root)
    pointer = root / LATEST
    if pointer.is_file():
        m = STEP_DIR.match(pointer.read_text().strip())
        if m and int(m.group(1)) not in candidates:
            log.warning("%s names %s, which does not exist", pointer, m.group(0))
    if not candidates:
        raise CheckpointError(f"no checkpoint found in {root}")
    errors = []
    for s in reversed(candidates):
        try:
            ckpt = _read(root / step_dir_name(s))
        except (CheckpointError, RuntimeError, OSError, ValueError) as e:
            msg = f"skipping checkpoint {step_dir_name(s)}: {e}"
            log.warning(msg)
            errors.append(msg)
            continue
        if errors:
            log.warning("resuming from %s instead", ckpt.path)
        return ckpt
    raise CheckpointError(f"no complete checkpoint in {root}: " + "; ".join(errors))
