"""8-bit weights for DalleBart: weight-only, per-output-channel symmetric int8.

Each dense layer's weight row r becomes int8 values q[r] = round(w[r] / s[r]) with one float32 scale
s[r] = max|w[r]| / 127, so w ≈ q * s. The encoder's text embedding (Mega's largest tensor, read
once per prompt) is quantized the same way, one scale per token. Activations, layer norms, the
decoder's image-token embedding and the K/V cache stay in the model's float dtype.
`Int8Linear` multiplies with the native CPU kernel (kernels/native.gemv_int8: up to 32 rows), else
PyTorch's `torch._weight_int8pack_mm` where it applies, else on a dequantized weight; `quantize_`
swaps a model's layers in place.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import native

# The output head is quantized with the layers: it is a dense layer read at every decoding step.
QUANTIZE_LM_HEAD = True
# Embeddings stored in 8 bits: the text embedding (50264 x 2048 for Mega: 0.41 GB in float32, 0.10 in
# int8; without it Mega's int8 generation peaked at 0.64x bfloat16's, benchmarks/bench_load.py
# --int8). The image-token embedding stays float: decoding reads its dtype as the model's.
QUANTIZED_EMBEDDINGS = ("encoder.embed_tokens",)
_PACKED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# On CPU, torch._weight_int8pack_mm computes one output at a time (float32: a plain loop, its sums
# bit-identical to sequential ones), made for decoding's few rows; past this many rows the BLAS
# matmul on a dequantized weight does the work. A first guess, not timed yet.
_PACKED_MAX_ROWS_CPU = 4
# (device type, dtype) pairs whose torch._weight_int8pack_mm raised: they dequantize instead.
_REFUSED: set[tuple[str, torch.dtype]] = set()


# Rows quantized at a time: the float temporaries stay ~16 MB whatever the weight's size (Mega's
# 0.41 GB text embedding quantized whole needed ~1.2 GB more).
_QUANTIZE_BLOCK = 1 << 22


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A float [out, in] weight -> (int8 [out, in], float32 scale [out]): w ≈ q * scale[:, None]."""
    out, inp = weight.shape
    q = torch.empty(out, inp, dtype=torch.int8, device=weight.device)
    scale = torch.empty(out, dtype=torch.float32, device=weight.device)
    rows = max(1, _QUANTIZE_BLOCK // max(inp, 1))
    for r in range(0, out, rows):
        w = weight[r : r + rows].detach().float()
        amax = w.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero row: any scale
        q[r : r + rows] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scale[r : r + rows] = s
    return q, scale


def dequantize_weight(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """int8 [out, in] and scale [out] -> the float weight q * scale in `dtype` (computed in float32)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def _packed_mm_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether torch._weight_int8pack_mm may take x [rows, in] (contiguous) and this int8 weight.

    On CPU, few rows only (_PACKED_MAX_ROWS_CPU). Its CPU bfloat16 kernel reads 16 columns at a time
    with aligned vector loads and no tail: other widths give wrong sums or crash, and each row must
    start 64-byte aligned. The float32 and float16 CPU kernels and the CUDA one take any width. It
    has no backward.
    """
    if (
        x.dtype not in _PACKED_DTYPES
        or x.device != weight.device
        or x.shape[0] == 0
        or (x.requires_grad and torch.is_grad_enabled())
        or (x.device.type, x.dtype) in _REFUSED
    ):
        return False
    if x.device.type == "cpu":
        if x.shape[0] > _PACKED_MAX_ROWS_CPU:
            return False
        if x.dtype != torch.bfloat16:
            return True
        k = weight.shape[1]
        return k % 16 == 0 and x.data_ptr() % 64 == 0 and weight.data_ptr() % 64 == 0
    return x.device.type in ("cuda", "mps")


class _Int8Rows(nn.Module):
    """int8 rows [rows, cols] with a float32 scale per row, as the buffers `weight` and
    `weight_scale`: inference only (no gradient), and the state-dict names an int8 model directory
    stores."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(rows, cols, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(rows, dtype=torch.float32))

    def _quantized_from(self: _Rows, weight: Tensor) -> _Rows:
        """These buffers on `weight`'s device, holding it quantized (on the meta device the shapes
        are all there is)."""
        self.to(weight.device)
        if not weight.is_meta:
            self.weight, self.weight_scale = quantize_weight(weight)
        return self

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight these int8 values and scales stand for."""
        return dequantize_weight(self.weight, self.weight_scale, dtype)


_Rows = TypeVar("_Rows", bound=_Int8Rows)


class Int8Linear(_Int8Rows):
    """A bias-free dense layer with int8 weights [out, in] and a float32 scale per output channel."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(out_features, in_features)
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """The int8 copy of a bias-free nn.Linear, on its device."""
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; quantize bias-free layers only")
        return cls(linear.in_features, linear.out_features)._quantized_from(linear.weight)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()
        if x2.device.type == "cpu" and not (x2.requires_grad and torch.is_grad_enabled()):
            # the native kernel widens each int8 weight in registers: one byte per weight read
            y = native.gemv_int8(x2.float(), self.weight, self.weight_scale)
            if y is not None:
                return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        scale = self.weight_scale.to(x.dtype)
        y = None
        if _packed_mm_applies(x2, self.weight):
            try:
                y = torch._weight_int8pack_mm(x2, self.weight, scale)
            except (RuntimeError, NotImplementedError):  # a build or device without it
                _REFUSED.add((x2.device.type, x2.dtype))
        if y is None:
            # Dequantize-and-matmul, the scale applied to the product: int8 values are exact in every
            # float dtype, so only the product rounds.
            y = F.linear(x2, self.weight.to(x.dtype)) * scale
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(_Int8Rows):
    """An embedding table with int8 rows [num, dim] and a float32 scale per row (per token). A
    lookup returns the rows times their scales, in the scale's dtype (the model's float dtype)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        """The int8 copy of an nn.Embedding, on its device."""
        return cls(embedding.num_embeddings, embedding.embedding_dim)._quantized_from(
            embedding.weight
        )

    def forward(self, ids: Tensor) -> Tensor:
        scale = self.weight_scale
        return self.weight[ids].to(scale.dtype) * scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def is_quantizable(name: str, lm_head: bool = QUANTIZE_LM_HEAD) -> bool:
    """Whether the DalleBart layer `name` is one `quantize_` converts: every encoder and decoder
    layer's dense layers (attention projections, GLU), the decoder's output head with `lm_head`, and
    the embeddings of QUANTIZED_EMBEDDINGS."""
    return (
        name.startswith(("encoder.layers.", "decoder.layers."))
        or (lm_head and name == "decoder.lm_head")
        or name in QUANTIZED_EMBEDDINGS
    )


