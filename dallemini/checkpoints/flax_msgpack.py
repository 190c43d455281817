"""Flax `flax.serialization` msgpack files (`flax_model.msgpack`), read and written without JAX.

The format (flax.serialization.msgpack_serialize / msgpack_restore): one msgpack map, nested maps
with str keys, and leaves that are msgpack natives or extension types:
  ext 1, ndarray:   payload = msgpack array [shape (array of ints), dtype name (str), raw C-order bytes]
  ext 2, complex:   payload = msgpack array [real, imag] (read only: flax itself writes Python
                    complex numbers as ext 3 complex128 scalars)
  ext 3, numpy scalar: payload as ext 1 with shape [] (restored as a numpy scalar)
Map keys are sorted (flax passes the tree through jax.tree_util first).
Arrays larger than 2**30 bytes inside a map are split into
  {"__msgpack_chunked_array__": True, "shape": {"0": d0, ...}, "chunks": {"0": flat_chunk, ...}}.
dtype "bfloat16" holds the 16-bit bfloat16 patterns; byte order is little-endian in practice.

The reader is a small streaming msgpack parser of our own: it reads each array's bytes straight
from the file into the final tensor's memory (chunked arrays into one preallocated buffer), so a
multi-GB checkpoint costs its own size in memory once, not twice. Arrays come back as torch
tensors (bfloat16 as torch.bfloat16, without ml_dtypes). The writer is used by tests and fixture
tooling and writes the same bytes flax would.
"""

from __future__ import annotations

import io
import math
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np
import torch

from ..errors import CheckpointError
from .lazy import FileTensor, LazyTensor, cat_flat

EXT_NDARRAY = 1
EXT_COMPLEX = 2
EXT_NPSCALAR = 3
CHUNKED_KEY = "__msgpack_chunked_array__"
MAX_CHUNK_SIZE = 2**30  # bytes; flax's threshold for splitting an array
_MAX_DEPTH = 64

