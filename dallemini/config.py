"""Configuration dataclasses for every model part, their presets, and (de)serialisation to JSON dicts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build a dataclass from a dict, naming unknown keys instead of silently dropping them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(names)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{where}: {e}") from e
    return obj


def _to_dict(obj: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


@dataclass(frozen=True)
class BartConfig:
    """DalleBart: BART encoder over caption tokens, BART decoder over image tokens (NormFormer + GLU)."""

    encoder_vocab_size: int = 50264
    # Decoder rows = image_vocab_size + 1; the extra row is BOS (decoder_start_token_id).
    image_vocab_size: int = 16384
    max_text_length: int = 64
    image_length: int = 256
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    attention_heads: int = 16
    ffn_dim: int = 2730
    decoder_start_token_id: int = 16384
    # Layer norms placed before a linear layer carry a scale only when this is set (original default: off).
    force_ln_scale: bool = False
    scale_embedding: bool = False
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "encoder_vocab_size",
            "image_vocab_size",
            "max_text_length",
            "image_length",
            "d_model",
            "encoder_layers",
            "decoder_layers",
            "attention_heads",
            "ffn_dim",
        ):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"bart.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.attention_heads:
            raise ConfigError(
                f"bart.d_model ({self.d_model}) must be divisible by attention_heads ({self.attention_heads})"
            )
        if not 0 <= self.decoder_start_token_id <= self.image_vocab_size:
            raise ConfigError(
                f"bart.decoder_start_token_id ({self.decoder_start_token_id}) must index a decoder "
                f"embedding row (0..{self.image_vocab_size})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"bart.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention_heads

    @property
    def decoder_vocab_size(self) -> int:
        return self.image_vocab_size + 1

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BartConfig:
        return _from_dict(cls, data, "bart config")


@dataclass(frozen=True)
class VQGANConfig:
    """VQGAN with the taming-transformers layout (defaults: vqgan_imagenet_f16_16384)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 16384
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    num_groups: int = 32
    # The pixel range the network itself was trained on; encode()/decode() always speak [0, 1].
    # dalle-mini's Flax VQGAN uses [0, 1], taming-transformers checkpoints use [-1, 1].
    pixel_range: str = "0,1"
    # True for checkpoints that only carry the decoder half (min-dalle's detoker.pt).
    decoder_only: bool = False
    # Taming's layout has an attention block in the middle of the encoder and the decoder, which
    # gives every latent a view of the whole image; False drops both (cheaper, more local codes).
    mid_attn: bool = True
    # True: the encoder sees each f x f pixel cell alone (per-pixel norms, no attention), so a
    # token depends on its own patch only: the same patch gets the same code at any position and
    # in any scene, which makes token sequences compositional (used by the emoji default model).
    local_encoder: bool = False
    # True: latents and codebook entries are matched as unit vectors (cosine), which keeps most
    # of a large codebook in use when training from scratch.
    l2_codes: bool = False

    def __post_init__(self) -> None:
        if self.pixel_range not in ("0,1", "-1,1"):
            raise ConfigError(
                f"vqgan.pixel_range must be '0,1' or '-1,1', got {self.pixel_range!r}"
            )
        if not self.ch_mult:
            raise ConfigError("vqgan.ch_mult must not be empty")
        for name in ("ch", "num_res_blocks", "z_channels", "embed_dim", "n_embed", "resolution"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"vqgan.{name} must be positive, got {getattr(self, name)}")
        if self.resolution % self.downsample_factor:
            raise ConfigError(
                f"vqgan.resolution ({self.resolution}) must be divisible by the downsampling factor "
                f"{self.downsample_factor} (2 ** (len(ch_mult) - 1))"
            )
        for c in {self.ch * m for m in self.ch_mult} | {self.ch}:
            if c % self.num_groups:
                raise ConfigError(
                    f"vqgan channel count {c} is not divisible by num_groups={self.num_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Side of the token grid for an image of `resolution` pixels."""
        return self.resolution // self.downsample_factor

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQGANConfig:
        return _from_dict(cls, data, "vqgan config")

    def fingerprint(self) -> str:
        """Short hash of the architecture, recorded next to encoded datasets."""
        arch = self.to_dict()
        # Fields added later are left out at their defaults, which keeps older fingerprints valid.
        if arch.get("mid_attn", True):
            arch.pop("mid_attn", None)
        for name in ("local_encoder", "l2_codes"):
            if not arch.get(name, False):
                arch.pop(name, None)
        blob = json.dumps(arch, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class ClipConfig:
    """The built-in small CLIP reranker (text transformer + small ViT); real CLIP is loaded from a HF folder."""

    vocab_size: int = 50264
    max_text_length: int = 64
    embed_dim: int = 256
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    # Hidden width of each transformer MLP, as a multiple of the block's width.
    mlp_ratio: float = 4.0
    # Padding id of the (BART-style) tokenizer; used to build a mask when none is given.
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "max_text_length",
            "embed_dim",
            "text_width",
            "text_layers",
            "text_heads",
            "image_size",
            "patch_size",
            "vision_width",
            "vision_layers",
            "vision_heads",
        ):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"clip.{name} must be positive, got {getattr(self, name)}")
        for width, heads in (("text_width", "text_heads"), ("vision_width", "vision_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ConfigError(
                    f"clip.{width} ({getattr(self, width)}) must be divisible by "
                    f"{heads} ({getattr(self, heads)})"
                )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"clip.image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})"
            )
        if not self.mlp_ratio > 0:
            raise ConfigError(f"clip.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(
                f"clip.pad_token_id ({self.pad_token_id}) must be a token id below vocab_size ({self.vocab_size})"
            )

    @property
    def num_patches(self) -> int:
        """Patches per image side, squared: the image tower's sequence length without the class token."""
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipConfig:
        return _from_dict(cls, data, "clip config")


