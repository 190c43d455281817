"""Speed paths of DalleBart, bound to the model from outside: models/bart.py is the architecture only.

- native.py: C kernels compiled on first use (gemv.c): few-row products, single-query attention,
  a whole decoder layer of a decoding step; huge-page weight copies.
- cpu.py: CPU inference paths (oneDNN packed weights, fused projections, native kernels) that
  `accelerate` binds to a model's modules, and the native one-image decoding step.
- cuda_graph.py: the one-token step captured as a CUDA graph.

Generation calls `accelerate(model)`, makes its cache in `cache_dtype`, and runs one-token steps
through `fast_step` where one applies; each path gives the plain model's results.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..bart import DalleBart, DecoderCache
from .cpu import accelerate, cache_dtype, native_step
from .cuda_graph import graphed_step

__all__ = ["accelerate", "cache_dtype", "fast_step"]


def fast_step(
    model: DalleBart, cache: DecoderCache, rows: int, pos: int
) -> Callable[[Tensor, int], Tensor] | None:
    """The fastest one-token decoding step for this sampling run from position `pos` on: a CUDA
    graph on CUDA, the native decoder layers on CPU; None where neither applies (then
    model.decode_step). The step maps (tokens [rows, 1], position) to logits [rows, 1, V] and leaves
    cache.length to the caller."""
    return graphed_step(model, cache, rows, pos) or native_step(model, cache, pos)
