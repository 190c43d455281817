"""Atomic, verifiable, resumable training state (DESIGN.md §3): `step-000123/` folders and a `latest` pointer.

A checkpoint is written to a temp folder, every file fsynced and hashed into `state.json`, then the folder
is renamed into place and `latest` is replaced atomically. Loading verifies the hashes; a corrupt or
partial newest checkpoint is reported and the previous complete one is used, so a kill -9 at any moment
loses at most the work since the last finished checkpoint.

`keep_last` pruning counts and deletes only complete checkpoints older than the one just written; step
folders it does not recognise as complete are left alone and never cost a real checkpoint. Temp folders
of killed saves (`.step-N.tmp-PID`, `.latest.tmp-PID`) are removed once their process is gone.
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

from ..checkpoints.safe_load import read_json_object
from ..errors import CheckpointError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{6,})$")
TEMP = re.compile(r"^\.(?:step-\d{6,}|latest)\.tmp-(\d+)$")  # what save_checkpoint writes first
STATE_FILE = "state.json"
LATEST = "latest"
REQUIRED_FILES = ("model.safetensors", "trainer.pt")


def step_dir_name(step: int) -> str:
    """Folder name of a step's checkpoint: step-000123."""
    return f"step-{step:06d}"


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs now (unknown counts as running, so its files are kept)."""
    if pid == os.getpid():  # not in the middle of another save: the files are a dead run's
        return False
    if os.name == "nt":  # os.kill would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


def remove_stale_temps(root: str | os.PathLike, all_pids: bool = False) -> list[Path]:
    """Delete the temp folders and pointer files that killed saves left in root; returns what went.

    Only those of processes that are gone (or of this process id, reused after a kill), or every one
    with `all_pids` (rank 0 starting a resumed run: no other process may write this run's checkpoints).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for p in root.iterdir():
        m = TEMP.match(p.name)
        if not m or (not all_pids and _pid_alive(int(m.group(1)))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.info("removed %d temp file(s) of unfinished saves in %s", len(removed), root)
    return removed


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
    remove_stale_temps(root)
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
        _prune(root, step, keep_last)
    return final


def _prune(root: Path, newest: int, keep_last: int) -> None:
    """Delete complete checkpoints older than `newest` beyond the keep_last - 1 newest of them.

    Folders that are not complete checkpoints neither count nor go: garbage beside real checkpoints
    must never cost one, and `newest` (just written) is never touched.
    """
    older = [
        s
        for s in reversed(list_checkpoints(root))
        if s < newest and _is_complete(root / step_dir_name(s))
    ]
    for s in older[max(keep_last - 1, 0) :]:
        shutil.rmtree(root / step_dir_name(s), ignore_errors=True)


def _is_complete(path: Path) -> bool:
    """A cheap completeness check (manifest well-formed, files present with their sizes; no hashing)."""
    try:
        _check_files(path, _manifest(path), hashes=False)
    except (CheckpointError, OSError):
        return False
    return True


def list_checkpoints(root: str | os.PathLike) -> list[int]:
    """Steps of the step-NNNNNN folders under root, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()
    )


def _manifest(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint folder, checked for the shape save_checkpoint writes."""
    state = path / STATE_FILE
    if not state.is_file():
        raise CheckpointError(f"{path}: no {STATE_FILE}; the checkpoint was not finished")
    manifest = read_json_object(state)
    step = manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{state}: 'step' is {step!r}, expected a step number")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{state}: 'files' is {type(files).__name__}, expected an object")
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"{state} does not list {name}")
    for name, meta in files.items():
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise CheckpointError(f"{state} lists {name!r}, which is not a file name")
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("sha256"), str)
            and isinstance(meta.get("bytes"), int)
        ):
            raise CheckpointError(f"{state}: the entry of {name} needs a 'sha256' and 'bytes'")
    if not isinstance(manifest.setdefault("extra", {}), dict):
        raise CheckpointError(f"{state}: 'extra' is not an object")
    return manifest


def _check_files(path: Path, manifest: dict[str, Any], hashes: bool = True) -> None:
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{f} has {f.stat().st_size} bytes, expected {meta['bytes']} (truncated?)"
            )
        if hashes and _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f} does not match its recorded checksum (corrupt)")


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Return the manifest of a complete checkpoint folder or raise a CheckpointError saying what is wrong."""
    manifest = _manifest(path)
    _check_files(path, manifest)
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
        m = STEP_DIR.match(pointer.read_text(errors="replace").strip())
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
