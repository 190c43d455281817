"""CPU inference paths of DalleBart, bound to a model from outside (`accelerate`).

Decoding multiplies a few rows by every weight matrix, so it is bound by how fast weights stream from
memory (one image) or by matmul speed (several). Without autograd on CPU: one or two float32 rows go
through the native kernel (native.gemv, ~1.4x oneDNN's streaming) where it builds; other float32
products through oneDNN, which streams weights ~2x faster than MKL's small-batch sgemm. The decoder's
layers (used at every step) keep a second copy of their weight in oneDNN's blocked layout, 20-50%
faster again: always in bfloat16, in float32 once a step has _PACK_MIN_ROWS_F32 rows or more; in
bfloat16 one image's steps use the native kernel's copy instead (one copy at a time; none where it
reads the plain weight, on CPUs without AVX512-BF16). Layers
that read the same input (q/k/v, GLU fc0/fc1) run as one matmul on one packed copy. Single-query
attention runs in C (native.attend1), and a decoding step runs each decoder layer as one native
call (NativeStep): one image in bfloat16, any number of images in float32, int8 and plain bfloat16
where that beats the layers op by op (choice.step_path).

`accelerate` swaps the modules' classes for the subclasses here, which add no parameters (the same
parameters and state-dict names; torch.nn.utils.parametrize swaps classes the same way). With
autograd on, or off CPU, every path falls back to the plain model's ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...memory import release_freed_memory
from ..bart import GLU, Attention, DalleBart, DecoderCache
from . import choice, native


def _has_onednn_linear() -> bool:
    """Whether this build has oneDNN's linear ops (CPU builds with MKL-DNN)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(
            torch.ops.mkldnn, "_linear_pointwise"
        )
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR = _has_onednn_linear()
# bf16 packing pays only where the CPU has native bf16 dot products (avx512_bf16 / AMX).
_ONEDNN_BF16 = _ONEDNN_LINEAR and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
# oneDNN picks the blocked weight layout for this many rows; decoding uses 2-64 (one or two per image).
_PACK_ROWS = 64
# float32 packing pays from three rows on (one or two rows take the native kernel), so a float32 model
# only makes its packed copy once it decodes a batch this large (rows: see _batch_rows). It was 8,
# which left two images (4 rows) on the slower unpacked matmul.
_PACK_MIN_ROWS_F32 = 3


def _batch_rows(x: Tensor) -> int:
    """Rows that decode in parallel: the batch of a [B, T, d] input (a prefill's T tokens run once)."""
    return x.shape[0] if x.dim() == 3 else x.numel() // max(1, x.shape[-1])


def _weight_key(w: Tensor) -> tuple:
    """What identifies a weight's values: a packed copy is re-made when it changes."""
    try:
        return (w.data_ptr(), w.dtype, w._version)
    except RuntimeError:  # inference tensors have no version counter (and cannot change outside it)
        return (w.data_ptr(), w.dtype)


def _onednn_applies(x: Tensor, w: Tensor) -> bool:
    """CPU inference with oneDNN's linear ops, input and weight of one dtype."""
    return (
        _ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == w.dtype
        and not torch.is_grad_enabled()
    )