# dtype names we read; bfloat16 is stored as its uint16 bit patterns and viewed as torch.bfloat16.
_DTYPES = {
    "bool": np.dtype("bool"),
    "int8": np.dtype("<i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("<u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "complex64": np.dtype("<c8"),
    "complex128": np.dtype("<c16"),
    "bfloat16": np.dtype("<u2"),
}
_TORCH_NAMES: dict[torch.dtype, str] = {
    torch.bool: "bool",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.uint8: "uint8",
    torch.uint16: "uint16",
    torch.uint32: "uint32",
    torch.uint64: "uint64",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.complex64: "complex64",
    torch.complex128: "complex128",
    torch.bfloat16: "bfloat16",
}


_TORCH_DTYPES = {name: dtype for dtype, name in _TORCH_NAMES.items()}


class _Fail(Exception):
    """Internal: a parse problem, turned into a CheckpointError naming the file and offset."""


class _Reader:
    """Streaming msgpack parser over a binary file, specialised to Flax's extension types."""

    def __init__(self, f: BinaryIO, size: int | None, lazy_path: Path | None = None) -> None:
        self.f = f
        self.size = size
        self.pos = 0
        # With a path, arrays are not read: they become FileTensors pointing into that file.
        self.lazy_path = lazy_path

    def skip(self, n: int) -> None:
        self.need(n)
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    # --- raw input ---------------------------------------------------------------------------
    def need(self, n: int) -> None:
        """Fail before allocating n bytes that the file cannot hold (corrupt lengths, truncation)."""
        if self.size is not None and self.pos + n > self.size:
            raise _Fail(
                f"truncated: {n} bytes needed at offset {self.pos}, the file has {self.size}"
            )

    def read(self, n: int) -> bytes:
        self.need(n)
        data = self.f.read(n)
        if len(data) != n:
            raise _Fail(f"truncated: {n} bytes needed at offset {self.pos}, got {len(data)}")
        self.pos += n
        return data

    def readinto(self, buf: memoryview) -> None:
        n = buf.nbytes
        self.need(n)
        done = 0
        while done < n:
            got = self.f.readinto(buf[done:])
            if not got:
                raise _Fail(f"truncated: {n} bytes needed at offset {self.pos}, got {done}")
            done += got
        self.pos += n

    def uint(self, n: int) -> int:
        return int.from_bytes(self.read(n), "big")

    # --- values ------------------------------------------------------------------------------
    def value(self, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise _Fail(f"nesting deeper than {_MAX_DEPTH} levels at offset {self.pos}")
        at = self.pos
        b = self.read(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F, depth)
        if 0xA0 <= b <= 0xBF:
            return self.str(b & 0x1F)
        if b == 0xC0:
            return None
        if b == 0xC2:
            return False
        if b == 0xC3:
            return True
        if b in (0xC4, 0xC5, 0xC6):
            return self.read(self.uint(1 << (b - 0xC4)))
        if b in (0xC7, 0xC8, 0xC9):
            n = self.uint(1 << (b - 0xC7))
            return self.ext(self.read(1)[0], n, depth)
        if b == 0xCA:
            return struct.unpack(">f", self.read(4))[0]
        if b == 0xCB:
            return struct.unpack(">d", self.read(8))[0]
        if 0xCC <= b <= 0xCF:
            return self.uint(1 << (b - 0xCC))
        if 0xD0 <= b <= 0xD3:
            n = 1 << (b - 0xD0)
            return int.from_bytes(self.read(n), "big", signed=True)
        if 0xD4 <= b <= 0xD8:
            n = 1 << (b - 0xD4)
            return self.ext(self.read(1)[0], n, depth)
        if 0xD9 <= b <= 0xDB:
            return self.str(self.uint(1 << (b - 0xD9)))
        if b in (0xDC, 0xDD):
            return self.array(self.uint(2 if b == 0xDC else 4), depth)
        if b in (0xDE, 0xDF):
            return self.map(self.uint(2 if b == 0xDE else 4), depth)
        raise _Fail(f"invalid msgpack byte 0x{b:02x} at offset {at}")

    def str(self, n: int) -> str:
        raw = self.read(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Fail(f"invalid UTF-8 string at offset {self.pos - n}") from e

    def array(self, n: int, depth: int) -> list[Any]:
        self.need(n)  # every element takes at least one byte
        return [self.value(depth + 1) for _ in range(n)]

    def map(self, n: int, depth: int) -> dict[Any, Any]:
        self.need(2 * n)
        out: dict[Any, Any] = {}
        for _ in range(n):
            at = self.pos
            key = self.value(depth + 1)
            if isinstance(key, (dict, list, torch.Tensor)):
                raise _Fail(f"map key of type {type(key).__name__} at offset {at}")
            if key in out:
                raise _Fail(f"duplicate map key {key!r} at offset {at}")
            if key == "chunks" and out.get(CHUNKED_KEY) is True and "shape" in out:
                out[key] = self.chunks(out["shape"], depth + 1)
            else:
                out[key] = self.value(depth + 1)
        if out.get(CHUNKED_KEY) is True:
            return _unchunk(out)
        return out

    # --- extension types -----------------------------------------------------------------------
    def ext(self, code: int, n: int, depth: int) -> Any:
        end = self.pos + n
        self.need(n)
        if code in (EXT_NDARRAY, EXT_NPSCALAR):
            shape, dtype_name, nbytes = self.ndarray_header(end, depth)
            if code == EXT_NDARRAY and self.lazy_path is not None:
                return self.file_tensor(shape, dtype_name, nbytes)
            arr = self.ndarray_data(shape, dtype_name, nbytes)
            if code == EXT_NDARRAY:
                return _to_tensor(arr, dtype_name)
            if dtype_name == "bfloat16":  # no numpy bfloat16 scalar without ml_dtypes
                return float(_to_tensor(arr, dtype_name).float().item())
            return arr[()]
        if code == EXT_COMPLEX:
            parts = self.value(depth + 1)
            if self.pos != end or not isinstance(parts, list) or len(parts) != 2:
                raise _Fail(f"malformed complex number ending at offset {end}")
            return complex(parts[0], parts[1])
        raise _Fail(
            f"unknown msgpack extension type {code} at offset {self.pos} (Flax writes only 1, 2, 3)"
        )

    def ndarray_header(self, end: int, depth: int) -> tuple[tuple[int, ...], str, int]:
        """Parse [shape, dtype, <bin header>] of an ndarray payload ending at `end`; stops at the data."""
        at = self.pos
        b = self.read(1)[0]
        if b != 0x93:
            raise _Fail(f"ndarray payload at offset {at} is not a 3-element array")
        shape = self.value(depth + 1)
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise _Fail(f"ndarray at offset {at} has an invalid shape {shape!r}")
        name = self.value(depth + 1)
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        if not isinstance(name, str):
            raise _Fail(f"ndarray at offset {at} has an invalid dtype name {name!r}")
        if name not in _DTYPES:
            raise _Fail(f"ndarray at offset {at} has dtype {name!r}, which is not supported")
        b = self.read(1)[0]
        if b not in (0xC4, 0xC5, 0xC6):
            raise _Fail(f"ndarray at offset {at} has no raw data block")
        nbytes = self.uint(1 << (b - 0xC4))
        if self.pos + nbytes != end:
            raise _Fail(f"ndarray at offset {at}: its data does not fill its extension payload")
        want = math.prod(shape) * _DTYPES[name].itemsize
        if nbytes != want:
            raise _Fail(
                f"ndarray at offset {at}: shape {tuple(shape)} of {name} needs {want} bytes, "
                f"the file has {nbytes}"
            )
        return tuple(shape), name, nbytes

    def ndarray_data(
        self, shape: tuple[int, ...], name: str, nbytes: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Read the raw bytes into a fresh array (or into `out`, a flat slice of the right dtype)."""
        dtype = _DTYPES[name]
        arr = np.empty(shape, dtype=dtype) if out is None else out
        if nbytes:
            self.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
        return arr

    def file_tensor(self, shape: tuple[int, ...], name: str, nbytes: int) -> FileTensor:
        """The array's place in the file (its bytes skipped, not read)."""
        if name not in _TORCH_DTYPES:
            raise _Fail(f"ndarray at offset {self.pos} has dtype {name!r}, not a torch dtype")
        start = self.pos
        self.skip(nbytes)
        return FileTensor(self.lazy_path, [(start, nbytes)], shape, _TORCH_DTYPES[name])

    def chunks(self, shape_value: Any, depth: int) -> Any:
        """The 'chunks' map of a chunked array, read straight into one preallocated flat buffer."""
        at = self.pos
        shape = _dict_to_tuple(shape_value)
        if shape is None or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise _Fail(f"chunked array before offset {at} has an invalid shape {shape_value!r}")
        total = math.prod(shape)
        b = self.read(1)[0]
        if 0x80 <= b <= 0x8F:
            n = b & 0x0F
        elif b in (0xDE, 0xDF):
            n = self.uint(2 if b == 0xDE else 4)
        else:
            raise _Fail(f"chunked array at offset {at}: 'chunks' is not a map")
        flat: np.ndarray | None = None
        lazy_parts: list[FileTensor] = []
        name = ""
        filled = 0
        for i in range(n):
            key = self.value(depth + 1)
            if key != str(i):
                raise _Fail(f"chunked array at offset {at}: chunk key {key!r}, expected '{i}'")
            b = self.read(1)[0]
            if 0xD4 <= b <= 0xD8:
                length = 1 << (b - 0xD4)
            elif b in (0xC7, 0xC8, 0xC9):
                length = self.uint(1 << (b - 0xC7))
            else:
                raise _Fail(f"chunked array at offset {at}: chunk {i} is not an ndarray")
            code = self.read(1)[0]
            if code != EXT_NDARRAY:
                raise _Fail(f"chunked array at offset {at}: chunk {i} is not an ndarray")
            self.need(length)
            cshape, cname, nbytes = self.ndarray_header(self.pos + length, depth + 1)
            if i == 0:
                name = cname
                self.need(total * _DTYPES[name].itemsize - nbytes)
                if self.lazy_path is None:
                    flat = np.empty(total, dtype=_DTYPES[name])
            if cname != name or len(cshape) != 1 or filled + cshape[0] > total:
                raise _Fail(f"chunked array at offset {at}: chunk {i} does not fit the array")
            if flat is None:
                lazy_parts.append(self.file_tensor(cshape, name, nbytes))
            else:
                self.ndarray_data(cshape, name, nbytes, out=flat[filled : filled + cshape[0]])
            filled += cshape[0]
        if filled != total:
            raise _Fail(
                f"chunked array at offset {at}: chunks hold {filled} elements, shape needs {total}"
            )
        if lazy_parts:
            return cat_flat(lazy_parts, (total,))
        if flat is None:
            flat, name = np.empty(0, dtype=np.float32), "float32"
        return _to_tensor(flat, name)


def _to_tensor(arr: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A tensor sharing arr's memory; bfloat16 bit patterns become torch.bfloat16."""
    if not arr.dtype.isnative:  # the file is little-endian; only big-endian hosts convert
        arr = arr.astype(arr.dtype.newbyteorder("="))
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype_name == "bfloat16" else t


def _dict_to_tuple(d: Any) -> tuple[Any, ...] | None:
    """Flax's {"0": a, "1": b} -> (a, b); None when the keys are not exactly "0".."n-1"."""
    if not isinstance(d, dict) or set(d) != {str(i) for i in range(len(d))}:
        return None
    return tuple(d[str(i)] for i in range(len(d)))


def _unchunk(d: dict[Any, Any]) -> torch.Tensor:
    shape = _dict_to_tuple(d.get("shape"))
    chunks = d.get("chunks")
    if shape is None or chunks is None:
        raise _Fail("malformed chunked array (needs 'shape' and 'chunks')")
    if isinstance(chunks, dict):  # keys came in an unusual order: join the separately read chunks
        parts = _dict_to_tuple(chunks)
        if parts and all(isinstance(p, FileTensor) for p in parts):
            if len({p.dtype for p in parts}) != 1:
                raise _Fail("malformed chunked array: chunks of different dtypes")
            chunks = cat_flat(list(parts), (sum(math.prod(p.shape) for p in parts),))
        elif parts is None or not parts or not all(isinstance(p, torch.Tensor) for p in parts):
            raise _Fail("malformed chunked array: 'chunks' is not a map of arrays")
        else:
            chunks = torch.cat([p.reshape(-1) for p in parts])
    if isinstance(chunks, FileTensor) and math.prod(chunks.shape) == math.prod(shape):
        return chunks.reshape(shape)
    if not isinstance(chunks, torch.Tensor) or chunks.numel() != math.prod(shape):
        raise _Fail(f"malformed chunked array: chunks do not make shape {shape}")
    return chunks.reshape(shape)


def read_msgpack(path: str | Path, lazy: bool = False) -> dict[str, Any]:
    """Read a Flax msgpack file into nested dicts whose array leaves are CPU torch tensors
    (lazy: FileTensors, read one at a time later; only the structure is parsed now)."""
    p = Path(path)
    try:
        f = open(p, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise CheckpointError(f"{p} cannot be opened: {e}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        reader = _Reader(f, size, p if lazy else None)
        try:
            if size == 0:
                raise _Fail("the file is empty")
            first = f.peek(1)[:1] if hasattr(f, "peek") else b""
            if first and not (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF)):
                raise _Fail(
                    f"it does not start with a msgpack map (first byte 0x{first[0]:02x}); "
                    "not a Flax msgpack file"
                )
            tree = reader.value()
            if not isinstance(tree, dict):
                raise _Fail(f"top level is a {type(tree).__name__}, not a map")
            if reader.pos != size:
                raise _Fail(f"{size - reader.pos} unexpected trailing bytes at offset {reader.pos}")
        except _Fail as e:
            raise CheckpointError(f"{p} is not a valid Flax msgpack checkpoint: {e}") from None
        except MemoryError as e:
            raise CheckpointError(
                f"{p}: out of memory at offset {reader.pos} while reading the checkpoint"
            ) from e
    return tree


def flatten_tree(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Nested dicts -> {"a/b/c": leaf}, in file order."""
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            name = f"{prefix}{k}"
            if isinstance(v, Mapping):
                walk(v, name + sep)
            else:
                out[name] = v

    walk(tree, "")
    return out


def unflatten_tree(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dicts (the inverse of flatten_tree)."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, last = key.split(sep)
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key!r}: {part!r} is both a leaf and a subtree")
        node[last] = v
    return out


# ------------------------------------------------------------------------------------------------
# Writer


def _array_parts(x: Any) -> tuple[tuple[int, ...], str, memoryview]:
    """(shape, flax dtype name, C-order bytes) of a torch tensor or numpy array, without copying if possible."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        if t.dtype not in _TORCH_NAMES:
            raise ValueError(f"cannot write a tensor of dtype {t.dtype}")
        name = _TORCH_NAMES[t.dtype]
        bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        arr = bits.reshape(-1).numpy()
        shape = tuple(t.shape)
    else:
        arr = np.asarray(x)
        if arr.dtype.hasobject or arr.dtype.names is not None:
            raise ValueError(f"cannot write an array of dtype {arr.dtype}")
        name, shape = arr.dtype.name, arr.shape
        arr = np.ascontiguousarray(arr)  # (makes 0-d arrays 1-d; shape is kept above)
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        arr = arr.reshape(-1)
    if sys.byteorder == "big" and arr.dtype.itemsize > 1:
        arr = arr.byteswap()
    return shape, name, memoryview(arr.view(np.uint8))


def _ext_header(code: int, n: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        return bytes([fixed[n], code])
    if n <= 0xFF:
        return bytes([0xC7, n, code])
    if n <= 0xFFFF:
        return b"\xc8" + n.to_bytes(2, "big") + bytes([code])
    if n <= 0xFFFFFFFF:
        return b"\xc9" + n.to_bytes(4, "big") + bytes([code])
    raise ValueError(f"array of {n} bytes is too large for one msgpack extension (max 4 GiB)")


def _bin_header(n: int) -> bytes:
    if n <= 0xFF:
        return bytes([0xC4, n])
    if n <= 0xFFFF:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _is_array(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray, LazyTensor))


def _nbytes(x: Any) -> int:
    if isinstance(x, LazyTensor):
        return x.nbytes
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return int(x.size) * x.dtype.itemsize


def _chunked(x: Any, chunk_size: int) -> dict[str, Any]:
    """Flax's chunked form of an array: flat pieces of chunk_size // itemsize elements."""
    if isinstance(x, LazyTensor):  # read now; the pieces hold it until they are written
        x = x.load()
    flat = x.reshape(-1)
    itemsize = x.element_size() if isinstance(x, torch.Tensor) else x.dtype.itemsize
    step = max(1, int(chunk_size / itemsize))
    pieces = [flat[i : i + step] for i in range(0, flat.shape[0], step)]
    return {
        CHUNKED_KEY: True,
        "shape": {str(i): int(s) for i, s in enumerate(x.shape)},
        "chunks": {str(i): c for i, c in enumerate(pieces)},
    }


def _write(f: BinaryIO, x: Any, chunk_size: int, depth: int = 0, sort: bool = True) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError(f"tree nested deeper than {_MAX_DEPTH} levels")
    if isinstance(x, Mapping):
        f.write(_map_header(len(x)))
        # flax's msgpack_serialize passes the tree through jax.tree_util, which sorts dict keys;
        # the chunked-array dicts it adds afterwards keep their insertion order.
        inner = sort and CHUNKED_KEY not in x
        for k in sorted(x) if inner else list(x):
            v = x[k]
            f.write(msgpack.packb(k, use_bin_type=True))
            if _is_array(v) and _nbytes(v) > chunk_size:
                _write(f, _chunked(v, chunk_size), chunk_size, depth + 1, sort=False)
            else:
                _write(f, v, chunk_size, depth + 1, sort=inner)
    elif isinstance(x, (list, tuple)):
        f.write(_array_header(len(x)))
        for v in x:
            _write(f, v, chunk_size, depth + 1)
    elif _is_array(x):
        _write_ndarray(f, x, EXT_NDARRAY)
    elif isinstance(x, (np.generic, complex)):
        # flax writes Python complex numbers as complex128 numpy scalars too (np.issctype(complex))
        _write_ndarray(f, np.asarray(x), EXT_NPSCALAR)
    elif x is None or isinstance(x, (bool, int, float, str, bytes)):
        f.write(msgpack.packb(x, use_bin_type=True))
    else:
        raise ValueError(f"cannot write a {type(x).__name__} to a Flax msgpack file")


def _map_header(n: int) -> bytes:
    if n <= 0x0F:
        return bytes([0x80 | n])
    if n <= 0xFFFF:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def _array_header(n: int) -> bytes:
    if n <= 0x0F:
        return bytes([0x90 | n])
    if n <= 0xFFFF:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _write_ndarray(f: BinaryIO, x: Any, code: int) -> None:
    if isinstance(x, LazyTensor):  # read right before writing, dropped when this returns
        x = x.load()
    shape, name, data = _array_parts(x)
    head = (
        _array_header(3)
        + msgpack.packb(list(shape))
        + msgpack.packb(name, use_bin_type=True)
        + _bin_header(data.nbytes)
    )
    f.write(_ext_header(code, len(head) + data.nbytes))
    f.write(head)
    f.write(data)


def write_msgpack(
    path: str | Path,
    tree: Mapping[str, Any],
    chunk_size: int = MAX_CHUNK_SIZE,
    sort_keys: bool = True,
) -> None:
    """Write nested dicts of tensors/arrays/scalars as flax does (atomically: temp file + rename).

    With sort_keys (flax's behaviour) map keys are written sorted; arrays over chunk_size bytes are
    chunked. LazyTensor leaves are read one at a time, each right before it is written.
    """
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            _write(f, tree, chunk_size, sort=sort_keys)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def msgpack_bytes(
    tree: Mapping[str, Any], chunk_size: int = MAX_CHUNK_SIZE, sort_keys: bool = True
) -> bytes:
    """The bytes write_msgpack would write (for small trees: tests, comparisons with flax)."""
    buf = io.BytesIO()
    _write(buf, tree, chunk_size, sort=sort_keys)
    return buf.getvalue()
