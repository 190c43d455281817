"""Image–text scoring for reranking: the `ImageTextScorer` protocol, a built-in small CLIP, and real CLIP.

`SmallClip` is our own CLIP-style model (causal text transformer + small ViT) sized by `ClipConfig`,
trained by `dallemini train-clip` and stored as `clip.safetensors` in a model directory;
`BuiltinClipScorer` wraps it with our `TextEncoder`. `HFClipScorer` runs an OpenAI/LAION CLIP from a
local Hugging Face folder through `transformers` (optional extra `[clip]`), never touching the network.
Every scorer returns CLIP logits (logit_scale · cosine) shaped [texts, images]: higher is a better match.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..config import ClipConfig
from ..devices import resolve_device, resolve_dtype
from ..errors import CheckpointError, ConfigError, InputError
from ..text import TextEncoder

__all__ = [
    "BuiltinClipScorer",
    "HFClipScorer",
    "ImageTextScorer",
    "SmallClip",
    "contrastive_loss",
    "is_hf_clip_folder",
]

# OpenAI CLIP's per-channel pixel statistics; the built-in model normalises with them too.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = 100.0


@runtime_checkable
class ImageTextScorer(Protocol):
    """Anything that scores images against texts: [len(texts), len(images)] CLIP logits, higher = better."""

    @property
    def device(self) -> torch.device:
        """Where the scorer's model runs."""
        ...

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> ImageTextScorer:
        """Move the model (in place) and return the scorer."""
        ...

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> Tensor:
        """Float32 CPU tensor [len(texts), len(images)] of logit_scale · cosine similarity."""
        ...


# --------------------------------------------------------------------------------------------
# The built-in small CLIP
# --------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention, optionally causal."""

    def __init__(self, width: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, n, w))