class CpuLinear(nn.Linear):
    """A bias-free nn.Linear with the CPU inference paths; `prepack` layers keep packed weight copies."""

    def __init__(self, in_features: int, out_features: int, prepack: bool = False) -> None:
        super().__init__(in_features, out_features, bias=False)
        self._bind(prepack)

    def _bind(self, prepack: bool) -> None:
        """Start the packed-copy caches (empty)."""
        self.prepack = prepack
        self._packed: tuple[tuple, Tensor] | None = None
        self._blocked: tuple[tuple, Tensor] | None = None

    def packed_weight(self) -> Tensor:
        """The weight in oneDNN's blocked layout, re-made whenever the weight changes."""
        key = _weight_key(self.weight)
        if self._packed is None or self._packed[0] != key:
            self._packed = self._blocked = None  # free the old copies first: one at a time
            self._packed = (
                key,
                torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _PACK_ROWS),
            )
        return self._packed[1]

    def blocked_weight(self) -> Tensor | None:
        """The bfloat16 weight in the native kernel's layout (native.pack_bf16), made like packed_weight.

        It replaces the oneDNN copy (and the other way round), so a layer holds one packed copy.
        """
        key = _weight_key(self.weight)
        if self._blocked is None or self._blocked[0] != key:
            self._packed = self._blocked = None
            packed = native.pack_bf16(self.weight)
            if packed is None:
                return None
            self._blocked = (key, packed)
        return self._blocked[1]

    def few_rows_path(self) -> str:
        """native or onednn: the faster for one image's float32 rows on this CPU (choice.py); a
        packed copy made only to time oneDNN is dropped again when the native kernel wins."""
        had = self._packed is not None

        def onednn(x: Tensor) -> Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(), None, "none", [], "")

        path = choice.few_rows_path(self.weight.detach(), onednn)
        if path == "native" and not had:
            self._packed = None
        return path

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if _onednn_applies(x, w):
            rows = _batch_rows(x)
            # One or two rows in all: a decoding step of one image.
            few = x.numel() <= 2 * x.shape[-1]
            if w.dtype == torch.float32:
                if few and self.prepack and self.few_rows_path() == "onednn":
                    return torch.ops.mkldnn._linear_pointwise(
                        x, self.packed_weight(), None, "none", [], ""
                    )
                if few:  # the native kernel streams the weight ~1.4x faster on most CPUs
                    y = native.gemv(x, w)
                    if y is not None:
                        return y
                if self.prepack and (self._packed is not None or rows >= _PACK_MIN_ROWS_F32):
                    w = self.packed_weight()
                return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            if w.dtype == torch.bfloat16 and self.prepack:
                if few and native.available(torch.bfloat16):
                    blocked = self.blocked_weight()
                    y = None if blocked is None else native.gemv_bf16(x, blocked, *w.shape)
                    if y is not None:  # ~1.3x oneDNN's bfloat16 streaming
                        return y
                elif self._blocked is not None and rows <= 2:
                    # One image's prefill: keep the blocked copy for the steps that follow.
                    return F.linear(x, w)
            if w.dtype == torch.bfloat16 and self.prepack and _ONEDNN_BF16:
                return torch.ops.mkldnn._linear_pointwise(
                    x, self.packed_weight(), None, "none", [], ""
                )
        return F.linear(x, w)


class FusedLinears:
    """Linear layers that read the same input, run as one matmul where CpuLinear would pack their weights.

    One packed copy of the concatenated weight replaces the layers' separate packed copies (same memory):
    one larger read streams faster than several small ones and saves calls (~5% of a bf16 decoding step).
    It is a cache next to the layers' own parameters, re-made when any of them changes.
    """

    def __init__(self, layers: tuple[CpuLinear, ...]) -> None:
        self.layers = layers
        self._cache: tuple[tuple, Tensor] | None = None

    def weight(self, x: Tensor) -> Tensor | None:
        """The packed fused weight to multiply `x` by, or None where the layers should run one by one."""
        if not all(isinstance(m, nn.Linear) for m in self.layers):
            self._cache = None  # int8 layers (models/quant.py) run their own products
            return None
        first = self.layers[0].weight
        if not _onednn_applies(x, first):
            return None
        if first.dtype == torch.bfloat16:
            if not _ONEDNN_BF16 or (_batch_rows(x) <= 2 and native.available(torch.bfloat16)):
                return None
        elif first.dtype == torch.float32:
            rows = _batch_rows(x)
            if (self._cache is None and rows < _PACK_MIN_ROWS_F32) or (
                rows <= 2 and native.available()
            ):
                return None
        else:
            return None
        ws = [m.weight for m in self.layers]
        key = tuple(_weight_key(w) for w in ws)
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # free the old copy first
            fused = torch.cat([w.detach() for w in ws])
            self._cache = (key, torch.ops.mkldnn._reorder_linear_weight(fused, _PACK_ROWS))
        return self._cache[1]

    def __call__(self, x: Tensor) -> list[Tensor]:
        """Each layer's output for x, from one matmul when possible."""
        w = self.weight(x)
        if w is None:
            return [m(x) for m in self.layers]
        out = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return list(out.split([m.out_features for m in self.layers], dim=-1))


