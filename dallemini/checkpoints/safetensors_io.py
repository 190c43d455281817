"""safetensors files written and read one tensor at a time.

The format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, padded with
spaces to a multiple of 8), then the tensors' little-endian bytes, back to back.
Written by hand because safetensors' save_file needs every tensor in memory at once and its
loaders map the whole file, which counts the file in RSS beside the tensors read out of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError
from .lazy import FileTensor, TensorLike, load

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on the header's size


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, TensorLike],
    metadata: Mapping[str, str] | None = None,
    cast: Callable[[torch.dtype], torch.dtype] | None = None,
    progress: Callable[[int], None] | None = None,
) -> str:
    """Write tensors (lazy ones read one at a time, cast to `cast(dtype)`) and return the file's
    sha256; `progress` gets the bytes of each tensor written."""
    if sys.byteorder == "big":
        raise CheckpointError("writing safetensors on a big-endian machine is not supported")
    entries: dict[str, dict] = {}
    dtypes: dict[str, torch.dtype] = {}
    offset = 0
    for name, t in tensors.items():
        dtype = cast(t.dtype) if cast is not None else t.dtype
        if dtype not in NAMES:
            raise CheckpointError(
                f"tensor {name!r} has dtype {dtype}, which safetensors cannot hold"
            )
        n = math.prod(t.shape) * dtype.itemsize
        entries[name] = {
            "dtype": NAMES[dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        dtypes[name] = dtype
        offset += n
    if metadata:
        entries = {"__metadata__": dict(metadata), **entries}
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    digest = hashlib.sha256()

    def put(f, data: bytes | memoryview) -> None:
        f.write(data)
        digest.update(data)

    with open(path, "wb") as f:
        put(f, struct.pack("<Q", len(header)) + header)
        for name, t in tensors.items():
            value = load(t).detach().to("cpu", dtypes[name]).contiguous()
            if tuple(value.shape) != tuple(t.shape):
                raise CheckpointError(f"tensor {name!r} changed shape while being written")
            if value.numel():
                put(f, memoryview(value.reshape(-1).view(torch.uint8).numpy()))
            if progress is not None:
                progress(value.numel() * value.element_size())
            del value
    return digest.hexdigest()


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header JSON, offset of the data) of a safetensors file, checked against the file's size."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"only {size} bytes long")
            n = struct.unpack("<Q", head)[0]
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{p} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{p} is not a safetensors file: its header is not a JSON object")
    return header, 8 + n


def lazy_safetensors(path: str | os.PathLike) -> dict[str, FileTensor]:
    """Every tensor of a safetensors file as a FileTensor (nothing read yet), in file order."""
    p = Path(path)
    header, start = read_header(p)
    size = p.stat().st_size
    out: list[tuple[int, str, FileTensor]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{p}: header entry {name!r} is malformed ({e})") from e
        if (
            not 0 <= begin <= end <= size - start
            or end - begin != math.prod(shape) * dtype.itemsize
        ):
            raise CheckpointError(
                f"{p}: tensor {name!r} does not fit the file (truncated or corrupt?): bytes "
                f"{begin}..{end} of {size - start}, shape {shape} of {dtype}"
            )
        out.append((begin, name, FileTensor(p, [(start + begin, end - begin)], shape, dtype)))
    out.sort(key=lambda x: x[0])
    return {name: t for _, name, t in out}


def file_sha256(path: str | os.PathLike, block: int = 16 * 2**20) -> str:
    """The sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, read into memory."""
    return {k: v.load() for k, v in lazy_safetensors(path).items()}
