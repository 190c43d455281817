"""Write our models in the published foreign formats: the exact inverses of the package's loaders.

Used by tests and fixture tooling to build checkpoints under the published file names: dalle-mini's
Flax DalleBart (`config.json` + `flax_model.msgpack`), the Flax VQGAN (vqgan-jax), min-dalle's
`encoder.pt` / `decoder.pt` / `detoker.pt` and a tokenizer's `vocab.json` + `merges.txt`. State
dicts may hold LazyTensors; the Flax trees then hold lazy leaves too (read when written).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..config import VQGAN_PRESETS, BartConfig, VQGANConfig
from .flax_dalle import _FLAGS as _DALLE_FLAGS
from .flax_dalle import _layer_entries, _top_entries
from .flax_msgpack import unflatten_tree
from .flax_vqgan import flax_name
from .lazy import LazyTensor, TensorLike, load, transposed
from .min_dalle import _BIAS_ONLY_LN
from .taming import expected_shapes

# Written into the Flax configs, as transformers would (the loaders ignore it).
_TRANSFORMERS_VERSION = "4.19.2"


# ------------------------------------------------------------------------------------------------
# dalle-mini Flax DalleBart


def flax_dalle_config(cfg: BartConfig, use_scan: bool) -> dict[str, Any]:
    """The DalleBartConfig JSON dict dalle-mini writes for `cfg` (bart_config_from_flax gives `cfg` back)."""
    if cfg.layer_norm_eps != BartConfig.layer_norm_eps:
        raise ValueError(
            f"layer_norm_eps={cfg.layer_norm_eps}: dalle-mini's config has no such field (always 1e-5)"
        )
    special = cfg.decoder_start_token_id
    out: dict[str, Any] = {
        "activation_dropout": 0.0,
        "architectures": ["DalleBart"],
        "attention_dropout": 0.0,
        "bos_token_id": special,
        "d_model": cfg.d_model,
        "decoder_attention_heads": cfg.attention_heads,
        "decoder_ffn_dim": cfg.ffn_dim,
        "decoder_layerdrop": 0.0,
        "decoder_layers": cfg.decoder_layers,
        "decoder_start_token_id": special,
        "dropout": cfg.dropout,
        "encoder_attention_heads": cfg.attention_heads,
        "encoder_ffn_dim": cfg.ffn_dim,
        "encoder_layerdrop": 0.0,
        "encoder_layers": cfg.encoder_layers,
        "encoder_vocab_size": cfg.encoder_vocab_size,
        "eos_token_id": special,
        "force_ln_scale": cfg.force_ln_scale,
        "gradient_checkpointing": False,
        "image_length": cfg.image_length,
        "image_vocab_size": cfg.image_vocab_size,
        "init_std": cfg.init_std,
        "is_encoder_decoder": True,
        "max_text_length": cfg.max_text_length,
        "model_type": "dallebart",
        "pad_token_id": special,
        "scale_embedding": cfg.scale_embedding,
        "transformers_version": _TRANSFORMERS_VERSION,
        "use_cache": True,
        "use_scan": use_scan,
        "use_subln_init": False,
    }
    out.update({flag: want for flag, (want, _) in _DALLE_FLAGS.items()})
    return dict(sorted(out.items()))


def _stacked(parts: list[TensorLike]) -> TensorLike:
    """torch.stack of per-layer tensors; lazily (each part read when the stack is loaded) if any is lazy."""
    if not any(isinstance(p, LazyTensor) for p in parts):
        return torch.stack([load(p) for p in parts])
    first = parts[0]
    shape = (len(parts), *first.shape)
    return LazyTensor(shape, first.dtype, lambda: torch.stack([load(p) for p in parts]))


def _take(state: Mapping[str, TensorLike], key: str, shape: tuple[int, ...]) -> TensorLike:
    if key not in state:
        raise KeyError(f"state dict has no {key!r} (needed by this BartConfig)")
    t = state[key]
    if tuple(t.shape) != shape:
        raise ValueError(f"{key} has shape {tuple(t.shape)}, the config implies {shape}")
    return t


def flax_dalle_tree(
    state: Mapping[str, TensorLike], cfg: BartConfig, use_scan: bool
) -> dict[str, Any]:
    """Our DalleBart state dict -> the nested Flax tree convert_flax_dalle reads (lazy in, lazy out)."""
    flat: dict[str, TensorLike] = {}
    for key, ours, dense, shape in _top_entries(cfg):
        t = _take(state, ours, shape)
        flat[key] = transposed(t) if dense else t
    for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        name = "FlaxBartEncoder" if side == "encoder" else "FlaxBartDecoder"
        base = f"model/{side}/layers/"
        for sub, ours, dense, shape in _layer_entries(cfg, decoder=side == "decoder"):
            per_layer = [_take(state, f"{side}.layers.{i}.{ours}", shape) for i in range(n)]
            per_layer = [transposed(t) if dense else t for t in per_layer]
            if use_scan:
                flat[f"{base}{name}Layers/{sub}"] = _stacked(per_layer)
            else:
                for i, t in enumerate(per_layer):
                    flat[f"{base}{name}Layer_{i}/{sub}"] = t
    extra = sorted(set(state) - _dalle_keys(cfg))
    if extra:
        raise ValueError(
            f"{len(extra)} tensor(s) this BartConfig does not describe, first {extra[:3]}"
        )
    return unflatten_tree(flat)


def _dalle_keys(cfg: BartConfig) -> set[str]:
    keys = {ours for _, ours, _, _ in _top_entries(cfg)}
    for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        for _, ours, _, _ in _layer_entries(cfg, decoder=side == "decoder"):
            keys.update(f"{side}.layers.{i}.{ours}" for i in range(n))
    return keys


# ------------------------------------------------------------------------------------------------
# vqgan-jax Flax VQGAN


def _check_flax_vqgan(cfg: VQGANConfig) -> None:
    """Refuse what a vqgan-jax config cannot express (the loader would give back another config)."""
    want = {
        "num_groups": 32,
        "pixel_range": "0,1",
        "decoder_only": False,
        "mid_attn": True,
        "local_encoder": False,
        "l2_codes": False,
    }
    for name, value in want.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"vqgan-jax has no {name}={getattr(cfg, name)!r} (only {value!r})")


def flax_vqgan_config(cfg: VQGANConfig) -> dict[str, Any]:
    """The vqgan-jax config.json dict for `cfg` (vqgan_config_from_flax gives `cfg` back)."""
    _check_flax_vqgan(cfg)
    return {
        "attn_resolutions": list(cfg.attn_resolutions),
        "ch": cfg.ch,
        "ch_mult": list(cfg.ch_mult),
        "double_z": False,
        "dropout": cfg.dropout,
        "embed_dim": cfg.embed_dim,
        "give_pre_end": False,
        "in_channels": cfg.in_channels,
        "n_embed": cfg.n_embed,
        "num_res_blocks": cfg.num_res_blocks,
        "out_ch": cfg.out_ch,
        "resamp_with_conv": True,
        "resolution": cfg.resolution,
        "transformers_version": _TRANSFORMERS_VERSION,
        "z_channels": cfg.z_channels,
    }


def _lazy_map(t: TensorLike, fn: Callable[[Tensor], Tensor], shape: tuple[int, ...]) -> TensorLike:
    return t.map(fn, shape) if isinstance(t, LazyTensor) else fn(t)


def _hwio(t: Tensor) -> Tensor:
    return t.permute(2, 3, 1, 0).contiguous()


def flax_vqgan_tree(state: Mapping[str, TensorLike]) -> dict[str, Any]:
    """Our (taming-named) VQGAN state dict -> the nested vqgan-jax tree convert_flax_vqgan reads."""
    flat: dict[str, TensorLike] = {}
    for key, t in state.items():
        path = flax_name(key)
        shape = tuple(t.shape)
        if len(shape) == 4:  # conv (out, in, H, W) -> kernel (H, W, in, out)
            path = path.rsplit("/", 1)[0] + "/kernel"
            t = _lazy_map(t, _hwio, (shape[2], shape[3], shape[1], shape[0]))
        elif len(shape) == 1 and key.endswith(".weight"):  # GroupNorm
            path = path.rsplit("/", 1)[0] + "/scale"
        flat[path] = t
    return unflatten_tree(flat)


# ------------------------------------------------------------------------------------------------
# min-dalle


def min_dalle_states(
    bart_state: Mapping[str, TensorLike],
) -> tuple[dict[str, TensorLike], dict[str, TensorLike]]:
    """Our DalleBart state -> min-dalle's (encoder.pt, decoder.pt) states; bias-only norms get a scale of ones."""
    parts: dict[str, dict[str, TensorLike]] = {"encoder": {}, "decoder": {}}
    for key, t in bart_state.items():
        side, _, rest = key.partition(".")
        if side not in parts:
            raise ValueError(f"{key!r} is neither an encoder.* nor a decoder.* tensor")
        out = parts[side]
        if rest.endswith(".bias"):
            w = rest[: -len("bias")] + "weight"
            if _BIAS_ONLY_LN.search(w) and f"{side}.{w}" not in bart_state:
                out[w] = torch.ones(tuple(t.shape), dtype=t.dtype)  # min-dalle's nn.LayerNorm
        out[rest] = t
    return parts["encoder"], parts["decoder"]