class CpuAttention(Attention):
    """Attention with fused q/k/v projections and native single-query attention."""

    def _bind(self) -> None:
        """Make the fused-projection cache over this module's q/k/v layers."""
        self.qkv = FusedLinears((self.q_proj, self.k_proj, self.v_proj))

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attention.project_qkv from one fused matmul in CPU inference."""
        if self.qkv.layers != (self.q_proj, self.k_proj, self.v_proj):  # swapped since (quantize_)
            self._bind()
        q, k, v = self.qkv(x)
        return self.split(q), self.split(k), self.split(v)

    def attention(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool
    ) -> Tensor:
        """Attention.attention; one query per row (decoding) in C, ~1.6x faster on CPU."""
        if q.shape[2] == 1 and not torch.is_grad_enabled():
            out = native.attend1(q, k, v, mask)
            if out is not None:
                return out
        return super().attention(q, k, v, mask, causal)


class FusedGLU(GLU):
    """GLU whose fc0 and fc1 run as one matmul in CPU inference."""

    def _bind(self) -> None:
        """Make the fused-projection cache over fc0 and fc1."""
        self.fc01 = FusedLinears((self.fc0, self.fc1))

    def forward(self, x: Tensor) -> Tensor:
        if self.fc01.layers != (self.fc0, self.fc1):  # swapped since (quantize_)
            self._bind()
        z = self.ln0(x)
        a, b = self.fc01(z)
        return self.fc2(self.dropout(self.ln1(F.gelu(a) * b)))


def _swap(module: nn.Module, cls: type) -> bool:
    """Give `module` the class `cls` (a subclass of its own adding no parameters); False if it had it."""
    if isinstance(module, cls):
        return False
    module.__class__ = cls
    return True


def accelerate(model: DalleBart) -> DalleBart:
    """Bind the CPU inference paths to `model` in place (once; the same parameters, state-dict names
    and results), and return it. The decoder's layers, used at every step, keep packed copies. Every
    path needs autograd off, so the model still trains as the plain one."""
    if isinstance(model.decoder.lm_head, CpuLinear):
        return model
    per_step: set[nn.Module] = {model.decoder.lm_head}
    for layer in model.decoder.layers:
        per_step.update(layer.self_attn.children())
        per_step.update((layer.encoder_attn.q_proj, layer.encoder_attn.out_proj))
        per_step.update((layer.glu.fc0, layer.glu.fc1, layer.glu.fc2))
        if _swap(layer.glu, FusedGLU):
            layer.glu._bind()
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is None and _swap(m, CpuLinear):
            m._bind(prepack=m in per_step)
        elif isinstance(m, Attention) and _swap(m, CpuAttention):
            m._bind()
    return model


def cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the decoding K/V cache and attention on `device` for a `dtype` model.

    On CPU, PyTorch's reduced-precision attention kernels run single-query (decoding) attention 2-5x
    slower than float32 ones, so the cache is float32 (twice the memory; attention more exact, not
    less), except for bfloat16 models where the native kernels read a bfloat16 cache: half the bytes
    to read at every step, and the same values (the K/V projections are bfloat16 already).
    """
    if device.type != "cpu" or (dtype == torch.bfloat16 and native.available(torch.bfloat16)):
        return dtype
    return torch.float32


