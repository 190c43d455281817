"""DalleBart: the BART encoder-decoder of DALL·E Mini (NormFormer layers, GLU feed-forward, no dense biases).

State-dict names follow min-dalle's (the best-known PyTorch layout of these weights), so its files load
as they are. The decoder keeps a pre-allocated key/value cache for incremental sampling; the
cross-attention keys/values are computed once per prompt when the cache is created.

This file is the architecture only. The speed paths (packed and fused weights, native CPU kernels,
the CUDA-graph step) live in models/kernels and bind to a model from outside (kernels.accelerate);
they give the same results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BartConfig
from ..errors import InputError


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


def linear(in_features: int, out_features: int) -> nn.Linear:
    """A dense layer of the original: no bias."""
    return nn.Linear(in_features, out_features, bias=False)


class GLU(nn.Module):
    """Gated feed-forward: fc2(LN1(gelu(fc0(LN0 x)) * fc1(LN0 x)))."""

    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        d, f, eps, s = cfg.d_model, cfg.ffn_dim, cfg.layer_norm_eps, cfg.force_ln_scale
        self.ln0 = LayerNorm(d, eps, scale=s)
        self.fc0 = linear(d, f)
        self.fc1 = linear(d, f)
        self.ln1 = LayerNorm(f, eps, scale=s)
        self.fc2 = linear(f, d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        z = self.ln0(x)
        a, b = self.fc0(z), self.fc1(z)
        return self.fc2(self.dropout(self.ln1(F.gelu(a) * b)))


class Attention(nn.Module):
    """Multi-head attention without biases; scaled_dot_product_attention does the work."""

    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.heads = cfg.attention_heads
        self.head_dim = cfg.head_dim
        self.q_proj = linear(d, d)
        self.k_proj = linear(d, d)
        self.v_proj = linear(d, d)
        self.out_proj = linear(d, d)

    def split(self, x: Tensor) -> Tensor:
        """[B, T, d] -> [B, H, T, Dh]."""
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of x, [B, H, T, Dh] each."""
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of x, [B, H, T, Dh] each."""
        return self.split(self.q_proj(x)), *self.project_kv(x)

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
        out = self.attention(q.to(k.dtype), k, v, mask, causal)  # in the K/V cache's dtype
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.out_proj(out.to(dtype))

    def attention(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool
    ) -> Tensor:
        """softmax(q k^T / sqrt(Dh) + mask) v per head, [B, H, Tq, Dh]."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


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
        return self.cross_and_glu(x, cross_k, cross_v, cross_mask)

    def cross_and_glu(self, x: Tensor, cross_k: Tensor, cross_v: Tensor, mask: Tensor) -> Tensor:
        """The layer's second half: x + LN(cross_attn(LN x)), then x + GLU(x)."""
        h = self.pre_encoder_attn_layer_norm(x)
        h = self.encoder_attn.attend(h, cross_k, cross_v, mask)
        x = x + self.dropout(self.encoder_attn_layer_norm(h))
        return x + self.dropout(self.glu(x))


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
        self.lm_head = linear(cfg.d_model, cfg.decoder_vocab_size)
        self.embed_scale = cfg.d_model**0.5 if cfg.scale_embedding else 1.0

    def embed(self, tokens: Tensor, start: int | Tensor) -> Tensor:
        """Token ids [B, n] at positions start.. (one start for all, or int64 [B]: row b's own)
        -> normalized embeddings [B, n, d]."""
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        pos = start[:, None] + pos if isinstance(start, Tensor) else pos + start
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

    @property
    def batch_size(self) -> int:
        """Rows being decoded."""
        return self.self_k.shape[1]


@dataclass
class BartOutput:
    """Logits [B, L, V] of a teacher-forced pass, and the mean cross-entropy given labels."""

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
        self,
        encoder_states: Tensor,
        attention_mask: Tensor,
        rows: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> DecoderCache:
        """Allocate the K/V cache for one sampling run, in `dtype` (default: the encoder states').

        Cross-attention K/V are computed here, once per encoder row (prompt); `rows[r]` names the encoder
        row that cache row r (an image being sampled) attends to, so n images of a prompt share one
        encoder pass and one K/V projection.
        """
        cfg = self.config
        if rows is None:
            rows = torch.arange(encoder_states.shape[0], device=encoder_states.device)
        layers = self.decoder.layers
        device = encoder_states.device
        dtype = dtype or encoder_states.dtype
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
        # Zeros, not empty: a step that attends over every slot masking the later ones (the CUDA-graph
        # step of models/kernels) would still let a masked NaN of uninitialised memory poison the sum.
        return DecoderCache(
            self_k=torch.zeros(shape, dtype=dtype, device=device),
            self_v=torch.zeros(shape, dtype=dtype, device=device),
            cross_k=torch.stack(cks),
            cross_v=torch.stack(cvs),
            cross_mask=mask,
        )

    @torch.no_grad()
    def decode_step(self, tokens: Tensor, cache: DecoderCache, last_only: bool = False) -> Tensor:
        """Feed tokens [B, n] at positions cache.length.. and return logits [B, n, V] ([B, 1, V] of
        the last position with `last_only`: a prefill's output head then runs once, not n times);
        advances the cache."""
        start, n = cache.length, tokens.shape[1]
        if start + n > self.config.image_length:
            raise InputError(
                f"cannot decode past image_length {self.config.image_length} (at {start}, +{n} tokens)"
            )
        dec = self.decoder
        x = dec.embed(tokens, start)
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