def min_dalle_detoker(
    vqgan_state: Mapping[str, TensorLike], cfg: VQGANConfig
) -> dict[str, TensorLike]:
    """Our VQGAN state -> min-dalle's detoker.pt state (decoder half, codebook at embedding.weight)."""
    fixed = dataclasses.replace(
        VQGAN_PRESETS["f16_16384"],
        n_embed=cfg.n_embed,
        embed_dim=cfg.embed_dim,
        decoder_only=True,
        pixel_range="0,1",
    )
    if dataclasses.replace(cfg, decoder_only=True) != fixed:
        raise ValueError(
            "min-dalle's detokenizer is hard-wired to the f16_16384 architecture (only n_embed and "
            f"embed_dim may differ); got {cfg}"
        )
    keys = expected_shapes(fixed)
    missing = [k for k in keys if k not in vqgan_state]
    if missing:
        raise KeyError(f"VQGAN state lacks {len(missing)} decoder tensor(s), first {missing[:3]}")
    return {
        ("embedding.weight" if k == "quantize.embedding.weight" else k): vqgan_state[k]
        for k in keys
    }


# ------------------------------------------------------------------------------------------------
# Tokenizer


def bpe_files(tokenizer_json: str) -> tuple[str, str]:
    """(vocab.json text, merges.txt text) of a byte-level BPE tokenizer.json, as BART's repos ship them.

    Added tokens (e.g. `<mask>`) are part of vocab.json, as in BART's; merges.txt has the
    `#version: 0.2` header line.
    """
    data = json.loads(tokenizer_json)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"not a BPE tokenizer.json (model type {model.get('type')!r})")
    vocab: dict[str, int] = dict(model["vocab"])
    for added in data.get("added_tokens") or []:
        vocab.setdefault(added["content"], int(added["id"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    vocab_text = json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))
    merges_text = "#version: 0.2\n" + "".join(f"{m}\n" for m in merges)
    return vocab_text, merges_text
