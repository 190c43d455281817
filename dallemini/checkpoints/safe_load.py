"""Read untrusted files safely: JSON objects, and .pt/.ckpt files with `torch.load(weights_only=True)`
only, stubbing foreign objects inertly.

PyTorch Lightning checkpoints carry more than tensors: callback states keyed by (or holding)
`pytorch_lightning...ModelCheckpoint`, omegaconf containers in `hyper_parameters`, numpy scalars.
`weights_only` loading refuses those globals ("Unsupported global"). Instead of ever importing or
running the foreign code, we register an inert class of ours under each refused global's exact
name and load again: the object becomes a `ForeignObject` that only records the arguments and
state it was given. Tensors are untouched; everything else is data for us to ignore.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")
_SETITEM = re.compile(
    r"Can only SETITEMS? for dict.*but got <class '[^']*ForeignObject\[([^\]']+)\]'>"
)
_MAX_ROUNDS = 64
# Plain values a PyTorch Lightning checkpoint keeps beside its tensors (taming's .ckpt files).
LIGHTNING_METADATA: dict[str, type] = {"epoch": int, "global_step": int}


class ForeignObject:
    """Inert stand-in for a global a checkpoint names: never imports or calls the real thing."""

    foreign_name: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> ForeignObject:
        obj = super().__new__(cls)
        obj.__dict__["args"] = args
        obj.__dict__["state"] = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<ForeignObject {self.foreign_name}>"


def read_json_object(path: Path, missing: str | None = None) -> dict[str, Any]:
    """The JSON object in a file; CheckpointError otherwise (`missing` explains a missing file)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if missing is None:
            raise CheckpointError(f"{path} does not exist") from None
        raise CheckpointError(f"{path} is missing ({missing})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def _stub(name: str) -> type:
    """A fresh ForeignObject subclass standing for the global `name` (distinct class per name)."""
    return type(
        f"ForeignObject[{name}]", (ForeignObject,), {"foreign_name": name, "__module__": __name__}
    )


def _refused_global(message: str) -> str | None:
    m = _UNSUPPORTED.search(message)
    if m is None:
        return None
    name = m.group(1).rstrip(".,;")
    # torch prints "builtins.x" as plain "x".
    return name if "." in name else f"builtins.{name}"


def _static_unsafe_globals(path: Path) -> list[str]:
    """Every non-allowlisted global in a zip checkpoint's pickle, found by disassembly (nothing runs)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) files, or damaged ones: fall back to one name per attempt
        return []


def load_torch_file(path: str | Path) -> dict:
    """torch.load(path, map_location="cpu", weights_only=True) into a dict; foreign globals become inert stubs."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p} does not exist or is not a file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty (an interrupted download or save?)")
    stubs: dict[str, Any] = {}
    obj: Any = None
    for _ in range(_MAX_ROUNDS):
        try:
            with torch.serialization.safe_globals([(cls, name) for name, cls in stubs.items()]):
                obj = torch.load(p, map_location="cpu", weights_only=True)
            break
        # torch raises UnpicklingError, RuntimeError, EOFError, ValueError, ... for bad files.
        except Exception as e:
            msg = str(e)
            name = _refused_global(msg)
            if name is not None and name not in stubs:
                new = [n for n in _static_unsafe_globals(p) if n not in stubs] if not stubs else []
                for n in [name, *new]:
                    stubs.setdefault(n, _stub(n))
                continue
            m = _SETITEM.search(msg)
            if m is not None and m.group(1) in stubs and stubs[m.group(1)] is not OrderedDict:
                # A dict subclass (e.g. an AttributeDict): stand in a plain OrderedDict so its items load.
                stubs[m.group(1)] = OrderedDict
                continue
            raise CheckpointError(_describe(p, e)) from e
    else:
        raise CheckpointError(
            f"{p}: gave up after stubbing {len(stubs)} foreign globals: {sorted(stubs)}"
        )
    if stubs:
        log.debug("%s: stood in inert stubs for foreign globals %s", p, sorted(stubs))
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{p} holds a {type(obj).__name__}, not a dict of tensors (state dict or checkpoint)"
        )
    return obj if isinstance(obj, dict) else dict(obj)


def require_tensors(
    state: Mapping[Any, Any], where: str, metadata: Mapping[str, type] | None = None
) -> None:
    """Refuse (CheckpointError naming the key) a state dict holding anything but tensors.

    `metadata` names the plain values the format keeps beside its tensors, with their types.
    """
    allowed = metadata or {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(
                f"{where}: key {key!r} is a {type(key).__name__}, not a tensor name; not a state dict"
            )
        if isinstance(value, torch.Tensor):
            continue
        plain = allowed.get(key)
        if plain is not None and isinstance(value, plain) and not isinstance(value, ForeignObject):
            continue
        what = (
            f"a stand-in for {value.foreign_name} (a pickled object, never run)"
            if isinstance(value, ForeignObject)
            else f"a value of type {type(value).__name__}"
        )
        raise CheckpointError(
            f"{where}: {key!r} holds {what}, not a tensor; a state dict must hold tensors only "
            "(the file was written by other code or altered): get the original checkpoint"
        )


def _describe(path: Path, e: Exception) -> str:
    """A one-line reason for a failed load, naming the file."""
    inner = e.__context__ if str(e).startswith("Weights only load failed") else None
    msg = str(inner if inner is not None else e).strip()  # torch's own reason, without its advice
    low = msg.lower()
    if (
        "central directory" in low
        or "failed reading" in low
        or "corrupt" in low
        or isinstance(e, EOFError)
        or "ran out of input" in low
    ):
        what = "is truncated or corrupt (not a complete PyTorch zip archive)"
    elif any(
        k in low for k in ("invalid load key", "unsupported operand", "could not find", "not a zip")
    ):
        what = "is not a PyTorch checkpoint (torch.save file)"
    elif "torchscript" in low:
        what = "is a TorchScript archive, not a torch.save checkpoint"
    else:
        what = "could not be read safely (weights_only=True)"
    first = next((line for line in msg.splitlines() if line.strip()), type(e).__name__)
    detail = first if len(first) <= 200 else first[:200] + "..."
    return f"{path} {what}: {type(inner or e).__name__}: {detail}"
