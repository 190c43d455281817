"""DalleBart: the BART encoder-decoder of DALL·E Mini (NormFormer layers, GLU feed-forward, no dense biases).

State-dict names follow min-dalle's (the best-known PyTorch layout of these weights), so its files load
as they are. The decoder keeps a pre-allocated key/value cache for incremental sampling; the
cross-attention keys/values are computed once per prompt when the cache is created.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BartConfig
from ..errors import InputError
from ..memory import release_freed_memory
from . import kernels


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


class Dense(nn.Linear):
    """Bias-free linear layer with fast CPU inference paths; same parameter, same state-dict name.

    Decoding multiplies a few rows by every weight matrix, so it is bound by how fast weights stream from
    memory (one image) or by matmul speed (several). Without autograd on CPU, one or two float32 rows go
    through the native kernel (models/kernels, ~1.4x oneDNN's streaming) where it builds; other float32
    products through oneDNN, which streams weights ~2x faster than MKL's small-batch sgemm. Layers marked
    `prepack` (the decoder's, used at every step) keep a second copy of their weight in oneDNN's blocked
    layout, 20-50% faster again: always in bfloat16, in float32 once a step has 8 rows or more; in
    bfloat16 one image's steps use the native kernel's blocked copy instead (one copy at a time).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.prepack = False
        self._packed: tuple[tuple, Tensor] | None = None
        self._blocked: tuple[tuple, Tensor] | None = None

    def _weight_key(self) -> tuple:
        w = self.weight
        try:
            return (w.data_ptr(), w.dtype, w._version)
        except (
            RuntimeError
        ):  # inference tensors have no version counter (and cannot change outside it)
            return (w.data_ptr(), w.dtype)

    def packed_weight(self) -> Tensor:
        """The weight in oneDNN's blocked layout, re-made whenever the weight changes."""
        key = self._weight_key()
        if self._packed is None or self._packed[0] != key:
            self._packed = self._blocked = None  # free the old copies first: one at a time
            self._packed = (
                key,
                torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _PACK_ROWS),
            )
        return self._packed[1]

    def blocked_weight(self) -> Tensor | None:
        """The bfloat16 weight in the native kernel's layout (kernels.pack_bf16), made like packed_weight.

        It replaces the oneDNN copy (and the other way round), so a layer holds one packed copy.
        """
        key = self._weight_key()
        if self._blocked is None or self._blocked[0] != key:
            self._packed = self._blocked = None
            packed = kernels.pack_bf16(self.weight)
            if packed is None:
                return None
            self._blocked = (key, packed)
        return self._blocked[1]

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (
            _ONEDNN_LINEAR
            and x.device.type == "cpu"
            and x.dtype == w.dtype
            and not torch.is_grad_enabled()
        ):
            rows = _batch_rows(x)
            # One or two rows in all: a decoding step of one image.
            few = x.numel() <= 2 * x.shape[-1]
            if w.dtype == torch.float32:
                if few:  # the native kernel streams the weight ~1.4x faster
                    y = kernels.gemv(x, w)
                    if y is not None:
                        return y
                if self.prepack and (self._packed is not None or rows >= _PACK_MIN_ROWS_F32):
                    w = self.packed_weight()
                return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            if w.dtype == torch.bfloat16 and self.prepack:
                if few and kernels.available(torch.bfloat16):
                    blocked = self.blocked_weight()
                    y = None if blocked is None else kernels.gemv_bf16(x, blocked, *w.shape)
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


class FusedDense:
    """Dense layers that read the same input, run as one matmul where Dense would pack their weights.

    One packed copy of the concatenated weight replaces the layers' separate packed copies (same memory):
    one larger read streams faster than several small ones and saves calls (~5% of a bf16 decoding step).
    It is a cache next to the layers' own parameters, re-made when any of them changes.
    """

    def __init__(self, layers: tuple[Dense, ...]) -> None:
        self.layers = layers
        self._cache: tuple[tuple, Tensor] | None = None

    def weight(self, x: Tensor) -> Tensor | None:
        """The packed fused weight to multiply `x` by, or None where the layers should run one by one."""
        first = self.layers[0].weight
        if not (
            _ONEDNN_LINEAR
            and x.device.type == "cpu"
            and x.dtype == first.dtype
            and not torch.is_grad_enabled()
        ):
            return None
        if first.dtype == torch.bfloat16:
            if not _ONEDNN_BF16 or (_batch_rows(x) <= 2 and kernels.available(torch.bfloat16)):
                return None
        elif first.dtype == torch.float32:
            rows = _batch_rows(x)
            if (self._cache is None and rows < _PACK_MIN_ROWS_F32) or (
                rows <= 2 and kernels.available()
            ):
                return None
        else:
            return None
        ws = [m.weight for m in self.layers]
        try:
            key: tuple = tuple((w.data_ptr(), w.dtype, w._version) for w in ws)
        except RuntimeError:  # inference tensors: no version counter
            key = tuple((w.data_ptr(), w.dtype) for w in ws)
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


def attention_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the decoding K/V cache and attention on `device` for a `dtype` model.

    On CPU, PyTorch's reduced-precision attention kernels run single-query (decoding) attention 2-5x
    slower than float32 ones, so the cache is float32 (twice the memory; attention more exact, not
    less), except for bfloat16 models where the native kernels (models/kernels) read a bfloat16
    cache: half the bytes to read at every step, and the same values (the K/V projections are
    bfloat16 already).
    """
    if device.type != "cpu" or (dtype == torch.bfloat16 and kernels.available(torch.bfloat16)):
        return dtype
    return torch.float32


class LayerNorm(nn.Module):
    """LayerNorm whose scale is optional: the original has bias-only norms before every dense layer."""

    def __init__(self, dim: int, eps: float, scale: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        if scale:
            self.weight = nn.Parameter(torch.ones(dim))
        else:
            self.register_parameter("weight", None)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None and torch.is_grad_enabled():
            # Bias added outside: CPU layer_norm's backward with a bias but no weight fails under
            # bf16 autocast ("expected scalar type BFloat16 but found Float"); same result.
            return F.layer_norm(x, (self.dim,), None, None, self.eps) + self.bias
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


class GLU(nn.Module):
    """Gated feed-forward: fc2(LN1(gelu(fc0(LN0 x)) * fc1(LN0 x)))."""

    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        d, f, eps, s = cfg.d_model, cfg.ffn_dim, cfg.layer_norm_eps, cfg.force_ln_scale
        self.ln0 = LayerNorm(d, eps, scale=s)
        self.fc0 = Dense(d, f)
        self.fc1 = Dense(d, f)
        self.ln1 = LayerNorm(f, eps, scale=s)
        self.fc2 = Dense(f, d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc01 = FusedDense((self.fc0, self.fc1))

    def forward(self, x: Tensor) -> Tensor:
        z = self.ln0(x)
        a, b = self.fc01(z) if self.fc0.prepack else (self.fc0(z), self.fc1(z))
        return self.fc2(self.dropout(self.ln1(F.gelu(a) * b)))


class Attention(nn.Module):
    """Multi-head attention without biases; scaled_dot_product_attention does the work."""

    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.heads = cfg.attention_heads
        self.head_dim = cfg.head_dim
        self.q_proj = Dense(d, d)
        self.k_proj = Dense(d, d)
        self.v_proj = Dense(d, d)
        self.out_proj = Dense(d, d)
        self.qkv = FusedDense((self.q_proj, self.k_proj, self.v_proj))

    def split(self, x: Tensor) -> Tensor:
        """[B, T, d] -> [B, H, T, Dh]."""
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of x, [B, H, T, Dh] each (one fused matmul in CPU inference)."""
        q, k, v = self.qkv(x)
        return self.split(q), self.split(k), self.split(v)

    def attend(
        self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False
    ) -> Tensor:
        """Queries from x [B, Tq, d] against keys/values [B, H, Tk, Dh]; mask is bool, True = attend."""
        return self.attend_q(self.split(self.q_proj(x)), k, v, mask, causal, x.dtype)

    def attend_q(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        causal: bool = False,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Split queries q [B, H, Tq, Dh] against keys/values; the output projection runs in `dtype` (q's)."""
        dtype = dtype or q.dtype
        q = q.to(k.dtype)  # the cache's dtype: see attention_dtype
        out = None
        if q.shape[2] == 1 and not torch.is_grad_enabled():  # decoding: ~1.6x faster on CPU
            out = kernels.attend1(q, k, v, mask)
        if out is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.out_proj(out.to(dtype))


class EncoderLayer(nn.Module):
    """NormFormer encoder layer: x + LN(attn(LN x)), then x + GLU(x)."""

    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        eps, s = cfg.layer_norm_eps, cfg.force_ln_scale
        self.pre_self_attn_layer_norm = LayerNorm(cfg.d_model, eps, scale=s)
        self.self_attn = Attention(cfg)
        self.self_attn_layer_norm = LayerNorm(cfg.d_model, eps)
        self.glu = GLU(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.pre_self_attn_layer_norm(x)
        k, v = self.self_attn.project_kv(h)
        h = self.self_attn.attend(h, k, v, mask)
        x = x + self.dropout(self.self_attn_layer_norm(h))
        return x + self.dropout(self.glu(x))


class DecoderLayer(nn.Module):
    """NormFormer decoder layer: causal self-attention, cross-attention, GLU, each with pre- and post-LN."""

    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        d, eps, s = cfg.d_model, cfg.layer_norm_eps, cfg.force_ln_scale
        self.pre_self_attn_layer_norm = LayerNorm(d, eps, scale=s)
        self.self_attn = Attention(cfg)
        self.self_attn_layer_norm = LayerNorm(d, eps)
        self.pre_encoder_attn_layer_norm = LayerNorm(d, eps, scale=s)
        self.encoder_attn = Attention(cfg)
        self.encoder_attn_layer_norm = LayerNorm(d, eps)
        self.glu = GLU(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        # The layers every decoding step uses (cross-attention K/V are projected once per prompt).
        per_step = (
            *self.self_attn.children(),
            self.encoder_attn.q_proj,
            self.encoder_attn.out_proj,
        )
        for dense in (*per_step, *(m for m in self.glu.children() if isinstance(m, Dense))):
            dense.prepack = True

    def forward(
        self,
        x: Tensor,
        cross_k: Tensor | None,
        cross_v: Tensor | None,
        cross_mask: Tensor,
        self_k: Tensor | None = None,
        self_v: Tensor | None = None,
        start: int = 0,
        encoder_states: Tensor | None = None,
    ) -> Tensor:
        """Full causal pass when no cache is given; else writes this chunk's K/V at `start` and attends the prefix.

        Cross-attention K/V are given (cached) or projected here from `encoder_states` (training: inside
        the layer's forward, so that FSDP has gathered this layer's weights).
        """
        if cross_k is None or cross_v is None:
            if encoder_states is None:
                raise ValueError("DecoderLayer needs cross_k/cross_v or encoder_states")
            cross_k, cross_v = self.encoder_attn.project_kv(encoder_states)
        h = self.pre_self_attn_layer_norm(x)
        n = x.shape[1]
        if self_k is None or self_v is None:
            k, v = self.self_attn.project_kv(h)
            h = self.self_attn.attend(h, k, v, causal=n > 1)
        else:
            q, k, v = self.self_attn.project_qkv(h)
            end = start + n
            self_k[:, :, start:end] = k
            self_v[:, :, start:end] = v
            k, v = self_k[:, :, :end], self_v[:, :, :end]
            mask = None
            if n > 1:  # chunk of several new tokens: query i sees keys 0..start+i
                q_pos = torch.arange(start, end, device=x.device)[:, None]
                mask = torch.arange(end, device=x.device)[None, :] <= q_pos
            h = self.self_attn.attend_q(q, k, v, mask, dtype=x.dtype)
        x = x + self.dropout(self.self_attn_layer_norm(h))
        return self._cross_and_glu(x, cross_k, cross_v, cross_mask)

    def _cross_and_glu(self, x: Tensor, cross_k: Tensor, cross_v: Tensor, mask: Tensor) -> Tensor:
        """The layer's second half: x + LN(cross_attn(LN x)), then x + GLU(x)."""
        h = self.pre_encoder_attn_layer_norm(x)
        h = self.encoder_attn.attend(h, cross_k, cross_v, mask)
        x = x + self.dropout(self.encoder_attn_layer_norm(h))
        return x + self.dropout(self.glu(x))

    def step_static(
        self,
        x: Tensor,
        cross_k: Tensor,
        cross_v: Tensor,
        cross_mask: Tensor,
        self_k: Tensor,
        self_v: Tensor,
        pos: Tensor,
        self_mask: Tensor,
    ) -> Tensor:
        """One token per row at position tensor `pos` ([1]): its K/V go into the cache there, and the
        query attends over every cache slot with `self_mask` hiding the later ones (static shapes)."""
        h = self.pre_self_attn_layer_norm(x)
        q, k, v = self.self_attn.project_qkv(h)
        self_k.index_copy_(2, pos, k.to(self_k.dtype))
        self_v.index_copy_(2, pos, v.to(self_v.dtype))
        h = self.self_attn.attend_q(q, self_k, self_v, self_mask, dtype=x.dtype)
        x = x + self.dropout(self.self_attn_layer_norm(h))
        return self._cross_and_glu(x, cross_k, cross_v, cross_mask)


class DalleBartEncoder(nn.Module):
    """Bidirectional encoder over caption tokens."""

    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.encoder_vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.max_text_length, cfg.d_model)
        self.layernorm_embedding = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.final_ln = LayerNorm(cfg.d_model, cfg.layer_norm_eps, scale=cfg.force_ln_scale)
        self.embed_scale = cfg.d_model**0.5 if cfg.scale_embedding else 1.0

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = self.embed_tokens(input_ids) * self.embed_scale + self.embed_positions(pos)
        x = self.layernorm_embedding(x)
        mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_ln(x)


class DalleBartDecoder(nn.Module):
    """Autoregressive decoder over image tokens, with its own embeddings and the output head."""

    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.decoder_vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.image_length, cfg.d_model)
        self.layernorm_embedding = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.final_ln = LayerNorm(cfg.d_model, cfg.layer_norm_eps, scale=cfg.force_ln_scale)
        self.lm_head = Dense(cfg.d_model, cfg.decoder_vocab_size)
        self.lm_head.prepack = True
        self.embed_scale = cfg.d_model**0.5 if cfg.scale_embedding else 1.0

    def embed(self, tokens: Tensor, start: int) -> Tensor:
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.embed_tokens(tokens) * self.embed_scale + self.embed_positions(pos)
        return self.layernorm_embedding(x)


@dataclass
class DecoderCache:
    """Pre-allocated decoder state for one sampling run: self-attention K/V and per-prompt cross K/V."""

    self_k: Tensor  # [layers, B, H, image_length, Dh]
    self_v: Tensor
    cross_k: Tensor  # [layers, B, H, text_length, Dh]
    cross_v: Tensor
    cross_mask: Tensor  # [B, 1, 1, text_length]: 0 where attended, -inf on padding (cache dtype)
    length: int = 0
    # The native per-layer kernels bound to this cache (made on the first one-token step), or False
    # where they do not apply.
    native: list[kernels.DecoderLayerKernel] | bool | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.self_k.shape[1]


@dataclass
class BartOutput:
    logits: Tensor
    loss: Tensor | None = None


class DalleBart(nn.Module):
    """Caption tokens -> image-token logits (training forward) and incremental decoding with a KV cache."""

    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = DalleBartEncoder(cfg)
        self.decoder = DalleBartDecoder(cfg)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)

    def check_text(self, input_ids: Tensor, attention_mask: Tensor) -> None:
        """Reject text inputs the embedding tables cannot hold, with a message instead of an index error."""
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise InputError(
                f"input_ids and attention_mask must both be [batch, length]; got {tuple(input_ids.shape)} "
                f"and {tuple(attention_mask.shape)}"
            )
        if input_ids.shape[1] > self.config.max_text_length:
            raise InputError(
                f"text is {input_ids.shape[1]} tokens long; this model takes at most {self.config.max_text_length}"
            )
        if input_ids.numel() and (
            input_ids.min() < 0 or input_ids.max() >= self.config.encoder_vocab_size
        ):
            raise InputError(
                f"text token ids must lie in [0, {self.config.encoder_vocab_size}); the tokenizer does not match "
                "this model"
            )

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Caption token ids [B, T] -> encoder states [B, T, d]."""
        self.check_text(input_ids, attention_mask)
        return self.encoder(input_ids, attention_mask)

    def shift_right(self, labels: Tensor) -> Tensor:
        """Teacher-forcing inputs: BOS followed by all labels but the last."""
        bos = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        return torch.cat([bos, labels[:, :-1]], dim=1)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
    ) -> BartOutput:
        """Teacher-forced pass: logits [B, L, V] and, given labels (image codes [B, L]), the mean cross-entropy."""
        if decoder_input_ids is None:
            if labels is None:
                raise InputError("forward needs labels (image codes) or decoder_input_ids")
            decoder_input_ids = self.shift_right(labels)
        if decoder_input_ids.shape[1] > self.config.image_length:
            raise InputError(
                f"{decoder_input_ids.shape[1]} image tokens given; this model has image_length "
                f"{self.config.image_length}"
            )
        enc = self.encode(input_ids, attention_mask)
        dec = self.decoder
        cross_mask = attention_mask.bool()[:, None, None, :]
        x = dec.embed(decoder_input_ids, 0)
        for layer in dec.layers:
            x = layer(x, None, None, cross_mask, encoder_states=enc)
        logits = dec.lm_head(dec.final_ln(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        return BartOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def init_cache(
        self, encoder_states: Tensor, attention_mask: Tensor, rows: Tensor | None = None
    ) -> DecoderCache:
        """Allocate the K/V cache for one sampling run.

        Cross-attention K/V are computed here, once per encoder row (prompt); `rows[r]` names the encoder
        row that cache row r (an image being sampled) attends to, so n images of a prompt share one
        encoder pass and one K/V projection.
        """
        cfg = self.config
        if rows is None:
            rows = torch.arange(encoder_states.shape[0], device=encoder_states.device)
        layers = self.decoder.layers
        device = encoder_states.device
        dtype = attention_dtype(encoder_states.dtype, device)
        cks, cvs = [], []
        for layer in layers:
            k, v = layer.encoder_attn.project_kv(encoder_states)
            cks.append(k.index_select(0, rows).to(dtype))
            cvs.append(v.index_select(0, rows).to(dtype))
        # An additive mask, made once: SDPA would turn a bool mask into one at every step.
        keep = attention_mask.bool().index_select(0, rows)[:, None, None, :]
        mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(
            ~keep, float("-inf")
        )
        shape = (len(layers), rows.shape[0], cfg.attention_heads, cfg.image_length, cfg.head_dim)
        # Zeros, not empty: decode_step_static attends over every slot, masking the later ones, and
        # a masked NaN left in uninitialised memory would still poison the sum (0 * NaN).
        return DecoderCache(
            self_k=torch.zeros(shape, dtype=dtype, device=device),
            self_v=torch.zeros(shape, dtype=dtype, device=device),
            cross_k=torch.stack(cks),
            cross_v=torch.stack(cvs),
            cross_mask=mask,
        )

    def _native_layers(self, cache: DecoderCache) -> list[kernels.DecoderLayerKernel] | None:
        """The native decoder-layer kernels for this cache's one-token steps, where they apply: CPU
        inference of one image (one or two rows) in float32 or bfloat16 (see attention_dtype)."""
        if cache.native is None:
            cache.native = False
            dtype = self.decoder.embed_tokens.weight.dtype
            if (
                not self.training
                and cache.self_k.device.type == "cpu"
                and cache.self_k.dtype in (torch.float32, dtype)
                and cache.batch_size <= 2
                and dtype in (torch.float32, torch.bfloat16)
                and kernels.available(dtype)
            ):
                cache.native = self._bind_native(cache, dtype == torch.bfloat16) or False
        return cache.native or None

    def _bind_native(
        self, cache: DecoderCache, bf16: bool
    ) -> list[kernels.DecoderLayerKernel] | None:
        """One kernel per decoder layer over its weights (bfloat16: the layers' blocked copies)."""
        if not bf16:
            kernels.move_to_huge_pages(self.decoder.lm_head.weight)
        bound = []
        mask = cache.cross_mask.reshape(cache.batch_size, -1).contiguous()
        for i, layer in enumerate(self.decoder.layers):
            sa, ca, glu = layer.self_attn, layer.encoder_attn, layer.glu
            dense = (sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj, ca.q_proj, ca.out_proj)
            dense += (glu.fc0, glu.fc1, glu.fc2)
            if not bf16:  # bfloat16 reads its blocked copies, made on huge pages
                for m in dense:
                    kernels.move_to_huge_pages(m.weight)
                release_freed_memory()  # the weights' old homes
            weights = [m.blocked_weight() if bf16 else m.weight.detach() for m in dense]
            if any(w is None or not w.is_contiguous() for w in weights):
                return None
            norms = (
                layer.pre_self_attn_layer_norm,
                layer.self_attn_layer_norm,
                layer.pre_encoder_attn_layer_norm,
                layer.encoder_attn_layer_norm,
                glu.ln0,
                glu.ln1,
            )
            bound.append(
                kernels.DecoderLayerKernel(
                    weights,  # type: ignore[arg-type]
                    [
                        (None if m.weight is None else m.weight.detach(), m.bias.detach())
                        for m in norms
                    ],
                    self.config.layer_norm_eps,
                    self.config.attention_heads,
                    cache.self_k[i],
                    cache.self_v[i],
                    cache.cross_k[i],
                    cache.cross_v[i],
                    mask,
                    bf16,
                )
            )
        return bound

    @torch.no_grad()
    def decode_step_static(self, tokens: Tensor, cache: DecoderCache, pos: Tensor) -> Tensor:
        """decode_step's logits for one token per row ([B, 1]) at position tensor `pos` ([1], on the
        cache's device), in shapes that do not depend on the position: attention runs over all
        image_length slots with the later ones masked. No host synchronisation and no Python-int
        position, so a CUDA graph can capture it once and replay it for every step
        (generate.GraphedStep). Leaves cache.length to the caller."""
        dec = self.decoder
        x = dec.embed_tokens(tokens) * dec.embed_scale + dec.embed_positions(pos)
        x = dec.layernorm_embedding(x)
        slots = torch.arange(self.config.image_length, device=pos.device)
        mask = torch.zeros(slots.shape, dtype=cache.self_k.dtype, device=pos.device)
        mask = mask.masked_fill(slots > pos, float("-inf"))[None, None, None, :]
        for i, layer in enumerate(dec.layers):
            x = layer.step_static(
                x,
                cache.cross_k[i],
                cache.cross_v[i],
                cache.cross_mask,
                cache.self_k[i],
                cache.self_v[i],
                pos,
                mask,
            )
        return dec.lm_head(dec.final_ln(x))

    @torch.no_grad()
    def decode_step(self, tokens: Tensor, cache: DecoderCache, last_only: bool = False) -> Tensor:
        """Feed tokens [B, n] at positions cache.length.. and return logits [B, n, V] ([B, 1, V] of
        the last position with `last_only`: a prefill's output head then runs once, not n times);
        advances the cache.

        One-token steps of one image on CPU run each decoder layer as one native call where the kernels
        build (models/kernels; benchmarks/bench_kernels.py: a bfloat16 step 9.6 ms against 15.9 op by
        op, float32 19.4 against 32.0).
        """
        start, n = cache.length, tokens.shape[1]
        if start + n > self.config.image_length:
            raise InputError(
                f"cannot decode past image_length {self.config.image_length} (at {start}, +{n} tokens)"
            )
        dec = self.decoder
        x = dec.embed(tokens, start)
        native = self._native_layers(cache) if n == 1 else None
        if native:
            b, _, d = x.shape
            h = x.reshape(b, d).float().contiguous()
            for kernel in native:
                kernel(h, start)
            cache.length = start + n
            return dec.lm_head(dec.final_ln(h.to(x.dtype).view(b, 1, d)))
        for i, layer in enumerate(dec.layers):
            x = layer(
                x,
                cache.cross_k[i],
                cache.cross_v[i],
                cache.cross_mask,
                cache.self_k[i],
                cache.self_v[i],
                start,
            )
        cache.length = start + n
        return dec.lm_head(dec.final_ln(x[:, -1:] if last_only else x))
