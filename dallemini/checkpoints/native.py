"""The native model directory: config.json + bart/vqgan/clip .safetensors + tokenizer.json (DESIGN.md §3)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import PipelineConfig
from ..errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHT_FILES = {
    "bart": "bart.safetensors",
    "vqgan": "vqgan.safetensors",
    "clip": "clip.safetensors",
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_model_dir(path: str | os.PathLike) -> bool:
    """True when path holds a dallemini config.json."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == PipelineConfig.FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_config(path: str | os.PathLike) -> PipelineConfig:
    """Parse a model directory's config.json with errors that name the file."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        raise CheckpointError(f"{p} not found: {path} is not a dallemini model directory")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from e
    try:
        return PipelineConfig.from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{p}: {e}") from e


def save_model_dir(
    path: str | os.PathLike,
    config: PipelineConfig,
    states: Mapping[str, Mapping[str, Tensor]],
    tokenizer_json: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model directory atomically (temp folder + rename), so a crash never leaves half a model."""
    dst = Path(path)
    for part in states:
        if part not in WEIGHT_FILES:
            raise ConfigError(
                f"unknown model part {part!r}; expected one of {sorted(WEIGHT_FILES)}"
            )
        if getattr(config, part) is None:
            raise ConfigError(f"weights given for {part!r} but the config has no {part} section")
    if dst.exists() and not overwrite:
        raise CheckpointError(
            f"{dst} already exists; remove it or pass overwrite=True (--overwrite)"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        for part, state in states.items():
            tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(
                tensors, str(tmp / WEIGHT_FILES[part]), metadata={"format": "pt", "part": part}
            )
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_weights(path: str | os.PathLike, part: str) -> dict[str, Tensor]:
    """Read one part's safetensors file; a truncated or foreign file becomes a CheckpointError naming it."""
    f = Path(path) / WEIGHT_FILES[part]
    if not f.is_file():
        raise CheckpointError(f"{f} not found; the model directory's config lists a {part} model")
    try:
        state = load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{f} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e
    return state


def check_state_dict(module: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    """Compare a state dict with a module's parameters and name the first missing, extra or misshapen tensor."""
    expected = module.state_dict()
    for name, ref in expected.items():
        if name not in state:
            raise CheckpointError(
                f"{where}: tensor {name!r} is missing (expected shape {tuple(ref.shape)})"
            )
        got = state[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(got.shape)} but the config implies {tuple(ref.shape)}"
            )
        if ref.is_floating_point() and got.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{where}: tensor {name!r} has dtype {got.dtype}; expected a float dtype"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(
            f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all)"
        )


def load_into(module: nn.Module, state: Mapping[str, Tensor], where: str) -> nn.Module:
    """Check, then copy a state dict into a module (dtype converted to the module's)."""
    check_state_dict(module, state, where)
    module.load_state_dict(dict(state), strict=True)
    return module


def build_from_state(
    factory: Callable[[], nn.Module], state: Mapping[str, Tensor], where: str
) -> nn.Module:
    """Like load_into(factory(), ...) without a second copy of the weights: the module is built on the meta
    device (no allocation, no random init) and adopts the state's tensors, converted to its dtypes.

    Peak memory is one copy of the weights instead of two; drop other references to `state` so that a
    later `.to(dtype)` can free each original tensor as it converts it.
    """
    with torch.device("meta"):
        module = factory()
    check_state_dict(module, state, where)
    expected = module.state_dict()
    adopted = {k: v.to(expected[k].dtype).contiguous() for k, v in state.items()}
    module.load_state_dict(adopted, strict=True, assign=True)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{where}: {leftover[0]!r} was not in the state dict")
    return module
