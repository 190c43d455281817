"""dalle-mini / dalle-mega Flax checkpoints (`config.json` + `flax_model.msgpack`) -> (BartConfig, state dict).

Facts from the original code (dalle-mini 0.1.5, src/dalle_mini/model/modeling.py), which fix the mapping:
- Position embeddings are looked up at 0..n-1 (the original sets BART's offset of 2 to 0); the
  tables have max_text_length / image_length rows.
- Embeddings: layernorm_embedding(embed_tokens(ids) * (sqrt(d) if scale_embedding) + positions).
- A NormFormer layer creates its LayerNorms in this order, which gives their Flax names:
  encoder LayerNorm_0 = before self-attention (bias only unless force_ln_scale), LayerNorm_1 =
  on the attention output (scale + bias); the decoder adds LayerNorm_2 / LayerNorm_3 the same way
  around the cross-attention (FlaxBartAttention_1; FlaxBartAttention_0 is self-attention).
- GLU_0: LayerNorm_0 (bias only, d_model) -> Dense_0 (gelu branch) and Dense_1 (linear branch)
  -> product -> LayerNorm_1 (bias only, ffn_dim) -> Dense_2; activation "gelu" is the exact erf GELU.
- `final_ln` (bias only unless force_ln_scale) sits in FlaxBartEncoder/FlaxBartDecoder after the
  last layer when use_final_ln_encoder/decoder is true; with false there is no final norm at all
  (and 0.1.5's decoder then fails at call time). lm_head is a bias-free Dense to image_vocab_size+1.
- use_scan stacks each layer parameter along a leading axis under layers/FlaxBart{Encoder,Decoder}Layers;
  unscanned files have layers/FlaxBart{Encoder,Decoder}Layer_{i}. Which one a file uses is read from
  the file itself. Dense kernels are (in, out); torch Linear weights are (out, in).
- use_subln_init only changes the initialisation, so either value loads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import BartConfig
from ..errors import CheckpointError, ConfigError
from .flax_msgpack import flatten_tree, read_msgpack
from .lazy import LazyTensor, TensorLike, transposed
from .safe_load import read_json_object

WEIGHTS_NAME = "flax_model.msgpack"
WEIGHTS_INDEX_NAME = "flax_model.msgpack.index.json"  # transformers' sharded Flax checkpoints

# DalleBartConfig's defaults (dalle-mini 0.1.5), used when config.json leaves a field out.
_DEFAULTS: dict[str, Any] = {
    "encoder_vocab_size": 50264,
    "image_vocab_size": 16384,
    "image_length": 256,
    "max_text_length": 64,
    "encoder_layers": 12,
    "encoder_ffn_dim": 4096,
    "encoder_attention_heads": 16,
    "decoder_layers": 12,
    "decoder_ffn_dim": 4096,
    "decoder_attention_heads": 16,
    "d_model": 1024,
    "dropout": 0.1,
    "init_std": 0.02,
    "scale_embedding": False,
    "force_ln_scale": False,
}

# Architecture flags: the value we implement (also the original's default) and why others are refused.
_FLAGS: dict[str, tuple[Any, str]] = {
    "activation_function": ("gelu", "only the exact (erf) GELU is implemented"),
    "ln_type": ("layernorm", "only LayerNorm is implemented (no RMSNorm)"),
    "ln_positions": ("normformer", "only NormFormer layer-norm placement is implemented"),
    "use_bias": (False, "dense layers without biases only"),
    "use_glu": (True, "only the GLU feed-forward is implemented"),
    "use_head_scale": (False, "NormFormer head scaling is not implemented"),
    "use_cosine_attention": (False, "cosine attention is not implemented"),
    "use_alibi": (False, "ALiBi is not implemented"),
    "use_swin_position_embeddings": (False, "Swin relative positions are not implemented"),
    "use_absolute_position_embeddings": (True, "learned absolute positions are required"),
    "use_deepnet_scaling": (False, "DeepNet residual scaling is not implemented"),
    "use_final_ln_encoder": (True, "our encoder always ends with final_ln"),
    "use_final_ln_decoder": (True, "our decoder always ends with final_ln"),
    "tie_word_embeddings": (False, "tied embeddings are not implemented"),
    "sinkhorn_iters": (1, "Sinkhorn attention is not implemented"),
}


def _get(cfg: dict[str, Any], key: str, kind: type, where: Path) -> Any:
    value = cfg.get(key, _DEFAULTS.get(key))
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
    return value


def bart_config_from_flax(cfg: dict[str, Any], where: Path | str = "config.json") -> BartConfig:
    """Map a DalleBartConfig dict to our BartConfig; refuse, by name, any flag we do not implement."""
    where = Path(where)
    model_type = cfg.get("model_type", "dallebart")
    if model_type != "dallebart":
        raise CheckpointError(
            f"{where}: model_type is {model_type!r}; only dalle-mini's 'dallebart' is supported"
        )
    for flag, (want, why) in _FLAGS.items():
        value = cfg.get(flag, want)
        if flag == "ln_positions" and value == "deepnet":  # the original's alias
            value = "postln"
        if value != want or type(value) is not type(want):
            raise ConfigError(
                f"{where}: {flag}={json.dumps(value)} is not supported ({why}; "
                f"expected {json.dumps(want)})"
            )
    pairs = (
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    )
    for a, b in pairs:
        va, vb = _get(cfg, a, int, where), _get(cfg, b, int, where)
        if va != vb:
            raise ConfigError(
                f"{where}: {a}={va} differs from {b}={vb}; our model uses one value for both"
            )
    image_vocab_size = _get(cfg, "image_vocab_size", int, where)
    start = cfg.get("decoder_start_token_id", image_vocab_size)
    try:
        return BartConfig(
            encoder_vocab_size=_get(cfg, "encoder_vocab_size", int, where),
            image_vocab_size=image_vocab_size,
            max_text_length=_get(cfg, "max_text_length", int, where),
            image_length=_get(cfg, "image_length", int, where),
            d_model=_get(cfg, "d_model", int, where),
            encoder_layers=_get(cfg, "encoder_layers", int, where),
            decoder_layers=_get(cfg, "decoder_layers", int, where),
            attention_heads=_get(cfg, "encoder_attention_heads", int, where),
            ffn_dim=_get(cfg, "encoder_ffn_dim", int, where),
            decoder_start_token_id=int(start),
            force_ln_scale=_get(cfg, "force_ln_scale", bool, where),
            scale_embedding=_get(cfg, "scale_embedding", bool, where),
            dropout=float(_get(cfg, "dropout", float, where)),
            init_std=float(_get(cfg, "init_std", float, where)),
        )
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _layer_entries(cfg: BartConfig, decoder: bool) -> list[tuple[str, str, bool, tuple[int, ...]]]:
    """(Flax path inside one layer, our name inside one layer, is a Dense kernel, our torch shape)."""
    d, f, s = cfg.d_model, cfg.ffn_dim, cfg.force_ln_scale
    out: list[tuple[str, str, bool, tuple[int, ...]]] = []

    def norm(flax: str, ours: str, scale: bool, width: int = d) -> None:
        out.append((f"{flax}/bias", f"{ours}.bias", False, (width,)))
        if scale:
            out.append((f"{flax}/scale", f"{ours}.weight", False, (width,)))

    def attention(flax: str, ours: str) -> None:
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.append((f"{flax}/{p}/kernel", f"{ours}.{p}.weight", True, (d, d)))

    norm("LayerNorm_0", "pre_self_attn_layer_norm", s)
    attention("FlaxBartAttention_0", "self_attn")
    norm("LayerNorm_1", "self_attn_layer_norm", True)
    if decoder:
        norm("LayerNorm_2", "pre_encoder_attn_layer_norm", s)
        attention("FlaxBartAttention_1", "encoder_attn")
        norm("LayerNorm_3", "encoder_attn_layer_norm", True)
    norm("GLU_0/LayerNorm_0", "glu.ln0", s)
    out.append(("GLU_0/Dense_0/kernel", "glu.fc0.weight", True, (f, d)))
    out.append(("GLU_0/Dense_1/kernel", "glu.fc1.weight", True, (f, d)))
    norm("GLU_0/LayerNorm_1", "glu.ln1", s, f)
    out.append(("GLU_0/Dense_2/kernel", "glu.fc2.weight", True, (d, f)))
    return out


def _top_entries(cfg: BartConfig) -> list[tuple[str, str, bool, tuple[int, ...]]]:
    d, s = cfg.d_model, cfg.force_ln_scale
    out = [("lm_head/kernel", "decoder.lm_head.weight", True, (cfg.decoder_vocab_size, d))]
    sides = (
        ("encoder", cfg.encoder_vocab_size, cfg.max_text_length),
        ("decoder", cfg.decoder_vocab_size, cfg.image_length),
    )
    for side, vocab, length in sides:
        m = f"model/{side}"
        out.append(
            (f"{m}/embed_tokens/embedding", f"{side}.embed_tokens.weight", False, (vocab, d))
        )
        out.append(
            (f"{m}/embed_positions/embedding", f"{side}.embed_positions.weight", False, (length, d))
        )
        out.append(
            (f"{m}/layernorm_embedding/scale", f"{side}.layernorm_embedding.weight", False, (d,))
        )
        out.append(
            (f"{m}/layernorm_embedding/bias", f"{side}.layernorm_embedding.bias", False, (d,))
        )
        out.append((f"{m}/final_ln/bias", f"{side}.final_ln.bias", False, (d,)))
        if s:
            out.append((f"{m}/final_ln/scale", f"{side}.final_ln.weight", False, (d,)))
    return out


class _Tensors:
    """The flat Flax tree being consumed: pop each expected tensor once, checking its shape and dtype."""

    def __init__(self, flat: dict[str, Any], where: str) -> None:
        self.flat = flat
        self.where = where

    def pop(self, key: str, shape: tuple[int, ...], why: str) -> TensorLike:
        if key not in self.flat:
            raise CheckpointError(f"{self.where}: parameter {key!r} is missing ({why})")
        t = self.flat.pop(key)
        if not isinstance(t, (Tensor, LazyTensor)):
            raise CheckpointError(f"{self.where}: {key!r} is a {type(t).__name__}, not an array")
        if not t.is_floating_point():
            raise CheckpointError(f"{self.where}: {key!r} has dtype {t.dtype}, not a float type")
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{self.where}: {key!r} has shape {tuple(t.shape)}, config.json implies {shape}"
            )
        return t


def _layout(flat: dict[str, Any], side: str, where: str) -> str:
    """'scan' or 'unscanned': how this file stores the layers of one side (encoder/decoder)."""
    name = "FlaxBartEncoder" if side == "encoder" else "FlaxBartDecoder"
    base = f"model/{side}/layers/"
    if any(k.startswith(f"{base}{name}Layers/") for k in flat):
        return "scan"
    if any(k.startswith(f"{base}{name}Layer_0/") for k in flat):
        return "unscanned"
    raise CheckpointError(
        f"{where}: no {side} layers found (expected {base}{name}Layers/... or {base}{name}Layer_0/...)"
    )


def _own(t: TensorLike) -> TensorLike:
    """Own storage for a row of a stacked array (safetensors refuses views); lazy rows are read alone."""
    return t if isinstance(t, LazyTensor) else t.clone()


def convert_flax_dalle(
    flat: dict[str, Any], cfg: BartConfig, where: str = WEIGHTS_NAME
) -> dict[str, TensorLike]:
    """Flat Flax tree ({"model/encoder/...": tensor}; consumed) -> our DalleBart state dict.

    Lazy tensors in give lazy tensors out: nothing is read until each is loaded.
    """
    src = _Tensors(flat, where)
    state: dict[str, TensorLike] = {}
    for key, ours, dense, shape in _top_entries(cfg):
        t = src.pop(key, shape[::-1] if dense else shape, "top-level tensor")
        state[ours] = transposed(t) if dense else t
    for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        name = "FlaxBartEncoder" if side == "encoder" else "FlaxBartDecoder"
        entries = _layer_entries(cfg, decoder=side == "decoder")
        base = f"model/{side}/layers/"
        if _layout(flat, side, where) == "scan":
            for sub, ours, dense, shape in entries:
                flax_shape = (n, *(shape[::-1] if dense else shape))
                t = src.pop(f"{base}{name}Layers/{sub}", flax_shape, f"{n} stacked {side} layers")
                for i in range(n):
                    state[f"{side}.layers.{i}.{ours}"] = transposed(t[i]) if dense else _own(t[i])
                del t
        else:
            for i in range(n):
                for sub, ours, dense, shape in entries:
                    key = f"{base}{name}Layer_{i}/{sub}"
                    t = src.pop(key, shape[::-1] if dense else shape, f"{side} layer {i} of {n}")
                    state[f"{side}.layers.{i}.{ours}"] = transposed(t) if dense else t
    if flat:
        extra = sorted(flat)
        raise CheckpointError(
            f"{where}: {len(extra)} parameter(s) that config.json does not describe, first "
            f"{extra[:4]} (a different architecture, or more layers than the config says)"
        )
    return state


def _read_weights(folder: Path) -> tuple[dict[str, Any], str]:
    """The flat tree of flax_model.msgpack, or of all shards listed in flax_model.msgpack.index.json,
    with lazy arrays (read one at a time when loaded)."""
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return flatten_tree(read_msgpack(single, lazy=True)), str(single)
    if not index.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) found")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files: Iterable[str] = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid shard index: {e}") from e
    flat: dict[str, Any] = {}
    for name in files:
        part = flatten_tree(read_msgpack(folder / name, lazy=True))
        dup = sorted(set(part) & set(flat))
        if dup:
            raise CheckpointError(f"{folder / name}: parameter {dup[0]!r} is also in another shard")
        flat.update(part)
    missing = sorted(set(weight_map) - set(flat))
    if missing:
        raise CheckpointError(f"{index}: {missing[0]!r} is listed but in none of the shards")
    return flat, str(index)


def load_flax_dalle(path: str | Path) -> tuple[BartConfig, dict[str, TensorLike]]:
    """Read a dalle-mini/mega Flax folder (config.json + flax_model.msgpack) into (BartConfig, state dict).

    The state's tensors are lazy (see checkpoints.lazy) and keep the file's dtype (float32, float16
    or bfloat16).
    """
    p = Path(path)
    folder = p.parent if p.is_file() else p
    if not folder.is_dir():
        raise CheckpointError(f"{p} does not exist")
    raw = read_json_object(folder / "config.json", "a Flax DalleBart needs config.json")
    cfg = bart_config_from_flax(raw, folder / "config.json")
    flat, where = _read_weights(folder)
    return cfg, convert_flax_dalle(flat, cfg, where)
