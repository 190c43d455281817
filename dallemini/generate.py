"""Sampling image tokens from DalleBart: super-conditioning, temperature, top-k, top-p, per-image seeds, streaming.

Order of operations is the original's: mix raw logits (uncond + s·(cond − uncond)), restrict to the VQGAN
codebook, then temperature → top-k → top-p, then draw. Every image row has its own seed, and all its
random numbers are drawn up front, so an image depends only on (prompt, seed, settings), not on what
else shares the batch — which is what lets a server batch requests without changing their results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import threads
from .config import BartConfig, SamplingConfig
from .errors import InputError
from .models import kernels
from .models.bart import DalleBart


@dataclass
class TokenBatch:
    """Tokens sampled so far for every image row: [B, steps], plus how many of image_length are done."""

    tokens: Tensor
    done: int
    total: int

    @property
    def finished(self) -> bool:
        return self.done == self.total


def filter_logits(logits: Tensor, settings: SamplingConfig) -> tuple[Tensor, Tensor | None]:
    """Apply temperature, top-k and top-p; returns (log-weights, their token ids or None for all ids)."""
    logits = logits.float() / settings.temperature
    idx = None
    if 0 < settings.top_k < logits.shape[-1]:
        logits, idx = torch.topk(logits, settings.top_k, dim=-1)  # sorted, without a full sort
    if settings.top_p < 1.0:
        if idx is None:
            logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each candidate
        logits = logits.masked_fill(
            before >= settings.top_p, float("-inf")
        )  # the first always stays
    return logits, idx


def draw(logits: Tensor, idx: Tensor | None, uniforms: Tensor) -> Tensor:
    """Inverse-CDF sampling with one given uniform per row, so each row's draw is reproducible alone."""
    probs = torch.softmax(logits, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    u = (uniforms * cdf[:, -1]).unsqueeze(-1).to(cdf.dtype)
    choice = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1)
    # Never pick a zero-probability entry (possible only through rounding at the CDF's flat tail).
    choice = torch.where(probs.gather(-1, choice) > 0, choice, probs.argmax(-1, keepdim=True))
    if idx is not None:
        choice = idx.gather(-1, choice)
    return choice.squeeze(-1)


def row_uniforms(seeds: Sequence[int], steps: int, device: torch.device) -> Tensor:
    """[B, steps] uniforms in [0, 1), row r drawn from a CPU generator seeded with seeds[r]."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        rows.append(torch.rand(steps, generator=g, dtype=torch.float64))
    return torch.stack(rows).to(device)


def trim_padding(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the text columns that are padding in every row.

    Masked keys get zero attention weight and nothing else mixes positions, so the real positions'
    encoder states and every cross-attention output stay the same; the encoder and each decoding step
    just skip the padding (a 12-token prompt in a 64-token window: ~5x less encoder work).
    """
    used = mask.bool().any(0).nonzero()
    keep = int(used.max()) + 1 if used.numel() else mask.shape[1]
    return ids[:, :keep], mask[:, :keep]


def _check_rows(
    cfg: BartConfig, b: int, prompt_index: Tensor, num_codes: int, prefix: Tensor | None
) -> None:
    """InputError unless the rows, the codebook size and the forced prefix fit the model."""
    if prompt_index.shape != (b,):
        raise InputError(f"{b} seeds given for {prompt_index.shape[0]} image rows")
    if not 0 < num_codes <= cfg.image_vocab_size:
        raise InputError(
            f"num_codes {num_codes} does not fit the decoder vocabulary {cfg.image_vocab_size}"
        )
    if prefix is not None:
        if prefix.shape[0] != b or prefix.shape[1] > cfg.image_length:
            raise InputError(
                f"prefix must be [{b}, <= {cfg.image_length}], got {tuple(prefix.shape)}"
            )
        if prefix.numel() and (prefix.min() < 0 or prefix.max() >= num_codes):
            raise InputError(f"prefix codes must lie in [0, {num_codes})")


