"""Configuration dataclasses for every model part, their presets, and (de)serialisation to JSON dicts."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError, InputError

T = TypeVar("T")
S = TypeVar("S", bound="_Section")

# Upper bound of vocabularies, codebooks and token ids (the published models: 50272 text tokens,
# 16415 image tokens, 16384 codes); every bound is far above the real models and far below absurd.
_MAX_VOCAB = 1 << 20
_MAX_TEXT = 4096
# What one parameter costs in memory: float32 weights; training adds its gradient and Adam's two moments.
BYTES_PER_PARAM = 4
TRAINING_COPIES = 4

Limits = dict[str, tuple[float, float]]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_error(where: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{where} must be {expected}, got {_shown(value)} ({type(value).__name__})")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _typed(value: Any, hint: Any, where: str) -> Any:
    """value if it has the field's type (integer-likes become int, lists tuples), else a ConfigError."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(where, value, "true or false")
    if hint is int:
        if _is_int(value):
            return value if type(value) is int else int(value)
        raise _type_error(where, value, "an integer")
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return value if isinstance(value, (int, float)) else float(value)
        raise _type_error(where, value, "a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(where, value, "a string")
    if typing.get_origin(hint) is tuple:
        if isinstance(value, (tuple, list)) and all(_is_int(v) for v in value):
            return tuple(int(v) for v in value)
        raise _type_error(where, value, "a list of integers")
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _validate(obj: Any) -> None:
    """Check every field's type (normalising integer-likes), tuple lengths, then the class's LIMITS."""
    section = obj.SECTION
    for name, hint in _field_types(type(obj)).items():
        value = getattr(obj, name)
        typed = _typed(value, hint, f"{section}.{name}")
        if typed is not value:
            object.__setattr__(obj, name, typed)  # frozen dataclass: normalise in place
    for name, (lo, hi) in getattr(obj, "LENGTHS", {}).items():
        n = len(getattr(obj, name))
        if not lo <= n <= hi:
            raise ConfigError(f"{section}.{name} must have {lo} to {hi} entries, got {n}")
    for name, (lo, hi) in obj.LIMITS.items():
        value = getattr(obj, name)
        for v in value if isinstance(value, tuple) else (value,):
            if not lo <= v <= hi:  # also refuses NaN
                each = " (each entry)" if isinstance(value, tuple) else ""
                raise ConfigError(
                    f"{section}.{name} must be between {lo} and {hi}{each}, got {_shown(value)}"
                )


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


class _Section:
    """A config section: JSON (de)serialisation and the section name its errors carry."""

    SECTION: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        items = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in items.items()}

    @classmethod
    def from_dict(cls: type[S], data: dict[str, Any]) -> S:
        return _from_dict(cls, data, f"{cls.SECTION} config")


@dataclass(frozen=True)
class BartConfig(_Section):
    """DalleBart: BART encoder over caption tokens, BART decoder over image tokens (NormFormer + GLU)."""

    SECTION: ClassVar[str] = "bart"

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
    # How the stored dense weights are kept: None (float) or "int8" (models/quant.py: int8 values and
    # a float32 scale per output channel); written to config.json only when set.
    quantization: str | None = None

    PART: ClassVar[str] = "DalleBart"
    # (min, max) of each size; mega has 24+24 layers, d_model 2048, GLU 4096, 32 heads.
    LIMITS: ClassVar[Limits] = {
        "encoder_vocab_size": (1, _MAX_VOCAB),
        "image_vocab_size": (1, _MAX_VOCAB),
        "max_text_length": (1, _MAX_TEXT),
        "image_length": (1, 1 << 16),
        "d_model": (1, 16384),
        "encoder_layers": (1, 256),
        "decoder_layers": (1, 256),
        "attention_heads": (1, 1024),
        "ffn_dim": (1, 1 << 16),
        "decoder_start_token_id": (0, _MAX_VOCAB),
        "layer_norm_eps": (0.0, 1.0),
        "dropout": (0.0, 1.0),
        "init_std": (0.0, 10.0),
    }

    def __post_init__(self) -> None:
        _validate(self)
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
        if self.quantization not in (None, "int8"):
            raise ConfigError(
                f'bart.quantization must be null or "int8", got {_shown(self.quantization)}'
            )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if data["quantization"] is None:  # float weights: config.json as before the field existed
            del data["quantization"]
        return data

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention_heads

    @property
    def decoder_vocab_size(self) -> int:
        return self.image_vocab_size + 1

    def param_count(self) -> int:
        """Parameters of the DalleBart this config builds, counted from the sizes alone."""
        d, f = self.d_model, self.ffn_dim
        scales = self.force_ln_scale  # scales on the norms that are bias-only by default
        enc_layer = 4 * d * d + 3 * d * f + 4 * d + f + scales * (2 * d + f)
        dec_layer = 8 * d * d + 3 * d * f + 7 * d + f + scales * (3 * d + f)
        ends = 2 * (2 * d + d + scales * d)  # layernorm_embedding and final_ln of both halves
        embeddings = (
            (self.encoder_vocab_size + self.max_text_length) * d
            + (2 * self.decoder_vocab_size + self.image_length) * d  # + lm_head
        )
        layers = self.encoder_layers * enc_layer + self.decoder_layers * dec_layer
        return embeddings + layers + ends


