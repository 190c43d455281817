"""Checkpoint formats: detect what a path holds and translate it into our configs and state dicts.

Every format ends as a `ModelParts` (configs + state dicts + tokenizer JSON), which `native` can save as
a model directory and the pipeline can load directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..config import PipelineConfig, TextConfig
from ..errors import CheckpointError
from ..models.bart import DalleBart
from ..models.clip import SmallClip
from ..models.quant import quantize_
from ..models.vqgan import VQGAN
from ..text import load_tokenizer
from . import hub, native, quantized
from .flax_dalle import load_flax_dalle
from .flax_vqgan import load_flax_vqgan
from .lazy import TensorLike, materialize
from .min_dalle import find_files, load_min_dalle
from .safe_load import read_json_object
from .taming import load_taming

FORMATS = ("native", "min-dalle", "flax-dalle", "flax-vqgan", "taming")


@dataclass
class ModelParts:
    """A model in memory before modules are built: config, one state dict per part, tokenizer.json text."""

    config: PipelineConfig
    states: dict[str, dict[str, TensorLike]] = field(default_factory=dict)
    tokenizer_json: str | None = None
    source: str = ""
    word_list: Path | None = None  # the hashtag splitter's word list the model ships, if any


def detect_format(path: str | Path) -> str:
    """Name the checkpoint format at path (one of FORMATS) or raise a CheckpointError saying what was found."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if p.is_file():
        if p.suffix == ".ckpt":
            return "taming"
        raise CheckpointError(
            f"{p} is a file; give a model directory (or a taming .ckpt). Known formats: {', '.join(FORMATS)}"
        )
    if native.is_model_dir(p):
        return "native"
    if find_files(p) is not None:
        return "min-dalle"
    if (p / "flax_model.msgpack").is_file() and (p / "config.json").is_file():
        cfg = read_json_object(p / "config.json")
        if "ch_mult" in cfg or "n_embed" in cfg:
            return "flax-vqgan"
        if "image_vocab_size" in cfg or "encoder_vocab_size" in cfg:
            return "flax-dalle"
        raise CheckpointError(f"{p}/config.json is neither a DalleBart nor a VQGAN Flax config")
    ckpts = sorted(p.glob("*.ckpt")) + sorted(p.glob("checkpoints/*.ckpt"))
    if ckpts:
        return "taming"
    raise CheckpointError(
        f"{p}: no known checkpoint found (looked for config.json of a dallemini model directory, min-dalle "
        "encoder.pt/decoder.pt, Flax flax_model.msgpack + config.json, taming .ckpt)"
    )


def _tokenizer_json(path: Path | None) -> str | None:
    """tokenizer.json text from a tokenizer.json / vocab.json+merges.txt location, or None if there is none."""
    if path is None:
        return None
    return load_tokenizer(path).to_str()