class NativeStep:
    """One-token decoding steps on CPU, each decoder layer one native call (native.DecoderLayerKernel)
    bound to one cache (benchmarks/bench_kernels.py: one image's bfloat16 step 9.6 ms against 15.9
    op by op, float32 19.4 against 32.0). Leaves cache.length to the caller."""

    def __init__(self, model: DalleBart, layers: list[native.DecoderLayerKernel]) -> None:
        self.model = model
        self.layers = layers

    @torch.no_grad()
    def __call__(self, tokens: Tensor, pos: int) -> Tensor:
        """decode_step's logits [B, 1, V] for `tokens` [B, 1] at position `pos`."""
        x = self.model.decoder.embed(tokens, pos)
        return self._layers(x, torch.full((x.shape[0],), pos, dtype=torch.long))

    @torch.no_grad()
    def at(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Logits [n, 1, V] for `tokens` [n, 1] in the cache's first n rows, row r's at its own
        position positions[r] (int64 [n]): rows at different points of their images."""
        return self._layers(self.model.decoder.embed(tokens, positions), positions.contiguous())

    def _layers(self, x: Tensor, positions: Tensor) -> Tensor:
        """The decoder layers and head for embedded inputs x [n, 1, d] at `positions`."""
        dec = self.model.decoder
        b, _, d = x.shape
        h = x.reshape(b, d).float().contiguous()
        for kernel in self.layers:
            kernel(h, positions)
        out = dec.final_ln(h.to(x.dtype).view(b, 1, d))
        head = dec.lm_head
        if b > 2 and isinstance(head, CpuLinear):
            # several images: the native product, as in the layers (the step is raced whole against
            # the op-by-op one); one or two rows take CpuLinear's measured choice
            w = head.weight
            y = None
            if w.dtype == torch.float32:
                y = native.gemm(out.view(b, d), w)
            elif w.dtype == torch.bfloat16 and native.bf16_layout() == "plain":
                y = native.gemv_bf16(out.view(b, d), w.detach(), *w.shape)
            if y is not None:
                return y.view(b, 1, -1)
        return head(out)


def native_step(model: DalleBart, cache: DecoderCache, pos: int) -> NativeStep | None:
    """The native decoder-layer step for this cache where it applies: an accelerated model in CPU
    inference whose decoder layers are all float32 (any number of rows), all bfloat16 (see
    cache_dtype; one image, or any number of rows where the kernel reads plain bfloat16) or all
    int8 (models/quant.py; up to native.INT8_MAX_ROWS); else None. Float32, and several rows of
    int8 or plain bfloat16, take it only where it beats the layers op by op on
    this CPU (timed once per model shape and rows on slot `pos`, not yet written)."""
    dtype = model.decoder.embed_tokens.weight.dtype
    rows = cache.batch_size
    if (
        isinstance(model.decoder.lm_head, CpuLinear)
        and not model.training
        and cache.self_k.device.type == "cpu"
        and cache.self_k.dtype in (torch.float32, dtype)
        and (rows <= 2 or dtype == torch.float32 or native.bf16_layout() == "plain")
        and dtype in (torch.float32, torch.bfloat16)
        and native.available(dtype)
        and all(isinstance(m, CpuLinear) for layer in model.decoder.layers for m in _dense(layer))
    ):
        layers = _bind_native(model, cache, dtype == torch.bfloat16)
        step = None if layers is None else NativeStep(model, layers)
        if step is not None and (dtype == torch.float32 or rows > 2):
            kind = "float32" if dtype == torch.float32 else "bfloat16"
            # bfloat16 op by op without AVX-512 is hundreds of times slower: a race would cost
            # a minute of steps the first time and always pick the native step
            race = kind == "float32" or native.has_avx512()
            if race and not _native_is_faster(model, cache, step, pos, kind):
                return None
            if rows > 2:  # the layers' packed copies served the op-by-op race only
                _drop_packed_copies(model)
        return step
    if (
        not model.training
        and cache.self_k.device.type == "cpu"
        and cache.self_k.dtype == torch.float32
        and rows <= native.INT8_MAX_ROWS
        and dtype == torch.float32
        and native.available(torch.int8)
        and all(_is_int8(m) for layer in model.decoder.layers for m in _dense(layer))
    ):  # 8-bit weights (models/quant.py): the layer kernel reads one byte per weight
        layers = _bind_native(model, cache, bf16=False, int8=True)
        step = None if layers is None else NativeStep(model, layers)
        if step is not None and rows > 2 and not _native_is_faster(model, cache, step, pos, "int8"):
            return None
        return step
    return None


def _drop_packed_copies(model: DalleBart) -> None:
    """Free the oneDNN copies of the decoder layers' and head's weights (re-made if an op-by-op
    step needs them again): the native step reads the weights themselves."""
    for m in [model.decoder.lm_head] + [m for layer in model.decoder.layers for m in _dense(layer)]:
        if isinstance(m, CpuLinear):
            m._packed = None
    for layer in model.decoder.layers:
        layer.self_attn.qkv._cache = None
        layer.glu.fc01._cache = None
    release_freed_memory()


def _is_int8(m: nn.Module) -> bool:
    """An int8 dense layer (models/quant.Int8Linear; named by its buffers: quant imports this
    package)."""
    w = getattr(m, "weight", None)
    return isinstance(w, Tensor) and w.dtype == torch.int8 and hasattr(m, "weight_scale")


def _norms(layer: nn.Module) -> list[tuple[Tensor | None, Tensor]]:
    """A decoder layer's six layer norms (weight or None, bias) in the native kernel's order."""
    glu = layer.glu
    norms = (
        layer.pre_self_attn_layer_norm,
        layer.self_attn_layer_norm,
        layer.pre_encoder_attn_layer_norm,
        layer.encoder_attn_layer_norm,
        glu.ln0,
        glu.ln1,
    )
    return [(None if m.weight is None else m.weight.detach(), m.bias.detach()) for m in norms]


def _native_is_faster(
    model: DalleBart, cache: DecoderCache, step: NativeStep, pos: int, kind: str
) -> bool:
    """Whether the native layer step beats the op-by-op step (oneDNN or native products, each the
    faster here) for this model's shape on this CPU. Timed on the real cache at slot `pos`, which
    the sampling step writes next anyway; the per-product race alone misjudges small models, whose
    op-by-op step is mostly the ~400 PyTorch calls the layer kernel saves."""
    cfg = model.config
    tokens = torch.full((cache.batch_size, 1), cfg.decoder_start_token_id, dtype=torch.long)
    length = cache.length

    def op_by_op() -> None:
        model.decode_step(tokens, cache, last_only=True)
        cache.length = length

    shape = f"d{cfg.d_model}-f{cfg.ffn_dim}-l{cfg.decoder_layers}-v{cfg.decoder_vocab_size}"
    shape += f"-rows{cache.batch_size}"
    return choice.step_path(kind, shape, lambda: step(tokens, pos), op_by_op) == "native"


def _dense(layer: nn.Module) -> tuple[nn.Module, ...]:
    """A decoder layer's dense layers in the native kernel's order (native.DecoderLayerKernel)."""
    sa, ca, glu = layer.self_attn, layer.encoder_attn, layer.glu
    attention = (sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj, ca.q_proj, ca.out_proj)
    return (*attention, glu.fc0, glu.fc1, glu.fc2)


def _bind_native(
    model: DalleBart, cache: DecoderCache, bf16: bool, int8: bool = False
) -> list[native.DecoderLayerKernel] | None:
    """One kernel per decoder layer over its weights: float32 (moved to huge pages), the layers'
    bfloat16 blocked copies, or (int8) their int8 weights and scales."""
    # float32 and plain bfloat16 read the weights themselves, moved to huge pages; blocked bfloat16
    # reads its copies, made on huge pages
    own = not int8 and (not bf16 or native.bf16_layout() == "plain")
    if own:
        native.move_to_huge_pages(model.decoder.lm_head.weight)
    bound = []
    mask = cache.cross_mask.reshape(cache.batch_size, -1).contiguous()
    for i, layer in enumerate(model.decoder.layers):
        dense = _dense(layer)
        if own:
            for m in dense:
                native.move_to_huge_pages(m.weight)
            release_freed_memory()  # the weights' old homes
        weights = [m.blocked_weight() if bf16 else m.weight.detach() for m in dense]
        if any(w is None or not w.is_contiguous() for w in weights):
            return None
        bound.append(
            native.DecoderLayerKernel(
                weights,  # type: ignore[arg-type]
                _norms(layer),
                model.config.layer_norm_eps,
                model.config.attention_heads,
                cache.self_k[i],
                cache.self_v[i],
                cache.cross_k[i],
                cache.cross_v[i],
                mask,
                bf16,
                scales=[m.weight_scale for m in dense] if int8 else None,
            )
        )
    return bound