class _Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float, causal: bool) -> None:
        super().__init__()
        hidden = max(1, round(width * mlp_ratio))
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = _Attention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _TextTower(nn.Module):
    """Token + learned position embeddings, causal pre-LN blocks, final LN."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        w = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.position_embedding = nn.Parameter(torch.empty(cfg.max_text_length, w))
        self.blocks = nn.ModuleList(
            _Block(w, cfg.text_heads, cfg.mlp_ratio, cfg.layer_norm_eps, causal=True)
            for _ in range(cfg.text_layers)
        )
        self.ln_final = nn.LayerNorm(w, eps=cfg.layer_norm_eps)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x)


class _VisionTower(nn.Module):
    """ViT: patch convolution, class token, learned positions, pre-LN blocks, LN on the class token."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        w = cfg.vision_width
        self.patch_embedding = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.position_embedding = nn.Parameter(torch.empty(cfg.num_patches + 1, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(
            _Block(w, cfg.vision_heads, cfg.mlp_ratio, cfg.layer_norm_eps, causal=False)
            for _ in range(cfg.vision_layers)
        )
        self.ln_post = nn.LayerNorm(w, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [B, patches, w]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x[:, 0])


class SmallClip(nn.Module):
    """A small CLIP: causal text transformer pooled at the last real token + ViT, both projected to embed_dim."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.config = config
        self.text = _TextTower(config)
        self.vision = _VisionTower(config)
        self.text_projection = nn.Linear(config.text_width, config.embed_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision_width, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        # Fixed input statistics: not weights, so not part of the state dict.
        self.register_buffer(
            "pixel_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CLIP-style initialisation: small normal embeddings, width-scaled projections, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.text.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text.position_embedding, std=0.01)
        w = self.config.vision_width
        nn.init.normal_(
            self.vision.patch_embedding.weight, std=(3 * self.config.patch_size**2) ** -0.5
        )
        nn.init.normal_(self.vision.class_embedding, std=w**-0.5)
        nn.init.normal_(self.vision.position_embedding, std=w**-0.5)
        self.logit_scale.fill_(LOGIT_SCALE_INIT)

    def encode_text(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Token ids [T, L] (right-padded) -> embeddings [T, embed_dim], not normalised."""
        if ids.dim() != 2:
            raise InputError(f"ids must be [batch, length], got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.config.max_text_length:
            raise InputError(
                f"text of {ids.shape[1]} tokens is longer than the CLIP's max_text_length "
                f"({self.config.max_text_length})"
            )
        if mask is None:
            mask = ids != self.config.pad_token_id
        hidden = self.text(ids)
        # The last real token (BART's </s>): causal attention keeps it blind to any padding after it.
        positions = torch.arange(ids.shape[1], device=ids.device)
        last = (mask.to(torch.long) * positions).argmax(dim=1)
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), last]
        return self.text_projection(pooled)

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Pixels [I, 3, image_size, image_size] in [0, 1] -> embeddings [I, embed_dim], not normalised."""
        size = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise InputError(
                f"pixels must be [batch, 3, {size}, {size}] in [0, 1], got shape {tuple(pixels.shape)}"
            )
        x = (pixels.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        x = x.to(self.vision.patch_embedding.weight.dtype)
        return self.visual_projection(self.vision(x))

    def logits(self, text_embeds: Tensor, image_embeds: Tensor) -> Tensor:
        """Embeddings -> [T, I] logits: clamped exp(logit_scale) times cosine similarity."""
        t = F.normalize(text_embeds, dim=-1)
        i = F.normalize(image_embeds, dim=-1)
        return self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX) * t @ i.t()

    def forward(self, ids: Tensor, mask: Tensor | None, pixels: Tensor) -> Tensor:
        """logits_per_text [T, I] for T captions and I images."""
        return self.logits(self.encode_text(ids, mask), self.encode_image(pixels))


def contrastive_loss(logits_per_text: Tensor, positives: Tensor | None = None) -> Tensor:
    """CLIP's symmetric cross-entropy: text i should pick image i and image i text i.

    `positives` [N, N] (bool) marks every (text, image) pair that matches, for batches where a caption
    or an image occurs twice; each row's (and column's) target is then spread evenly over its
    positives. Its diagonal must be set. None means only the diagonal, CLIP's plain loss.
    """
    if logits_per_text.dim() != 2 or logits_per_text.shape[0] != logits_per_text.shape[1]:
        raise InputError(
            f"contrastive_loss needs square [N, N] logits of matching pairs, got {tuple(logits_per_text.shape)}"
        )
    logits = logits_per_text.float()
    if positives is None:
        labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    if positives.shape != logits.shape or not bool(positives.diagonal().all()):
        raise InputError(
            f"positives must be a [N, N] mask with its diagonal set, like the logits {tuple(logits.shape)}"
        )
    target = positives.to(logits.dtype)
    per_text = target / target.sum(dim=1, keepdim=True)
    per_image = target.t() / target.t().sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, per_text) + F.cross_entropy(logits.t(), per_image)) / 2


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------


def _check_inputs(images: Sequence[Image.Image], texts: Sequence[str]) -> tuple[list, list[str]]:
    if isinstance(texts, str):
        texts = [texts]
    images, texts = list(images), list(texts)
    if not images:
        raise InputError("no images to score")
    if not texts:
        raise InputError("no texts to score the images against")
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise InputError(f"image {i} must be a PIL image, got {type(im).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"text {i} must be a str, got {type(t).__name__}")
    return images, texts


def _square_pixels(image: Image.Image, size: int) -> Tensor:
    """PIL -> [3, size, size] float in [0, 1]: centre-cropped to a square, resized bilinearly with antialiasing."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)
    h, w = x.shape[1:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, top : top + side, left : left + side]
    if side != size:
        x = F.interpolate(
            x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )[0].clamp_(0, 1)
    return x


