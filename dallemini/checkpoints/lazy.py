"""Tensors known by shape and dtype and read only when needed, so checkpoints convert and load one
tensor at a time instead of holding a whole file (and its converted copy) in memory."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError


class LazyTensor:
    """A tensor of a given shape and dtype whose values come from `read()` when `load()` is called."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, read: Callable[[], Tensor]):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._read = read

    def load(self) -> Tensor:
        """Read the values (a fresh tensor each call)."""
        t = self._read()
        if tuple(t.shape) != tuple(self.shape) or t.dtype != self.dtype:
            raise CheckpointError(
                f"read a {t.dtype} tensor of shape {tuple(t.shape)}, expected {self.dtype} "
                f"{tuple(self.shape)}"
            )
        return t

    def map(self, fn: Callable[[Tensor], Tensor], shape: tuple[int, ...]) -> LazyTensor:
        """A lazy `fn(self.load())` of the given shape (same dtype)."""
        return LazyTensor(shape, self.dtype, lambda: fn(self.load()))

    def transposed(self) -> LazyTensor:
        """The 2-d transpose, made contiguous when loaded."""
        return self.map(lambda t: t.t().contiguous(), tuple(self.shape)[::-1])

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"LazyTensor({tuple(self.shape)}, {self.dtype})"


TensorLike = Tensor | LazyTensor


def load(t: TensorLike) -> Tensor:
    """The tensor itself, or a lazy tensor's values."""
    return t.load() if isinstance(t, LazyTensor) else t


def materialize(state: Mapping[str, TensorLike]) -> dict[str, Tensor]:
    """Every tensor of a state dict read into memory."""
    return {k: load(v) for k, v in state.items()}


def transposed(t: TensorLike) -> TensorLike:
    """A 2-d tensor's contiguous transpose, lazily for lazy tensors."""
    return t.transposed() if isinstance(t, LazyTensor) else t.t().contiguous()


class FileTensor(LazyTensor):
    """A C-order little-endian array stored in a file as byte segments (offset, length)."""

    def __init__(
        self,
        path: str | os.PathLike,
        segments: list[tuple[int, int]],
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        super().__init__(shape, dtype, self._read_file)
        self.path = Path(path)
        self.segments = segments
        if sum(n for _, n in segments) != self.nbytes:
            raise CheckpointError(
                f"{self.path}: an array of shape {tuple(shape)} ({dtype}) needs {self.nbytes} bytes, "
                f"the file has {sum(n for _, n in segments)}"
            )

    def _read_file(self) -> Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        try:
            with open(self.path, "rb", buffering=0) as f:
                for offset, n in self.segments:
                    f.seek(offset)
                    end = done + n
                    while done < end:
                        got = f.readinto(buf[done:end])
                        if not got:
                            raise CheckpointError(
                                f"{self.path} is truncated: {n} bytes needed at offset {offset}"
                            )
                        done += got
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e}") from e
        if sys.byteorder == "big" and self.dtype.itemsize > 1:  # files are little-endian
            out = _byteswapped(out)
        return out

    def reshape(self, shape: tuple[int, ...]) -> FileTensor:
        """The same bytes under another shape of as many elements."""
        return FileTensor(self.path, self.segments, shape, self.dtype)

    def __getitem__(self, i: int) -> FileTensor:
        """Row i along the first axis (its bytes only)."""
        if not self.shape or not 0 <= i < self.shape[0]:
            raise IndexError(f"index {i} out of range for shape {tuple(self.shape)}")
        row = self.nbytes // self.shape[0]
        return FileTensor(
            self.path, _byte_range(self.segments, i * row, row), self.shape[1:], self.dtype
        )


def _byte_range(segments: list[tuple[int, int]], start: int, length: int) -> list[tuple[int, int]]:
    """The file segments holding bytes [start, start + length) of the concatenated segments."""
    out: list[tuple[int, int]] = []
    pos = 0
    for offset, n in segments:
        lo, hi = max(start, pos), min(start + length, pos + n)
        if lo < hi:
            out.append((offset + lo - pos, hi - lo))
        pos += n
    return out


def cat_flat(parts: list[FileTensor], shape: tuple[int, ...]) -> FileTensor:
    """Flat file arrays of one dtype joined into one array of `shape` (no bytes read)."""
    segments = [s for p in parts for s in p.segments]
    return FileTensor(parts[0].path, segments, shape, parts[0].dtype)


def _byteswapped(t: Tensor) -> Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize]
    arr = t.view(ints).numpy().byteswap()
    return torch.from_numpy(arr).view(t.dtype)