@dataclass(frozen=True)
class VQGANConfig(_Section):
    """VQGAN with the taming-transformers layout (defaults: vqgan_imagenet_f16_16384)."""

    SECTION: ClassVar[str] = "vqgan"

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

    PART: ClassVar[str] = "VQGAN"
    # (min, max) of each size (of each entry for lists); f16_16384 has ch 128, ch_mult [1,1,2,2,4],
    # 16384 codes of 256, 256-px images.
    LIMITS: ClassVar[Limits] = {
        "ch": (1, 1024),
        "ch_mult": (1, 64),
        "num_res_blocks": (1, 64),
        "attn_resolutions": (1, 8192),
        "z_channels": (1, 4096),
        "embed_dim": (1, 4096),
        "n_embed": (1, _MAX_VOCAB),
        "resolution": (1, 8192),
        "in_channels": (1, 64),
        "out_ch": (1, 64),
        "dropout": (0.0, 1.0),
        "num_groups": (1, 1024),
    }
    LENGTHS: ClassVar[dict[str, tuple[int, int]]] = {
        "ch_mult": (1, 14),
        "attn_resolutions": (0, 14),
    }

    def __post_init__(self) -> None:
        _validate(self)
        if self.pixel_range not in ("0,1", "-1,1"):
            raise ConfigError(
                f"vqgan.pixel_range must be '0,1' or '-1,1', got {self.pixel_range!r}"
            )
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

    def param_count(self) -> int:
        """Parameters of the VQGAN this config builds (taming's layout), counted from the sizes alone."""

        def conv(cin: int, cout: int, k: int = 3) -> int:
            return cin * cout * k * k + cout

        def block(cin: int, cout: int) -> int:
            short = conv(cin, cout, 1) if cin != cout else 0
            return 2 * cin + conv(cin, cout) + 2 * cout + conv(cout, cout) + short

        def attn(c: int) -> int:
            return 2 * c + 4 * conv(c, c, 1)

        ch, mults, n = self.ch, self.ch_mult, len(self.ch_mult)
        top = ch * mults[-1]
        mid = 2 * block(top, top) + attn(top) * self.mid_attn
        # Encoder: levels from the finest; attention only where the encoder is not local.
        enc = conv(self.in_channels, ch)
        res, cin = self.resolution, ch
        for i, m in enumerate(mults):
            for _ in range(self.num_res_blocks):
                enc += block(cin, ch * m)
                cin = ch * m
                if res in self.attn_resolutions and not self.local_encoder:
                    enc += attn(cin)
            if i != n - 1:
                enc += conv(cin, cin)
                res //= 2
        enc_mid = 2 * block(top, top) + attn(top) * (self.mid_attn and not self.local_encoder)
        enc += (
            enc_mid
            + 2 * top
            + conv(top, self.z_channels)
            + conv(self.z_channels, self.embed_dim, 1)
        )
        # Decoder: levels from the coarsest, one more block per level, upsampling convs.
        dec = conv(self.z_channels, top) + mid
        res, cin = self.grid_size, top
        for i in reversed(range(n)):
            for _ in range(self.num_res_blocks + 1):
                dec += block(cin, ch * mults[i])
                cin = ch * mults[i]
                if res in self.attn_resolutions:
                    dec += attn(cin)
            if i != 0:
                dec += conv(cin, cin)
                res *= 2
        dec += 2 * cin + conv(cin, self.out_ch)
        codebook = self.n_embed * self.embed_dim + conv(self.embed_dim, self.z_channels, 1)
        return dec + codebook + (0 if self.decoder_only else enc)

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
class ClipConfig(_Section):
    """The built-in small CLIP reranker (text transformer + small ViT); real CLIP is loaded from a HF folder."""

    SECTION: ClassVar[str] = "clip"

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

    PART: ClassVar[str] = "CLIP"
    # (min, max) of each size; the built-in CLIP is 256 wide with 4+4 layers.
    LIMITS: ClassVar[Limits] = {
        "vocab_size": (1, _MAX_VOCAB),
        "max_text_length": (1, _MAX_TEXT),
        "embed_dim": (1, 8192),
        "text_width": (1, 8192),
        "text_layers": (1, 256),
        "text_heads": (1, 1024),
        "image_size": (1, 4096),
        "patch_size": (1, 4096),
        "vision_width": (1, 8192),
        "vision_layers": (1, 256),
        "vision_heads": (1, 1024),
        "mlp_ratio": (0.0, 64.0),
        "pad_token_id": (0, _MAX_VOCAB),
        "layer_norm_eps": (0.0, 1.0),
    }

    def __post_init__(self) -> None:
        _validate(self)
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

    def param_count(self) -> int:
        """Parameters of the SmallClip this config builds, counted from the sizes alone."""

        def block(w: int) -> int:
            hidden = max(1, round(w * self.mlp_ratio))
            return 4 * w * w + 2 * w * hidden + 9 * w + hidden

        tw, vw, p = self.text_width, self.vision_width, self.patch_size
        text = (self.vocab_size + self.max_text_length + 2) * tw + self.text_layers * block(tw)
        vision = (3 * p * p + self.num_patches + 6) * vw + self.vision_layers * block(vw)
        return text + vision + (tw + vw) * self.embed_dim + 1