class BuiltinClipScorer:
    """`ImageTextScorer` over a `SmallClip` and our `TextEncoder` (normalizer + BPE)."""

    def __init__(self, model: SmallClip, text: TextEncoder, batch_size: int = 64) -> None:
        if text.vocab_size > model.config.vocab_size:
            raise ConfigError(
                f"tokenizer has {text.vocab_size} tokens but the CLIP's vocabulary is "
                f"{model.config.vocab_size}; use the tokenizer the CLIP was trained with"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.text = text
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.model.text_projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating-point dtype."""
        return self.model.text_projection.weight.dtype

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> BuiltinClipScorer:
        """Move the model in place and return self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def _ids(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Encode, drop all-padding columns, and fit rows longer than the CLIP's context (keeping </s>)."""
        ids, mask = self.text(texts)
        lengths = mask.sum(dim=1)
        limit = self.model.config.max_text_length
        ids, mask = ids[:, : int(lengths.max())], mask[:, : int(lengths.max())]
        if ids.shape[1] > limit:
            rows = torch.nonzero(lengths > limit).flatten()
            ids[rows, limit - 1] = ids[rows, lengths[rows] - 1]
            ids, mask = ids[:, :limit], mask[:, :limit]
        return ids, mask

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> Tensor:
        """Float32 CPU tensor [len(texts), len(images)] of CLIP logits."""
        images, texts = _check_inputs(images, texts)
        was_training = self.model.training
        self.model.eval()
        try:
            ids, mask = self._ids(texts)
            text_embeds = self.model.encode_text(ids.to(self.device), mask.to(self.device))
            size = self.model.config.image_size
            chunks = []
            for start in range(0, len(images), self.batch_size):
                batch = images[start : start + self.batch_size]
                pixels = torch.stack([_square_pixels(im, size) for im in batch]).to(self.device)
                chunks.append(self.model.encode_image(pixels))
            logits = self.model.logits(text_embeds, torch.cat(chunks))
        finally:
            self.model.train(was_training)
        return logits.float().cpu()


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(
            "scoring with a Hugging Face CLIP needs the `transformers` package: "
            "pip install 'dallemini[clip]'"
        ) from e
    return transformers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def is_hf_clip_folder(path: str | os.PathLike[str]) -> bool:
    """True when path is a folder whose config.json says `"model_type": "clip"`."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return _read_json(p).get("model_type") == "clip"
    except CheckpointError:
        return False


class HFClipScorer:
    """`ImageTextScorer` over a real CLIP (OpenAI/LAION) loaded from a local Hugging Face folder."""

    def __init__(
        self, model: Any, tokenizer: Any, image_processor: Any, batch_size: int = 32
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.batch_size = batch_size

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
    ) -> HFClipScorer:
        """Load `config.json` + weights + tokenizer + preprocessor config from a local folder, offline."""
        p = Path(path)
        if not p.exists():
            raise CheckpointError(f"CLIP folder {p} does not exist")
        if not p.is_dir():
            raise CheckpointError(f"{p} is a file; give the Hugging Face CLIP folder that holds it")
        config_file = p / "config.json"
        if not config_file.is_file():
            raise CheckpointError(
                f"{p} is not a Hugging Face CLIP folder: it has no config.json "
                f"(expected config.json, model.safetensors, tokenizer and preprocessor files)"
            )
        model_type = _read_json(config_file).get("model_type")
        if model_type != "clip":
            raise CheckpointError(
                f"{config_file} describes a {model_type!r} model, not a CLIP "
                f'(expected "model_type": "clip" as in openai/clip-vit-base-patch32)'
            )
        if (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file():
            use_safetensors = True
        elif (p / "pytorch_model.bin").is_file() or (p / "pytorch_model.bin.index.json").is_file():
            use_safetensors = False
        else:
            raise CheckpointError(
                f"{p} has no CLIP weights: expected model.safetensors (or pytorch_model.bin)"
            )
        has_vocab = (p / "vocab.json").is_file() and (p / "merges.txt").is_file()
        if not (p / "tokenizer.json").is_file() and not has_vocab:
            raise CheckpointError(
                f"{p} has no CLIP tokenizer: expected tokenizer.json, or vocab.json and merges.txt"
            )
        if (
            not (p / "preprocessor_config.json").is_file()
            and not (p / "processor_config.json").is_file()
        ):
            raise CheckpointError(
                f"{p} has no image preprocessor config: expected preprocessor_config.json"
            )

        tf = _import_transformers()
        kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": use_safetensors}
        if "weights_only" in inspect.signature(tf.CLIPModel.from_pretrained).parameters:
            kwargs["weights_only"] = True  # .bin files are only ever unpickled as plain tensors
        try:
            model = tf.CLIPModel.from_pretrained(str(p), **kwargs)
            tokenizer = tf.CLIPTokenizerFast.from_pretrained(str(p), local_files_only=True)
            image_processor = tf.AutoImageProcessor.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # transformers/safetensors raise many types for a bad folder
            raise CheckpointError(f"cannot load the CLIP in {p}: {e}") from e
        scorer = cls(model, tokenizer, image_processor, batch_size=batch_size)
        return scorer.to(resolve_device(device), resolve_dtype(dtype))

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating-point dtype."""
        return self.model.logit_scale.dtype

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> HFClipScorer:
        """Move the model in place and return self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def _max_text_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> Tensor:
        """Float32 CPU tensor [len(texts), len(images)]: the model's logits_per_text."""
        images, texts = _check_inputs(images, texts)
        m = self.model
        tok = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self._max_text_length(),
            return_tensors="pt",
        )
        text_out = m.text_model(
            input_ids=tok["input_ids"].to(self.device),
            attention_mask=tok["attention_mask"].to(self.device),
        )
        text_embeds = m.text_projection(text_out.pooler_output)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            vision_out = m.vision_model(pixel_values=pixels.to(self.device, self.dtype))
            chunks.append(m.visual_projection(vision_out.pooler_output))
        t = F.normalize(text_embeds.float(), dim=-1)
        i = F.normalize(torch.cat(chunks).float(), dim=-1)
        return (m.logit_scale.float().exp() * t @ i.t()).cpu()