def quantizable_layers(model: nn.Module, lm_head: bool = QUANTIZE_LM_HEAD) -> list[str]:
    """Names of the model's layers that `quantize_` converts (see is_quantizable)."""
    kinds = (nn.Linear, nn.Embedding, _Int8Rows)
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, kinds) and is_quantizable(name, lm_head)
    ]


def quantize_(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Replace the named nn.Linear (nn.Embedding) layers, default `quantizable_layers(model)`, by
    Int8Linear (Int8Embedding) copies, in place, one at a time (each float weight can be freed once
    its int8 copy exists); returns model.

    Works on a model on the meta device too (int8 buffers of the right shapes, for loading into).
    """
    for name in quantizable_layers(model) if names is None else names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, attr)
        if isinstance(layer, _Int8Rows):
            continue
        if isinstance(layer, nn.Linear):
            setattr(parent, attr, Int8Linear.from_linear(layer))
        elif isinstance(layer, nn.Embedding):
            setattr(parent, attr, Int8Embedding.from_embedding(layer))
        else:
            raise ValueError(f"{name} is a {type(layer).__name__}, not a dense layer or embedding")
    return model


def int8_layers(model: nn.Module) -> list[str]:
    """Names of the model's int8 layers (Int8Linear, Int8Embedding)."""
    return [name for name, m in model.named_modules() if isinstance(m, _Int8Rows)]


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of the model holds int8 weights."""
    return any(isinstance(m, _Int8Rows) for m in model.modules())