def _with_unconditional(
    input_ids: Tensor,
    attention_mask: Tensor,
    uncond_ids: Tensor,
    uncond_mask: Tensor,
    prompt_index: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Encoder inputs with the empty caption appended, and the encoder row of every decoder row:
    the B conditional rows, then B unconditional ones (super-conditioning)."""
    device = input_ids.device
    ids = torch.cat([input_ids, uncond_ids[:1].to(device)])
    mask = torch.cat([attention_mask, uncond_mask[:1].to(device)])
    if ids.shape[1] != uncond_ids.shape[1]:
        raise InputError("prompt and unconditional encodings must have the same length")
    empty = torch.full_like(prompt_index, input_ids.shape[0])
    return ids, mask, torch.cat([prompt_index, empty])


def iter_image_tokens(
    model: DalleBart,
    input_ids: Tensor,
    attention_mask: Tensor,
    uncond_ids: Tensor,
    uncond_mask: Tensor,
    seeds: Sequence[int],
    settings: SamplingConfig,
    num_codes: int,
    prompt_index: Tensor | None = None,
    prefix: Tensor | None = None,
    stream_every: int = 0,
) -> Iterator[TokenBatch]:
    """Sample image_length tokens for each row; yields partial batches every `stream_every` steps, then the final one.

    input_ids/attention_mask hold one row per distinct prompt; `prompt_index[r]` names the prompt of image
    row r (default: row r uses prompt r). uncond_ids is the empty caption's encoding (one row). `prefix`
    [B, m] forces the first m tokens of every row (image completion). `num_codes` is the VQGAN codebook
    size: decoder logits past it (BOS, padding rows of mega) are never sampled.

    One-token steps run through kernels.fast_step where one applies (a CUDA graph; native CPU layers
    once kernels.accelerate has bound the CPU paths to the model, as TextToImage does).
    """
    cfg = model.config
    device = input_ids.device
    b, total = len(seeds), cfg.image_length
    if prompt_index is None:
        prompt_index = torch.arange(input_ids.shape[0], device=device)
    prompt_index = prompt_index.to(device)
    _check_rows(cfg, b, prompt_index, num_codes, prefix)
    m = 0 if prefix is None else prefix.shape[1]
    guided = settings.condition_scale != 1.0
    if guided:
        ids, mask, rows = _with_unconditional(
            input_ids, attention_mask, uncond_ids, uncond_mask, prompt_index
        )
    else:
        ids, mask, rows = input_ids, attention_mask, prompt_index
    ids, mask = trim_padding(ids, mask)
    enc = model.encode(ids, mask)
    cache = model.init_cache(enc, mask, rows=rows, dtype=kernels.cache_dtype(enc.dtype, enc.device))
    uniforms = row_uniforms(seeds, total, device)
    out = torch.empty((b, total), dtype=torch.long, device=device)
    bos = torch.full((b, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
    feed = bos if prefix is None else torch.cat([bos, prefix.to(device)], dim=1)
    if m:
        out[:, :m] = prefix
    fast: Callable[[Tensor, int], Tensor] | bool | None = None  # False: tried, none applies
    tuner = threads.tuner("decode") if device.type == "cpu" else threads.FIXED
    for step in range(m, total):
        x = feed.repeat(2, 1) if guided else feed
        if fast is None and x.shape[1] == 1:
            fast = kernels.fast_step(model, cache, x.shape[0], step) or False
        with tuner.step():
            if fast and x.shape[1] == 1:
                out_logits = fast(x, step)
                cache.length = step + 1
            else:
                out_logits = model.decode_step(x, cache, last_only=True)
        logits = out_logits[:, -1, :num_codes].float()  # mix in float32
        if guided:
            cond, uncond = logits[:b], logits[b:]
            logits = uncond + settings.condition_scale * (cond - uncond)
        lw, idx = filter_logits(logits, settings)
        token = draw(lw, idx, uniforms[:, step])
        out[:, step] = token
        feed = token[:, None]
        done = step + 1
        if done == total or (stream_every and done % stream_every == 0):
            yield TokenBatch(tokens=out[:, :done].clone(), done=done, total=total)
    if m == total:
        yield TokenBatch(tokens=out.clone(), done=total, total=total)


def sample_image_tokens(*args, **kwargs) -> Tensor:
    """Run iter_image_tokens to the end and return the final tokens [B, image_length]."""
    kwargs["stream_every"] = 0
    *_, last = iter_image_tokens(*args, **kwargs)
    assert last.finished
    return last.tokens