@dataclass(frozen=True)
class TextConfig:
    """How captions become token ids: normalizer, then BPE, padded/truncated to max_length."""

    max_length: int = 64
    normalize: bool = True
    bos_token_id: int = 0
    pad_token_id: int = 1
    eos_token_id: int = 2

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextConfig:
        return _from_dict(cls, data, "text config")


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings; defaults follow the original's inference notebook (top-k 50, condition scale 10)."""

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    condition_scale: float = 10.0

    def __post_init__(self) -> None:
        from .errors import InputError

        if not self.temperature > 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.condition_scale < 0:
            raise InputError(f"condition_scale must be >= 0, got {self.condition_scale}")

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingConfig:
        return _from_dict(cls, data, "sampling config")


@dataclass(frozen=True)
class PipelineConfig:
    """Everything in a model directory's config.json."""

    bart: BartConfig | None = None
    vqgan: VQGANConfig | None = None
    clip: ClipConfig | None = None
    text: TextConfig = field(default_factory=TextConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    FORMAT = "dallemini"
    VERSION = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "version": self.VERSION,
            "bart": self.bart.to_dict() if self.bart else None,
            "vqgan": self.vqgan.to_dict() if self.vqgan else None,
            "clip": self.clip.to_dict() if self.clip else None,
            "text": self.text.to_dict(),
            "sampling": self.sampling.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise ConfigError(
                f'config.json is not a dallemini model config (expected "format": "{cls.FORMAT}")'
            )
        if data.get("version") != cls.VERSION:
            raise ConfigError(
                f"config.json has version {data.get('version')!r}; this dallemini reads version {cls.VERSION}"
            )
        known = {"format", "version", "bart", "vqgan", "clip", "text", "sampling"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"config.json: unknown top-level field(s) {unknown}")
        return cls(
            bart=BartConfig.from_dict(data["bart"]) if data.get("bart") else None,
            vqgan=VQGANConfig.from_dict(data["vqgan"]) if data.get("vqgan") else None,
            clip=ClipConfig.from_dict(data["clip"]) if data.get("clip") else None,
            text=TextConfig.from_dict(data.get("text") or {}),
            sampling=SamplingConfig.from_dict(data.get("sampling") or {}),
        )


# Presets. "mini"/"mega" are the published models; "tiny" is small enough for tests on 2 CPU cores.
BART_PRESETS: dict[str, BartConfig] = {
    "mini": BartConfig(),
    "mega": BartConfig(
        encoder_vocab_size=50272,
        image_vocab_size=16415,
        d_model=2048,
        encoder_layers=24,
        decoder_layers=24,
        attention_heads=32,
        ffn_dim=4096,
        init_std=0.01,
    ),
    "tiny": BartConfig(
        encoder_vocab_size=1024,
        image_vocab_size=64,
        max_text_length=32,
        image_length=16,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        attention_heads=4,
        ffn_dim=128,
        decoder_start_token_id=64,
    ),
}

VQGAN_PRESETS: dict[str, VQGANConfig] = {
    "f16_16384": VQGANConfig(),
    # 64x64 images -> 4x4 tokens with a 64-entry codebook: for tests only.
    "tiny": VQGANConfig(
        ch=32,
        ch_mult=(1, 2, 2, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        z_channels=32,
        embed_dim=32,
        n_embed=64,
        resolution=64,
        num_groups=8,
    ),
}


def preset(name: str) -> PipelineConfig:
    """Configs for a named preset: mini/mega use the f16_16384 VQGAN, tiny the tiny one."""
    if name not in BART_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(BART_PRESETS)}")
    vq = VQGAN_PRESETS["tiny"] if name == "tiny" else VQGAN_PRESETS["f16_16384"]
    bart = BART_PRESETS[name]
    text = TextConfig(max_length=bart.max_text_length)
    return PipelineConfig(bart=bart, vqgan=vq, text=text)
