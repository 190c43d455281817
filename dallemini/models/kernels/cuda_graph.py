"""DalleBart's one-token decoding step as a CUDA graph: captured once per sampling run, replayed for
every later step.

A decoding step of a few rows is hundreds of small kernels whose launches, not the GPU, bound it; a
replay launches them all at once. A graph needs shapes that do not depend on the position, so the
step here (`static_step`) attends over every cache slot with the later ones masked and takes the
position as a tensor; its logits match DalleBart.decode_step's.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from ..bart import DalleBart, DecoderCache, DecoderLayer

log = logging.getLogger(__name__)


def _layer_step(
    layer: DecoderLayer,
    x: Tensor,
    cache: DecoderCache,
    i: int,
    pos: Tensor,
    self_mask: Tensor,
) -> Tensor:
    """DecoderLayer i for one token per row at position tensor `pos` ([1]): its K/V go into the cache
    there, and the query attends over every cache slot with `self_mask` hiding the later ones."""
    self_k, self_v = cache.self_k[i], cache.self_v[i]
    h = layer.pre_self_attn_layer_norm(x)
    q, k, v = layer.self_attn.project_qkv(h)
    self_k.index_copy_(2, pos, k.to(self_k.dtype))
    self_v.index_copy_(2, pos, v.to(self_v.dtype))
    h = layer.self_attn.attend_q(q, self_k, self_v, self_mask, dtype=x.dtype)
    x = x + layer.dropout(layer.self_attn_layer_norm(h))
    return layer.cross_and_glu(x, cache.cross_k[i], cache.cross_v[i], cache.cross_mask)


@torch.no_grad()
def static_step(model: DalleBart, tokens: Tensor, cache: DecoderCache, pos: Tensor) -> Tensor:
    """decode_step's logits for one token per row ([B, 1]) at position tensor `pos` ([1], on the
    cache's device), in shapes that do not depend on the position. No host synchronisation and no
    Python-int position, so a CUDA graph can capture it once and replay it for every step. Leaves
    cache.length to the caller."""
    dec = model.decoder
    x = dec.embed_tokens(tokens) * dec.embed_scale + dec.embed_positions(pos)
    x = dec.layernorm_embedding(x)
    slots = torch.arange(model.config.image_length, device=pos.device)
    mask = torch.zeros(slots.shape, dtype=cache.self_k.dtype, device=pos.device)
    mask = mask.masked_fill(slots > pos, float("-inf"))[None, None, None, :]
    for i, layer in enumerate(dec.layers):
        x = _layer_step(layer, x, cache, i, pos, mask)
    return dec.lm_head(dec.final_ln(x))


class GraphedStep:
    """static_step captured once as a CUDA graph and replayed for every later one-token step. CUDA
    only; `pos` is the next position to decode (its cache slot is rewritten by the real step, so the
    warm-up may use it). Leaves cache.length to the caller."""

    def __init__(self, model: DalleBart, cache: DecoderCache, rows: int, pos: int) -> None:
        device = cache.self_k.device
        self.tokens = torch.full((rows, 1), model.config.decoder_start_token_id, device=device)
        self.pos = torch.full((1,), pos, dtype=torch.long, device=device)
        with torch.cuda.device(device):  # capture on the model's GPU, whichever is current
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # kernels choose their algorithms before capture
                for _ in range(2):
                    static_step(model, self.tokens, cache, self.pos)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (a server's) may use the GPU while this one captures
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.logits = static_step(model, self.tokens, cache, self.pos)

    def __call__(self, tokens: Tensor, pos: int) -> Tensor:
        """Logits [rows, 1, V] for `tokens` [rows, 1] at `pos` (a buffer the next call overwrites)."""
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits


def graphed_step(model: DalleBart, cache: DecoderCache, rows: int, pos: int) -> GraphedStep | None:
    """A GraphedStep where it applies (CUDA inference; DALLEMINI_CUDA_GRAPHS=0 turns it off), else None;
    a capture that fails logs why and leaves decoding to decode_step."""
    if (
        cache.self_k.device.type != "cuda"
        or model.training
        or os.environ.get("DALLEMINI_CUDA_GRAPHS", "1") == "0"
    ):
        return None
    try:
        return GraphedStep(model, cache, rows, pos)
    except RuntimeError as e:  # e.g. an op that cannot be captured on this build
        log.warning("CUDA graph capture failed, decoding step by step: %s", e)
        return None