@dataclass(frozen=True)
class TextConfig(_Section):
    """How captions become token ids: normalizer, then BPE, padded/truncated to max_length."""

    SECTION: ClassVar[str] = "text"

    max_length: int = 64
    normalize: bool = True
    bos_token_id: int = 0
    pad_token_id: int = 1
    eos_token_id: int = 2

    # (min, max) of each field: <s> and </s> need two positions.
    LIMITS: ClassVar[Limits] = {
        "max_length": (2, _MAX_TEXT),
        "bos_token_id": (0, _MAX_VOCAB),
        "pad_token_id": (0, _MAX_VOCAB),
        "eos_token_id": (0, _MAX_VOCAB),
    }

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class SamplingConfig(_Section):
    """Sampling settings; defaults follow the original's inference notebook (top-k 50, condition scale 10)."""

    SECTION: ClassVar[str] = "sampling"

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    condition_scale: float = 10.0

    # The ranges are checked below (InputError: these settings usually come from a request).
    LIMITS: ClassVar[Limits] = {}
    # Each setting's range, in pydantic's words (the HTTP API's schema uses these very bounds).
    BOUNDS: ClassVar[dict[str, dict[str, float]]] = {
        "temperature": {"gt": 0, "le": 10},
        "top_k": {"ge": 0, "le": 1_000_000},
        "top_p": {"gt": 0, "le": 1},
        "condition_scale": {"ge": 0, "le": 100},
    }

    def __post_init__(self) -> None:
        _validate(self)
        for name, bounds in self.BOUNDS.items():
            value = getattr(self, name)
            low = value > bounds["gt"] if "gt" in bounds else value >= bounds["ge"]
            if not (math.isfinite(value) and low and value <= bounds["le"]):
                lower = f"> {bounds['gt']}" if "gt" in bounds else f">= {bounds['ge']}"
                raise InputError(
                    f"{name} must be a number {lower} and <= {bounds['le']}, got {value}"
                )


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

    def __post_init__(self) -> None:
        if self.bart is not None and self.text.max_length > self.bart.max_text_length:
            raise ConfigError(
                f"text.max_length ({self.text.max_length}) exceeds bart.max_text_length "
                f"({self.bart.max_text_length}): the model has no positions for the extra tokens; "
                f"set text.max_length to at most {self.bart.max_text_length}"
            )

    @property
    def parts(self) -> list[BartConfig | VQGANConfig | ClipConfig]:
        """The configs of the networks this config describes."""
        return [c for c in (self.bart, self.vqgan, self.clip) if c is not None]

    def param_count(self) -> int:
        """Parameters of all the networks, counted from the sizes alone."""
        return sum(c.param_count() for c in self.parts)

    def estimate_bytes(self, training: bool = False, bytes_per_param: int | None = None) -> int:
        """Memory the parameters need (with gradients and optimizer state when training)."""
        return estimate_bytes(*self.parts, training=training, bytes_per_param=bytes_per_param)

    def check_memory(self, training: bool = False, bytes_per_param: int | None = None) -> None:
        """Raise a ConfigError before anything is built when the parameters exceed the machine's memory."""
        check_memory(*self.parts, training=training, bytes_per_param=bytes_per_param)

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


ModelConfig = BartConfig | VQGANConfig | ClipConfig


def physical_memory_bytes() -> int | None:
    """The machine's RAM (sysconf pages x page size), or None where the platform does not say."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def estimate_bytes(
    *configs: ModelConfig | None, training: bool = False, bytes_per_param: int | None = None
) -> int:
    """Bytes the parameters of these networks take (float32 unless told; x4 when training)."""
    per = (bytes_per_param or BYTES_PER_PARAM) * (TRAINING_COPIES if training else 1)
    return per * sum(c.param_count() for c in configs if c is not None)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**28 else f"{n / 2**20:,.1f} MiB"


def check_memory(
    *configs: ModelConfig | None, training: bool = False, bytes_per_param: int | None = None
) -> None:
    """Refuse (ConfigError) sizes whose parameters alone exceed the machine's memory; call before building."""
    have = physical_memory_bytes()
    need = estimate_bytes(*configs, training=training, bytes_per_param=bytes_per_param)
    if have is None or need <= have:
        return
    parts = " + ".join(c.PART for c in configs if c is not None)
    params = sum(c.param_count() for c in configs if c is not None)
    why = "weights, gradients and optimizer state for training" if training else "weights"
    raise ConfigError(
        f"this {parts} needs about {_gib(need)} ({params:,} parameters; {why}), more than this "
        f"machine's {_gib(have)} of memory; choose smaller sizes (layers, widths, vocabulary)"
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