def _find_tokenizer(*dirs: Path) -> Path | None:
    for d in dirs:
        if (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file():
            return d
    return None


def _taming_ckpt(p: Path) -> Path:
    if p.is_file():
        return p
    ckpts = (
        sorted(p.glob("checkpoints/last.ckpt"))
        or sorted(p.glob("*.ckpt"))
        or sorted(p.glob("checkpoints/*.ckpt"))
    )
    return ckpts[0]


def load_parts(
    path: str | Path,
    vqgan: str | Path | None = None,
    tokenizer: str | Path | None = None,
    attention_heads: int | None = None,
    taming_config: str | Path | None = None,
    lazy: bool = False,
    dtype: torch.dtype | None = None,
) -> ModelParts:
    """Read any supported checkpoint (plus an optional separate VQGAN / tokenizer) into ModelParts.

    `path` and `vqgan` may be Hub names (checkpoints.hub: downloaded and converted once, preferring
    a conversion stored in `dtype`). With `lazy`, state dicts may hold LazyTensors, read one at a
    time by whoever consumes them.
    """
    parts = _load_parts(hub.local_path(path, dtype), attention_heads, taming_config)
    if vqgan is not None:
        other = _load_parts(hub.local_path(vqgan), None, taming_config)
        if other.config.vqgan is None:
            raise CheckpointError(f"{vqgan} holds no VQGAN")
        parts.config = replace(parts.config, vqgan=other.config.vqgan)
        parts.states["vqgan"] = other.states["vqgan"]
    if tokenizer is not None:
        parts.tokenizer_json = _tokenizer_json(Path(tokenizer))
    if not lazy:
        parts.states = {part: materialize(state) for part, state in parts.states.items()}
    return parts


def _word_list(*dirs: Path) -> Path | None:
    return next(
        (d / native.WORD_LIST_FILE for d in dirs if (d / native.WORD_LIST_FILE).is_file()), None
    )


def _load_parts(
    p: Path, attention_heads: int | None, taming_config: str | Path | None
) -> ModelParts:
    fmt = detect_format(p)
    if fmt == "native":
        cfg = native.read_config(p)
        states = {
            part: native.read_weights(p, part, lazy=True)
            for part in native.WEIGHT_FILES
            if getattr(cfg, part)
        }
        tok = (
            (p / native.TOKENIZER_FILE).read_text()
            if (p / native.TOKENIZER_FILE).is_file()
            else None
        )
        parts = ModelParts(cfg, states, tok, source=f"native:{p}", word_list=_word_list(p))
    elif fmt == "min-dalle":
        bart_cfg, bart_state, vq_cfg, vq_state, files = load_min_dalle(p, attention_heads)
        cfg = PipelineConfig(
            bart=bart_cfg, vqgan=vq_cfg, text=TextConfig(max_length=bart_cfg.max_text_length)
        )
        states = {"bart": bart_state}
        if vq_state is not None:
            states["vqgan"] = vq_state
        tok_dir = files.vocab.parent if files.vocab else None
        tok_json = None
        if files.vocab is not None and files.merges is not None:
            tok_json = load_tokenizer(files.vocab, files.merges).to_str()
        parts = ModelParts(cfg, states, tok_json, source=f"min-dalle:{tok_dir or p}")
        parts.word_list = _word_list(*([tok_dir] if tok_dir else []), p)
    elif fmt == "flax-dalle":
        bart_cfg, bart_state = load_flax_dalle(p)
        cfg = PipelineConfig(bart=bart_cfg, text=TextConfig(max_length=bart_cfg.max_text_length))
        tok_dir = _find_tokenizer(p)
        parts = ModelParts(
            cfg,
            {"bart": bart_state},
            _tokenizer_json(tok_dir),
            source=f"flax-dalle:{p}",
            word_list=_word_list(p if p.is_dir() else p.parent),
        )
    elif fmt == "flax-vqgan":
        vq_cfg, vq_state = load_flax_vqgan(p)
        parts = ModelParts(
            PipelineConfig(vqgan=vq_cfg), {"vqgan": vq_state}, source=f"flax-vqgan:{p}"
        )
    else:
        vq_cfg, vq_state = load_taming(_taming_ckpt(p), taming_config)
        parts = ModelParts(PipelineConfig(vqgan=vq_cfg), {"vqgan": vq_state}, source=f"taming:{p}")
    return parts


def convert(
    src: str | Path,
    dst: str | Path,
    vqgan: str | Path | None = None,
    tokenizer: str | Path | None = None,
    attention_heads: int | None = None,
    taming_config: str | Path | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    write_extra: Callable[[Path, dict[str, str]], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Convert any supported checkpoint into a native model directory at dst, one tensor at a time.

    `dtype` stores the DalleBart's (and built-in CLIP's) float weights in that dtype; the VQGAN
    keeps its own. torch.int8 stores the DalleBart's dense layers in 8 bits (checkpoints/quantized.py)
    and leaves the other tensors as they are; a float dtype dequantizes an int8 source. The result is
    checked as loading would check it (every tensor's name and shape against the config) before
    anything is written. `progress(tensors written, total)` follows it.
    """
    parts = load_parts(src, vqgan, tokenizer, attention_heads, taming_config, lazy=True)
    check_parts(parts)
    if parts.config.bart is not None and "bart" in parts.states:
        bart, parts.states["bart"] = quantized.for_storage(
            parts.config.bart, parts.states["bart"], dtype
        )
        parts.config = replace(parts.config, bart=bart)
    floats = dtype is not None and dtype.is_floating_point
    dtypes = {part: dtype for part in ("bart", "clip")} if floats else None
    extra = {native.WORD_LIST_FILE: parts.word_list} if parts.word_list is not None else None
    written, total = [0], sum(len(state) for state in parts.states.values())

    def wrote(nbytes: int) -> None:
        written[0] += 1
        if progress is not None:
            progress(written[0], total)

    return native.save_model_dir(
        dst,
        parts.config,
        parts.states,
        parts.tokenizer_json,
        overwrite=overwrite,
        dtypes=dtypes,
        extra_files=extra,
        write_extra=write_extra,
        progress=wrote,
    )


def check_parts(parts: ModelParts) -> None:
    """Check every part's tensors against the module its config builds (on the meta device: no memory)."""
    builders = {"bart": DalleBart, "vqgan": VQGAN, "clip": SmallClip}
    for part, state in parts.states.items():
        with torch.device("meta"):
            module = builders[part](getattr(parts.config, part))
        if part == "bart":  # int8 layers where the state stores them
            quantize_(module, quantized.stored_int8_layers(state))
        native.check_state_dict(module, state, f"{parts.source} ({part})")
