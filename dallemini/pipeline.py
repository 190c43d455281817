"""TextToImage: prompts -> PIL images, from any supported model directory, on any device and dtype."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .config import PipelineConfig, SamplingConfig
from .errors import CheckpointError, ConfigError, InputError
from .generate import iter_image_tokens
from .models.bart import DalleBart
from .models.vqgan import VQGAN

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None picks cuda > mps > cpu; anything else must name an available device."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Accept 'float32' / 'bfloat16' / 'float16' or a torch dtype; default float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} not supported; use one of {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def to_pil(images: Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> RGB PIL images."""
    arr = (
        (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in arr]


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equally sized images into one picture, row-major, `cols` per row (default: near-square)."""
    if not images:
        raise InputError("no images to put in a grid")
    n = len(images)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = (n + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


@dataclass
class GeneratedImage:
    """One generated image with what made it: prompt, seed, CLIP score (None without a reranker), tokens."""

    image: Image.Image
    prompt: str
    seed: int
    score: float | None
    tokens: list[int]


@dataclass
class StreamFrame:
    """Partial images while tokens arrive: rows not sampled yet are grey."""

    images: list[Image.Image]
    done: int
    total: int


class TextToImage:
    """The DALL·E Mini pipeline: normalize + tokenize -> DalleBart sampling -> VQGAN decoding."""

    def __init__(
        self,
        bart: DalleBart,
        vqgan: VQGAN,
        text,  # dallemini.text.TextEncoder
        config: PipelineConfig,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        if config.bart is None or config.vqgan is None:
            raise ConfigError("a pipeline needs both a DalleBart and a VQGAN")
        if config.vqgan.grid_size**2 != config.bart.image_length:
            raise ConfigError(
                f"VQGAN grid {config.vqgan.grid_size}x{config.vqgan.grid_size} does not match DalleBart "
                f"image_length {config.bart.image_length}"
            )
        if config.vqgan.n_embed > config.bart.image_vocab_size:
            raise ConfigError(
                f"VQGAN codebook ({config.vqgan.n_embed}) is larger than the DalleBart image vocabulary "
                f"({config.bart.image_vocab_size})"
            )
        self.bart = bart.eval()
        self.vqgan = vqgan.eval()
        self.text = text
        self.config = config
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        vqgan: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
    ) -> TextToImage:
        """Load a model directory (or any foreign format `dallemini convert` accepts) onto a device."""
        from tokenizers import Tokenizer

        from .checkpoints import load_parts
        from .checkpoints.native import load_into
        from .text import TextEncoder

        dev, dt = resolve_device(device), resolve_dtype(dtype)
        parts = load_parts(Path(path), vqgan=vqgan, tokenizer=tokenizer)
        cfg = parts.config
        if cfg.bart is None:
            raise CheckpointError(f"{path} holds no DalleBart model; give a full model directory")
        if cfg.vqgan is None:
            raise CheckpointError(f"{path} holds no VQGAN; pass one with vqgan=PATH (--vqgan)")
        if parts.tokenizer_json is None:
            raise CheckpointError(
                f"{path} has no tokenizer (tokenizer.json or vocab.json + merges.txt)"
            )
        bart = load_into(DalleBart(cfg.bart), parts.states["bart"], f"{parts.source} (bart)")
        vq = load_into(VQGAN(cfg.vqgan), parts.states["vqgan"], f"{parts.source} (vqgan)")
        text = TextEncoder(Tokenizer.from_str(parts.tokenizer_json), cfg.text)
        if text.vocab_size > cfg.bart.encoder_vocab_size:
            raise CheckpointError(
                f"tokenizer has {text.vocab_size} tokens but the model's text vocabulary is "
                f"{cfg.bart.encoder_vocab_size}; they do not belong together"
            )
        # The VQGAN decoder runs in float32 unless asked otherwise: it is cheap and colours stay exact.
        return cls(bart.to(dev, dt), vq.to(dev), text, cfg, dev, dt)

    def sampling(self, **overrides: float | int | None) -> SamplingConfig:
        """The model's default settings with the given non-None overrides (validated)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self.config.sampling, **given)

    def _prepare(
        self, prompt: str | Sequence[str], num_images: int, seed: int | None
    ) -> tuple[list[str], Tensor, Tensor, Tensor, list[int]]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("no prompt given")
        if not 1 <= num_images <= 1024:
            raise InputError(f"num_images must be between 1 and 1024, got {num_images}")
        ids, mask = self.text(prompts)
        if seed is None:
            seed = secrets.randbelow(2**31)
        if not 0 <= seed < 2**63 - 2**20:
            raise InputError(f"seed must be a non-negative 63-bit integer, got {seed}")
        seeds = [seed + i for i in range(len(prompts) * num_images)]
        index = torch.arange(len(prompts)).repeat_interleave(num_images)
        return prompts, ids.to(self.device), mask.to(self.device), index.to(self.device), seeds

    def _token_stream(
        self,
        prompt: str | Sequence[str],
        num_images: int,
        seed: int | None,
        settings: SamplingConfig,
        stream_every: int,
        prefix: Tensor | None = None,
    ) -> tuple[list[str], Tensor, list[int], Iterator]:
        prompts, ids, mask, index, seeds = self._prepare(prompt, num_images, seed)
        u_ids, u_mask = self.text.unconditional(1)
        stream = iter_image_tokens(
            self.bart,
            ids,
            mask,
            u_ids.to(self.device),
            u_mask.to(self.device),
            seeds,
            settings,
            num_codes=self.config.vqgan.n_embed,
            prompt_index=index,
            prefix=prefix,
            stream_every=stream_every,
        )
        return prompts, index, seeds, stream

    @torch.inference_mode()
    def decode(self, tokens: Tensor) -> list[Image.Image]:
        """Image tokens [B, image_length] -> PIL images through the VQGAN decoder."""
        g = self.config.vqgan.grid_size
        images = self.vqgan.decode(tokens.to(self.device).view(-1, g, g))
        return to_pil(images)

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_images: int = 1,
        seed: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        condition_scale: float | None = None,
    ) -> list[GeneratedImage] | list[list[GeneratedImage]]:
        """Generate num_images per prompt; one prompt gives a list, several give a list per prompt."""
        settings = self.sampling(
            temperature=temperature, top_k=top_k, top_p=top_p, condition_scale=condition_scale
        )
        prompts, index, seeds, stream = self._token_stream(prompt, num_images, seed, settings, 0)
        tokens = None
        for batch in stream:
            tokens = batch.tokens
        assert tokens is not None
        images = self.decode(tokens)
        out: list[list[GeneratedImage]] = [[] for _ in prompts]
        for r, im in enumerate(images):
            p = int(index[r])
            out[p].append(GeneratedImage(im, prompts[p], seeds[r], None, tokens[r].tolist()))
        return out[0] if isinstance(prompt, str) else out

    @torch.inference_mode()
    def stream(
        self,
        prompt: str,
        num_images: int = 1,
        seed: int | None = None,
        every: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        condition_scale: float | None = None,
    ) -> Iterator[StreamFrame]:
        """Yield partial images every `every` tokens (default: one token row), the last frame complete."""
        if not isinstance(prompt, str):
            raise InputError("stream() takes one prompt")
        g = self.config.vqgan.grid_size
        every = every or g
        if every < 1:
            raise InputError(f"every must be >= 1, got {every}")
        settings = self.sampling(
            temperature=temperature, top_k=top_k, top_p=top_p, condition_scale=condition_scale
        )
        _, _, _, stream = self._token_stream(prompt, num_images, seed, settings, every)
        total = self.config.bart.image_length
        for batch in stream:
            full = torch.zeros((batch.tokens.shape[0], total), dtype=torch.long, device=self.device)
            full[:, : batch.done] = batch.tokens
            images = self.vqgan.decode(full.view(-1, g, g))
            if not batch.finished:
                rows = -(-batch.done // g)  # token rows begun
                cut = rows * self.config.vqgan.downsample_factor
                images[:, :, cut:] = 0.5
            yield StreamFrame(to_pil(images), batch.done, total)


def load_vqgan(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> VQGAN:
    """The VQGAN of a model directory or of any VQGAN checkpoint (Flax folder, taming .ckpt, min-dalle)."""
    from .checkpoints import load_parts
    from .checkpoints.native import load_into

    parts = load_parts(Path(path))
    if parts.config.vqgan is None:
        raise CheckpointError(f"{path} holds no VQGAN")
    vq = load_into(VQGAN(parts.config.vqgan), parts.states["vqgan"], f"{parts.source} (vqgan)")
    return vq.to(resolve_device(device), resolve_dtype(dtype)).eval()


def load_pipeline(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **kwargs,
) -> TextToImage:
    """Shorthand for TextToImage.from_pretrained."""
    return TextToImage.from_pretrained(path, device=device, dtype=dtype, **kwargs)
